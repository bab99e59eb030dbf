"""What stitching costs at training and at inference, measured side by side in one run.

0. An ESTA training step against an SN-Net training step (full fine-tuning of anchors and stitching layers, as
   SN-Net's direct adaptation) on the same stitch and batch, with where the time goes: forward, backward, the
   importance score, the optimizer step.
1. An ESTA training step on a stitch (sample bookkeeping, forward through the palette, backward, SNIP score,
   AdamW step) against a PEFT LoRA step (same rank, same q/k/v targets, same optimizer) on a plain model made of
   the same blocks (the deployed stitch with PEFT's LoRA injected).
2. The same for the largest anchor alone: ESTA's anchor stitch against PEFT LoRA on that anchor.
3. Inference latency of the deployed, merged stitch against the same blocks called directly as a plain model.

Rounds alternate between the two sides of each ratio and the medians are compared, so machine noise hits both.
Run: ``python benchmarks/step_overhead.py`` (``--rounds``, ``--batch-size``, ``--stitch``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from esta import DeployedStitch, Palette, PSTConfig, load_family
from esta.families import quiet_transformers
from esta.importance import snip_score


def timed(fn, warmup: int = 3) -> callable:
    for _ in range(warmup):
        fn()

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return once


def esta_step(palette: Palette, stitch: int, x: torch.Tensor, y: torch.Tensor, parts: dict | None = None,
              score: bool = True):
    """One training step as ``train.train`` runs it; ``parts`` collects the time of each phase."""
    params = [p for p in palette.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    path = palette.path_parameters(stitch)

    def step() -> None:
        t0 = time.perf_counter()
        loss = F.cross_entropy(palette(x, stitch=stitch), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if score:
            snip_score(path)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if parts is not None:
            for k, v in zip(("forward", "backward", "score", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts.setdefault(k, []).append(v)
    return step


def peft_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, alpha: float,
              head: torch.nn.Module):
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)
    model = inject_adapter_in_model(cfg, model)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    head.requires_grad_(True)  # the task head trains in both
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def anchors_copy(sources: list[str]):
    with quiet_transformers():
        torch.manual_seed(0)
        return load_family(sources, num_labels=10)


def plain_forward(model: DeployedStitch):
    """The deployed stitch's modules called directly, with no esta code in between."""
    front, end, layer, s = model.front, model.end or model.front, model.stitching, model.stitch

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = front.embeddings(front.preprocess(x))
        last = front.depth if s.is_anchor else s.front_last + 1
        for blk in front.blocks[:last]:
            h = blk(h)
        if not s.is_anchor:
            h = layer(h)
            for blk in end.blocks:
                h = blk(h)
        return end.classifier(end.norm(h)[:, 0])
    return forward


def ratio(a, b, rounds: int) -> tuple[float, float, float]:
    ta, tb = [], []
    for _ in range(rounds):  # alternate, so a burst of noise lands on both sides
        ta.append(a())
        tb.append(b())
    ma, mb = statistics.median(ta), statistics.median(tb)
    return ma, mb, ma / mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", nargs="+", default=["esta-mini"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--stitch", type=int, default=None, help="stitch id (default: the middle S->B stitch)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with quiet_transformers():
        anchors = load_family(args.anchors, num_labels=10)
    size, ch = anchors[0].image_size, anchors[0].num_channels
    x = torch.randint(0, 256, (args.batch_size, ch, size, size), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch_size,))
    palette = Palette(anchors)
    palette.init_stitching(x)
    full = Palette(anchors_copy(args.anchors))  # SN-Net: the same family, every weight trainable
    full.load_state_dict(palette.state_dict())
    full.apply_pst(PSTConfig(full_finetune=True))
    pst = PSTConfig()
    palette.apply_pst(pst)
    last = len(anchors) - 1
    largest = palette.space.anchor_ids()[-1]
    cuts = [s for s in palette.space.stitches if not s.is_anchor and s.end == last]
    stitch = args.stitch if args.stitch is not None else cuts[len(cuts) // 2].id
    palette.train()

    print(f"stitch {palette.space[stitch].name}, batch {args.batch_size}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    rows = []
    parts_esta: dict = {}
    parts_full: dict = {}
    full.train()
    a = timed(esta_step(palette, stitch, x, y, parts_esta))
    b = timed(esta_step(full, stitch, x, y, parts_full, score=False))  # SN-Net samples uniformly: no score
    for d in (parts_esta, parts_full):
        d.clear()
    ma, mb, r = ratio(a, b, args.rounds)
    rows.append(("train step, stitch: ESTA (PST) / SN-Net (full fine-tuning)", ma, mb, r))
    breakdown = {k: (statistics.median(parts_esta[k]), statistics.median(parts_full[k])) for k in parts_esta}
    for label, sid in (("stitch", stitch), ("largest anchor", largest)):
        plain = DeployedStitch.from_palette(palette, sid).train()
        head = (plain.end or plain.front).classifier
        a = timed(esta_step(palette, sid, x, y))
        b = timed(peft_step(plain, x, y, pst.lora_rank, pst.lora_alpha, head))
        ma, mb, r = ratio(a, b, args.rounds)
        rows.append((f"train step, {label}: ESTA / PEFT LoRA on the same blocks", ma, mb, r))

    deployed = DeployedStitch.from_palette(palette, stitch).eval()
    plain = plain_forward(deployed)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), plain(x))
        a, b = timed(lambda: deployed(x)), timed(lambda: plain(x))
        ma, mb, r = ratio(a, b, args.rounds)
    rows.append(("inference, deployed stitch / the same blocks as a plain model", ma, mb, r))

    for name, ma, mb, r in rows:
        print(f"{name:66s} {1e3 * ma:8.2f} ms / {1e3 * mb:8.2f} ms = {r:.3f}x")
    print("where the time of a step goes (medians, ms): ESTA / SN-Net")
    for k, (e, f) in breakdown.items():
        print(f"  {k:10s} {1e3 * e:8.2f} / {1e3 * f:8.2f}")


if __name__ == "__main__":
    main()
