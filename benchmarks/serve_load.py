"""Load test of ``esta serve --palette``: one server, mixed budgets, checked answers, side by side with in-process.

    python benchmarks/serve_load.py --palette runs/demo/palette [--requests 2000 --concurrency 8 --threads 2]

Starts ``esta serve`` on 127.0.0.1 (a free port) as its own process, sends ``--requests`` image requests from
``--concurrency`` client threads (keep-alive connections), cycling over ``--budgets`` (default: four budgets spread
over the palette's costs), and reports:

- throughput and p50 / p99 latency per budget, and errors (any non-200 answer);
- whether every answer equals the chosen stitch's offline answer (the palette loaded here, same image);
- served throughput against the same stitches run in-process on the same images at the same batch size (1), one
  after the other, in ``--rounds`` interleaved rounds (in-process, then served; the median of the rounds' ratios:
  this machine's speed drifts by 10-20 % over a minute, more than the difference being measured) (goal: >= 0.8x);
- the cost of switching stitch: sequential requests alternating between two budgets against the same requests with
  a fixed budget, both through the server and in-process, in interleaved rounds (medians; the goal: <= 1.05x).

Nothing here is asserted: the numbers are printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from esta.selection import best_within
from esta.serving import load_palette


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection per client thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def post(self, budget: str, body: bytes) -> tuple[int, dict, float]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        t0 = time.perf_counter()
        conn.request("POST", f"/classify?budget={budget}", body=body,
                      headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data), time.perf_counter() - t0


def start_server(palette: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "esta.cli", "serve", "--palette", palette, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"esta serve exited: {proc.stderr.read().decode()[-2000:]}")
    proc.kill()
    raise SystemExit("esta serve did not answer /health within 2 minutes")


def png(pixels: torch.Tensor) -> bytes:
    """A [C, H, W] uint8 image as PNG bytes (what a client sends)."""
    arr = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1 else "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--palette", required=True, help="a palette artifact (esta deploy --run RUN --palette)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, server and here")
    ap.add_argument("--budgets", default="", help="comma-separated, e.g. 0.05GFLOPs,0.2GFLOPs (default: four "
                    "spread over the palette's costs)")
    ap.add_argument("--images", type=int, default=64, help="distinct images the requests cycle over")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved in-process / served rounds of --requests each")
    ap.add_argument("--switch-rounds", type=int, default=5, help="rounds of the fixed / alternating comparison")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    if min(args.requests, args.concurrency, args.rounds, args.switch_rounds, args.images) < 1:
        raise SystemExit("--requests, --concurrency, --rounds, --switch-rounds and --images must be at least 1")
    torch.set_num_threads(args.threads)

    palette, table = load_palette(args.palette)
    palette.eval()
    front = palette.anchors[0]
    flops = sorted({row["flops"] for row in table["stitches"]})
    budgets = args.budgets.split(",") if args.budgets else [
        f"{flops[min(len(flops) - 1, int(q * (len(flops) - 1)))] / 1e9:.6g}GFLOPs" for q in (0.1, 0.4, 0.7, 1.0)]
    chosen = {b: best_within(table, float(b.removesuffix("GFLOPs")) * 1e9, key="flops")["id"] for b in budgets}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, front.num_channels, front.image_size, front.image_size),
                           dtype=torch.uint8, generator=g)
    bodies = [png(x) for x in images]
    plan = [(budgets[i % len(budgets)], i % args.images) for i in range(args.requests)]

    with torch.no_grad():  # the offline answers
        offline = {(b, k): palette(images[k:k + 1], stitch=chosen[b]).softmax(-1)[0]
                   for b in budgets for k in range(args.images)}

    def in_process() -> float:
        """Seconds for the request sequence run here, one after the other, at batch 1."""
        t0 = time.perf_counter()
        with torch.no_grad():
            for b, k in plan:
                palette(images[k:k + 1], stitch=chosen[b]).softmax(-1)
        return time.perf_counter() - t0

    port = free_port()
    server = start_server(args.palette, port, args.threads)
    try:
        client = Client(port)
        for b in budgets:  # warm-up: one request per budget
            client.post(b, bodies[0])
        def one(item: tuple[str, int]) -> tuple[str, int, dict, float]:
            status, answer, dt = client.post(item[0], bodies[item[1]])
            return item[0], status, answer, dt

        answers, in_process_s, served_s = [], [], []
        for _ in range(args.rounds):  # side by side: each round times both, so drift hits both alike
            time.sleep(0.5)  # the server's threads spin down before the cores are timed here
            in_process_s.append(in_process())
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                answers += list(pool.map(one, plan))  # counted after, not in the threads (no shared counters)
            served_s.append(time.perf_counter() - t0)
        latencies: dict[str, list[float]] = {b: [] for b in budgets}
        errors, mismatches = [], 0
        for (b, k), (_, status, answer, dt) in zip(plan * args.rounds, answers):
            if status != 200:
                errors.append((status, answer))
                continue
            latencies[b].append(dt)
            expected = offline[(b, k)]
            mismatches += not (answer["stitch_id"] == chosen[b] and answer["index"] == int(expected.argmax()) and
                               max(abs(p - float(e)) for p, e in zip(answer["probabilities"], expected)) < 1e-5)

        # switching stitch: sequential requests, fixed budget vs alternating between two budgets, interleaved
        # rounds; latencies kept per budget (a cheap and a costly stitch: their mix has no meaningful median)
        lo, hi = budgets[0], budgets[-1]
        n = 40
        timed = {(side, where, b): [] for side in ("fixed", "alternating") for where in ("http", "local")
                 for b in (lo, hi)}
        single = Client(port)

        def local(b: str, k: int) -> float:
            t = time.perf_counter()
            with torch.no_grad():
                palette(images[k:k + 1], stitch=chosen[b])
            return time.perf_counter() - t

        # each side in a loop of its own: a local forward right after a request would share the cores with the
        # server's threads still spinning down
        for _ in range(args.switch_rounds):
            for where, call in (("http", lambda b, k: single.post(b, bodies[k])[2]), ("local", local)):
                for b in (lo, hi):
                    for i in range(n):
                        timed[("fixed", where, b)].append(call(b, i % args.images))
                for i in range(2 * n):
                    b = (lo, hi)[i % 2]
                    timed[("alternating", where, b)].append(call(b, i % args.images))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        batched = json.loads(conn.getresponse().read()).get("batched")
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = {b: {"stitch": next(r["name"] for r in table["stitches"] if r["id"] == chosen[b]),
                "requests": len(latencies[b]), "p50_ms": 1e3 * pct(latencies[b], 0.5),
                "p99_ms": 1e3 * pct(latencies[b], 0.99)} for b in budgets}
    report = {
        "requests": args.requests, "concurrency": args.concurrency, "threads": args.threads,
        "rounds": args.rounds, "errors": len(errors), "answers_differing_from_offline": mismatches,
        "served_requests_per_s": args.requests / statistics.median(served_s),
        "in_process_requests_per_s": args.requests / statistics.median(in_process_s),
        "served_vs_in_process_per_round": [i / s for i, s in zip(in_process_s, served_s)],
        "served_vs_in_process_throughput": statistics.median(i / s for i, s in zip(in_process_s, served_s)),
        "server_batching": batched,  # requests and forwards over the whole run (warm-up and switching included)
        "per_budget": rows,
        "switch": {"budgets": [lo, hi], "rounds": args.switch_rounds, "requests_per_budget_per_round": n},
    }
    for where in ("http", "local"):
        med = {(side, b): 1e3 * statistics.median(timed[(side, where, b)])
               for side in ("fixed", "alternating") for b in (lo, hi)}
        report["switch"][where] = {
            **{f"{side}_ms_{b}": v for (side, b), v in med.items()},
            # the sum of the two budgets' medians: alternating over fixed
            "ratio": (med[("alternating", lo)] + med[("alternating", hi)]) / (med[("fixed", lo)] + med[("fixed", hi)])}
    rounds = ", ".join(f"{r:.2f}" for r in report["served_vs_in_process_per_round"])
    print(f"{args.rounds} rounds of {args.requests} requests, {args.concurrency} concurrent, {args.threads} torch "
          f"threads: {report['served_requests_per_s']:.1f} req/s served, {report['in_process_requests_per_s']:.1f} "
          f"req/s in-process (medians); served/in-process {report['served_vs_in_process_throughput']:.2f}x (median of "
          f"rounds {rounds}); errors {len(errors)} of {len(answers)}; answers differing from offline {mismatches}")
    if batched and batched["forwards"]:
        print(f"the server ran {batched['requests']} requests in {batched['forwards']} forwards (dynamic batching: "
              f"{batched['requests'] / batched['forwards']:.2f} requests per forward on average)")
    print("| budget | stitch | requests | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for b, r in rows.items():
        print(f"| {b} | {r['stitch']} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    s = report["switch"]
    print(f"switching stitch between requests ({lo} <-> {hi}; per-budget medians summed): alternating / fixed = "
          f"{s['http']['ratio']:.3f}x over HTTP, {s['local']['ratio']:.3f}x in-process")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
