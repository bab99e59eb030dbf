"""``esta profile``: every stitch's latency on this machine, into a saved palette's table.

FLOPs say how much a network computes; a device's user cares about milliseconds. The palette artifact runs any
stitch from one set of weights, so profiling it measures exactly what ``esta serve`` will run: for each stitch,
``warmup`` untimed forwards, then the median of ``repeats`` timed ones, at a given batch size and thread count.
The table then answers budgets in milliseconds (``esta serve`` requests with ``budget=12ms``,
``serving.best_within(table, 12, key="latency_ms")``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import EstaError
from .files import write_json
from .palette import Palette
from .provenance import environment
from .serving import TABLE, load_palette


def stitch_latency_ms(palette: Palette, inputs: torch.Tensor, stitch: int, warmup: int = 3,
                      repeats: int = 20) -> float:
    """Median milliseconds of ``palette(inputs, stitch=stitch)`` over ``repeats`` runs, after ``warmup``."""
    with torch.inference_mode():
        for _ in range(warmup):
            palette(inputs, stitch=stitch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            palette(inputs, stitch=stitch)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def image_input(palette: Palette, batch_size: int = 1) -> torch.Tensor:
    front = palette.anchors[0]
    if front.family != "vision":
        raise EstaError("latency is measured for image palettes only for now (a language stitch's latency depends "
                        "on the length of its text)")
    return torch.rand(batch_size, front.num_channels, front.image_size, front.image_size)


def palette_latencies(palette: Palette, stitches: list[int], batch_size: int = 1, warmup: int = 3,
                      repeats: int = 20, progress: bool = False) -> dict[int, float]:
    """Milliseconds per forward of each of ``stitches`` as a deployed network runs it: measured on a copy of the
    palette with the shared low-rank updates folded into the weights (a deployed stitch has no LoRA branch)."""
    import copy

    from .serving import fold_palette_

    served = fold_palette_(copy.deepcopy(palette).eval())
    inputs = image_input(served, batch_size)
    return {s: stitch_latency_ms(served, inputs, s, warmup, repeats)
            for s in tqdm(stitches, desc="timing stitches", disable=not progress, leave=False)}


def profile_palette(folder: str | Path, batch_size: int = 1, threads: int | None = None, warmup: int = 3,
                    repeats: int = 20, progress: bool = True) -> dict:
    """Measure every stitch of the saved palette in ``folder`` and write ``latency_ms`` into each row of its table,
    with how it was measured (batch size, threads, repeats, the machine) under ``latency``."""
    for name, v in (("batch size", batch_size), ("repeats", repeats)):
        if v < 1:
            raise EstaError(f"{name} must be at least 1, got {v}")
    if warmup < 0 or (threads is not None and threads < 1):
        raise EstaError(f"warm-up must be >= 0 and threads >= 1, got {warmup} and {threads}")
    palette, table = load_palette(folder)
    if palette.anchors[0].family != "vision":
        # a forward's time grows with the text's length and the cache: one number per stitch would mislead
        raise EstaError(f"{folder} is a {palette.anchors[0].family} palette: esta profile measures image palettes "
                        "only; budget language palettes by parameters")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        inputs = image_input(palette, batch_size)
        rows = table["stitches"]
        for row in tqdm(rows, desc="profiling stitches", disable=not progress, leave=False):
            row["latency_ms"] = stitch_latency_ms(palette, inputs, int(row["id"]), warmup, repeats)
        env = environment()
        table["latency"] = {"batch_size": batch_size, "threads": torch.get_num_threads(), "warmup": warmup,
                            "repeats": repeats, "statistic": "median", "processor": env["processor"],
                            "gpu": env["gpu"], "torch": env["torch"], "esta": env["esta"]}
    finally:
        torch.set_num_threads(before)
    write_json(Path(folder) / TABLE, table)
    return table
