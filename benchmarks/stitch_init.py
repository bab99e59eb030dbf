"""How good are the stitches before any task training? Each way of initialising the stitching layers, side by side.

In domain (the family's own source task, Fashion-MNIST for the shipped mini family) and with each anchor's own
pretrained head, every stitch of the palette is evaluated right after its stitching layers are initialised: no
adapter, no training. A palette whose stitches interpolate would show, in each anchor pair, accuracy rising with the
share of the end anchor (Spearman(cost, accuracy) near 1) and its most-end stitch close to the end anchor. Printed
per pair for each variant, with the seconds the initialisation took; ``--json`` writes everything.

Variants (cumulative, each adds one of esta's choices to the previous): ``sn-net`` (least squares, one layer per
window, every token alike), ``cls`` ([CLS] weighted to half of the fit), ``per-cut`` (one layer per cut),
``offsets`` (an offset per token position), ``calibrated`` (end-anchor calibration, ``--calibrate-steps``).

Run: ``python benchmarks/stitch_init.py [--examples 2000] [--calibrate-steps 20]`` (about 6 min per variant on 2
cores with 2,000 test images).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from esta.calibration import CalibrationConfig, calibrate_stitching
from esta.cost import count_costs
from esta.data import load_image_task
from esta.evaluate import accuracy
from esta.families import anchor_names, load_family
from esta.pairs import describe, pair_curves
from esta.palette import Palette

VARIANTS = {
    "sn-net": dict(stitch_layers="per-window", stitch_offsets=False, cls=0.0, calibrate=False),
    "cls": dict(stitch_layers="per-window", stitch_offsets=False, cls=0.5, calibrate=False),
    "per-cut": dict(stitch_layers="per-cut", stitch_offsets=False, cls=0.5, calibrate=False),
    "offsets": dict(stitch_layers="per-cut", stitch_offsets=True, cls=0.5, calibrate=False),
    "calibrated": dict(stitch_layers="per-cut", stitch_offsets=True, cls=0.5, calibrate=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchors", nargs="+", default=["esta-mini"])
    ap.add_argument("--data", default="fashion-mnist", help="the family's source task (its heads are kept)")
    ap.add_argument("--examples", type=int, default=2000, help="test images every stitch is evaluated on")
    ap.add_argument("--calibration-examples", type=int, default=64, help="least-squares images")
    ap.add_argument("--calibrate-steps", type=int, default=20)
    ap.add_argument("--calibrate-examples", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every stitch's accuracy and the pair figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    anchors = load_family(args.anchors, num_labels=None)  # the pretrained heads: no new head, no training
    a = anchors[0]
    task = load_image_task(args.data, image_size=a.image_size, num_channels=a.num_channels, train_examples=None)
    g = torch.Generator().manual_seed(0)
    test = torch.utils.data.Subset(task.test, torch.randperm(len(task.test), generator=g)[:args.examples].tolist())
    order = torch.randperm(len(task.train), generator=g)
    ls_images = task.train.images[order[:args.calibration_examples]]
    cal_images = task.train.images[order[args.calibration_examples:args.calibration_examples
                                         + args.calibrate_examples]]
    names = anchor_names([x.source for x in anchors])
    out = {"data": args.data, "examples": len(test), "variants": {}}
    for variant in args.variants.split(","):
        v = VARIANTS[variant]
        torch.manual_seed(0)
        palette = Palette(anchors, stitch_layers=v["stitch_layers"], stitch_offsets=v["stitch_offsets"]).eval()
        t0 = time.perf_counter()
        palette.init_stitching(ls_images, summary_weight=v["cls"])
        if v["calibrate"]:
            calibrate_stitching(palette, cal_images, CalibrationConfig(steps=args.calibrate_steps,
                                                                       examples=args.calibrate_examples))
        seconds = time.perf_counter() - t0
        costs = count_costs(palette, ls_images[:1], progress=False)
        rows = [{"id": s.id, "name": s.name, "is_anchor": s.is_anchor, "front": s.front, "end": s.end,
                 "front_last": s.front_last, "end_first": s.end_first, "flops": costs[s.id].flops,
                 "accuracy": accuracy(lambda x, s=s: palette(x, stitch=s.id), test)} for s in palette.space.stitches]
        pairs = pair_curves(rows, depths=[x.depth for x in anchors], names=names)
        print(f"== {variant}: stitching layers initialised in {seconds:.1f} s")
        for line in describe(pairs):
            print("  " + line)
        out["variants"][variant] = {"seconds": seconds, "stitches": rows, "pairs": pairs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
