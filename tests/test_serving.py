"""One palette artifact runs every stitch exactly as that stitch deployed alone, at about the anchors' size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import esta, image_folder

from esta.deploy import DeployedStitch
from esta.errors import EstaError
from esta.runs import load_run
from esta.selection import best_within
from esta.serving import load_palette


@pytest.fixture(scope="module")
def run(tmp_path_factory, vit_family) -> Path:
    """A trained tiny run and its palette artifact (RUN/palette)."""
    tmp = tmp_path_factory.mktemp("serving")
    data = image_folder(tmp / "data", per_class=8)
    run = tmp / "run"
    r = esta("train", "--anchors", *vit_family, "--data", str(data), "--steps", "30", "--batch-size", "8",
             "--groups", "3", "--lr", "0.02", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    r = esta("deploy", "--run", str(run), "--palette")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_the_palette_artifact_equals_every_stitch_deployed_alone(run, vit_family):
    served, table = load_palette(run / "palette")
    trained, _ = load_run(run)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert len(table["stitches"]) == len(served) == 17
    with torch.no_grad():
        for s in trained.space.stitches:  # every stitch, anchors and cuts
            alone = DeployedStitch.from_palette(trained, s.id)(images)
            torch.testing.assert_close(served(images, stitch=s.id), alone, atol=1e-5, rtol=1e-5, msg=s.name)
            assert table["stitches"][s.id]["flops"] > 0
    anchors = sum(f.stat().st_size for a in vit_family for f in Path(a).glob("*.safetensors"))
    palette_size = (run / "palette" / "palette.safetensors").stat().st_size
    assert palette_size <= 1.3 * anchors, (palette_size, anchors)
    cheapest = min(r["flops"] for r in table["stitches"])
    assert best_within(table, cheapest)["flops"] == cheapest
    with pytest.raises(EstaError, match="no stitch fits"):
        best_within(table, cheapest / 2)


def test_the_server_answers_each_budget_with_its_stitch_and_refuses_bad_requests(run):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from esta.serve import create_app

    client = TestClient(create_app(run / "palette", max_bytes=5000))
    served, table = load_palette(run / "palette")
    assert client.get("/health").json()["stitches"] == len(table["stitches"])
    assert len(client.get("/stitches").json()["stitches"]) == len(table["stitches"])
    image = Image.fromarray(torch.randint(0, 256, (8, 8), dtype=torch.uint8).numpy(), mode="L")
    png = io.BytesIO()
    image.save(png, format="PNG")
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, 1, 8, 8)
    costs = sorted({r["flops"] for r in table["stitches"]})
    for budget in [costs[0], costs[-1], costs[0], costs[len(costs) // 2]]:  # alternating budgets, one palette
        r = client.post(f"/classify?budget_gflops={budget / 1e9!r}", content=png.getvalue())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["flops"] <= budget and body["stitch_id"] == best_within(table, budget)["id"]
        with torch.no_grad():
            offline = served(x, stitch=body["stitch_id"]).softmax(-1)[0]
        assert body["index"] == int(offline.argmax())
        torch.testing.assert_close(torch.tensor(body["probabilities"]), offline, atol=1e-5, rtol=0)
    assert client.post(f"/classify?budget_gflops={costs[0] / 2e9!r}", content=png.getvalue()).status_code == 422
    assert client.post("/classify?budget_gflops=1", content=b"not an image").status_code == 400
    assert client.post("/classify?budget_gflops=1", content=b"x" * 6000).status_code == 413
    assert client.post("/classify", content=png.getvalue()).status_code == 422  # no budget given


def test_latency_budgets_after_profiling(run, tmp_path):
    import io
    import json
    import shutil

    from fastapi.testclient import TestClient
    from PIL import Image

    from esta.serve import create_app

    palette = tmp_path / "palette"
    shutil.copytree(run / "palette", palette)
    png = io.BytesIO()
    Image.fromarray(torch.zeros(8, 8, dtype=torch.uint8).numpy(), mode="L").save(png, format="PNG")
    client = TestClient(create_app(palette))
    r = client.post("/classify?budget=50ms", content=png.getvalue())
    assert r.status_code == 422 and "esta profile" in r.text  # no latencies measured yet: said, not guessed

    p = esta("profile", "--palette", str(palette), "--repeats", "3", "--warmup", "1", "--threads", "1",
             "--no-progress")
    assert p.returncode == 0, p.stderr
    table = json.loads((palette / "palette.json").read_text())
    assert all(row["latency_ms"] > 0 for row in table["stitches"])
    assert table["latency"]["batch_size"] == 1 and table["latency"]["threads"] == 1
    client = TestClient(create_app(palette))
    slowest = max(row["latency_ms"] for row in table["stitches"])
    for budget in (f"{slowest + 1:.3f}ms", "0.5s"):
        body = client.post(f"/classify?budget={budget}", content=png.getvalue()).json()
        assert body["latency_ms"] <= slowest and body["stitch_id"] == best_within(
            table, slowest + 1, key="latency_ms")["id"]
    fastest = min(row["latency_ms"] for row in table["stitches"])
    assert client.post(f"/classify?budget={fastest / 2:.6f}ms", content=png.getvalue()).status_code == 422
    gflops = client.post("/classify?budget=1GFLOPs", content=png.getvalue()).json()
    assert gflops["stitch_id"] == best_within(table, 1e9)["id"]
    assert client.post("/classify?budget=1ms&budget_gflops=1", content=png.getvalue()).status_code == 422


def test_a_run_deploys_for_a_latency_budget(run, tmp_path):
    r = esta("deploy", "--run", str(run), "--budgets", "10s", "--out", str(tmp_path / "dep"))
    assert r.returncode == 0, r.stderr
    assert "ms" in r.stdout and (tmp_path / "dep" / "budget00").is_dir()
    r = esta("deploy", "--run", str(run), "--budgets", "1us", "--out", str(tmp_path / "dep2"))
    assert r.returncode != 0 and "below the cheapest" in r.stderr
    r = esta("deploy", "--run", str(run), "--budgets", "10ms,0.1GFLOPs", "--out", str(tmp_path / "dep3"))
    assert r.returncode != 0 and "one unit" in r.stderr


def test_requests_waiting_together_run_as_one_batch_per_stitch_with_the_same_answers(run):
    """The server's dynamic batching: concurrent requests for one stitch share a forward, each gets its own row,
    equal to its own batch-of-one forward; a failing forward fails every request that waited on it."""
    import asyncio
    import threading

    from esta.serve import _Batcher

    served, table = load_palette(run / "palette")
    calls = []

    def forward(stitch, x):
        calls.append((stitch, x.shape[0]))
        if stitch == -1:
            raise RuntimeError("broken stitch")
        return served(x, stitch=stitch).softmax(-1)

    batcher = _Batcher(forward, threading.Lock(), max_batch=4)
    images = torch.randint(0, 256, (7, 1, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    plan = [0, 0, 5, 0, 5, 0, 0]  # five requests for stitch 0 (batches of at most 4), two for stitch 5

    async def main():
        return await asyncio.gather(*(batcher.submit(s, x) for s, x in zip(plan, images)))

    answers = asyncio.run(main())
    assert sorted(calls) == [(0, 1), (0, 4), (5, 2)]
    assert (batcher.requests, batcher.forwards) == (7, 3)
    with torch.no_grad():
        for s, x, got in zip(plan, images, answers):
            torch.testing.assert_close(got, served(x, stitch=s).softmax(-1)[0], atol=1e-6, rtol=1e-5)

    async def broken():
        return await asyncio.gather(*(batcher.submit(-1, x) for x in images[:2]), return_exceptions=True)

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(broken()))
