"""``esta profile``: every stitch's latency on this machine, into a saved palette's table.

FLOPs say how much a network computes; a device's user cares about milliseconds. The palette artifact runs any
stitch from one set of weights, so profiling it measures exactly what ``esta serve`` will run: for each stitch,
``warmup`` untimed forwards, then the median of ``repeats`` timed ones, at a given batch size and thread count.
The table then answers budgets in milliseconds (``esta serve`` requests with ``budget=12ms``,
``selection.best_within(table, 12, key="latency_ms")``).

A language stitch has no single forward time (it grows with the text and its cache), so its latency is what a
user of a text generator feels: **milliseconds per generated token**, the median of cached one-token decode steps
after a prompt of ``prompt_tokens`` random tokens (prefill untimed), as ``/generate`` runs them.
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
    return torch.rand(batch_size, front.num_channels, front.image_size, front.image_size)


#: a language stitch's latency is timed after a prompt of this many tokens (or fewer where the context is short)
PROMPT_TOKENS = 64


def decode_latency_ms(palette: Palette, stitch: int, batch_size: int = 1, prompt_tokens: int = PROMPT_TOKENS,
                      warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds per generated token of a language stitch: the time between tokens of the very loop
    ``/generate`` runs (``generate.generate_ids``, greedy, KV cache), ``warmup`` untimed then ``repeats`` timed,
    after an untimed prefill of ``prompt_tokens`` random tokens."""
    from .generate import context_length, generate_ids

    context = context_length(palette.anchors)
    prompt_tokens = min(prompt_tokens, context - warmup - repeats - 1)
    if prompt_tokens < 1:
        raise EstaError(f"the palette's context ({context} tokens) is too short for {warmup} + {repeats} timed steps")
    ids = torch.randint(0, palette.anchors[0].vocab_size, (batch_size, prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    tokens = generate_ids(lambda x: palette(x, stitch=stitch), ids, 1 + warmup + repeats)
    next(tokens)  # the prefill's token
    times, t0 = [], time.perf_counter()
    for i, _ in enumerate(tokens):  # each further token is one cached decode step
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(1e3 * (t1 - t0))
        t0 = t1
    return statistics.median(times)


def _forward_timer(palette: Palette, batch_size: int, warmup: int, repeats: int, prompt_tokens: int):
    inputs = image_input(palette, batch_size)
    return lambda s: stitch_latency_ms(palette, inputs, s, warmup, repeats)


def _token_timer(palette: Palette, batch_size: int, warmup: int, repeats: int, prompt_tokens: int):
    return lambda s: decode_latency_ms(palette, s, batch_size, prompt_tokens, warmup, repeats)


#: how a palette of each modality (``Anchor.modality``) is timed, and the unit of the figure
TIMERS = {"image": (_forward_timer, "ms per forward"), "text": (_token_timer, "ms per generated token")}


def _timer(palette: Palette):
    modality = palette.anchors[0].modality
    if modality not in TIMERS:
        raise EstaError(f"esta cannot time a palette of {modality or 'unknown'} inputs (it times "
                        f"{', '.join(TIMERS)})")
    return TIMERS[modality]


def _latency(palette: Palette, batch_size: int, warmup: int, repeats: int, prompt_tokens: int):
    """``stitch -> milliseconds``, as the palette's modality measures it (per image forward, or per token)."""
    return _timer(palette)[0](palette, batch_size, warmup, repeats, prompt_tokens)


def palette_latencies(palette: Palette, stitches: list[int], batch_size: int = 1, warmup: int = 3,
                      repeats: int = 20, progress: bool = False,
                      prompt_tokens: int = PROMPT_TOKENS) -> dict[int, float]:
    """Milliseconds of each of ``stitches`` (per forward, or per generated token for a language palette) as a
    deployed network runs it: measured on a copy of the palette with the shared low-rank updates folded into the
    weights (a deployed stitch has no LoRA branch)."""
    import copy

    from .serving import fold_palette_

    served = fold_palette_(copy.deepcopy(palette).eval())
    timer = _latency(served, batch_size, warmup, repeats, prompt_tokens)
    return {s: timer(s) for s in tqdm(stitches, desc="timing stitches", disable=not progress, leave=False)}


def summary_line(table: dict, folder: str | Path) -> str:
    """One line on a profiled table: how many stitches, the fastest and the slowest, how they were timed."""
    rows = sorted((r for r in table["stitches"] if r["latency_ms"] is not None), key=lambda r: r["latency_ms"])
    lat = table["latency"]
    return (f"{len(rows)} stitches at batch {lat['batch_size']}, {lat['threads']} threads ({lat['processor']}): "
            f"{rows[0]['latency_ms']:.2f} ms ({rows[0]['name']}) to {rows[-1]['latency_ms']:.2f} ms "
            f"({rows[-1]['name']}), {lat['unit']}; written to {Path(folder) / TABLE}")


def profile_palette(folder: str | Path, batch_size: int = 1, threads: int | None = None, warmup: int = 3,
                    repeats: int = 20, progress: bool = True, prompt_tokens: int | None = None) -> dict:
    """Measure every servable stitch of the saved palette in ``folder`` and write ``latency_ms`` into each row of
    its table (per image forward; for a language palette, per generated token after ``prompt_tokens``), with how it
    was measured (batch size, threads, repeats, unit, the machine) under ``latency``."""
    prompt_tokens = PROMPT_TOKENS if prompt_tokens is None else prompt_tokens
    for name, v in (("batch size", batch_size), ("repeats", repeats), ("prompt tokens", prompt_tokens)):
        if v < 1:
            raise EstaError(f"{name} must be at least 1, got {v}")
    if warmup < 0 or (threads is not None and threads < 1):
        raise EstaError(f"warm-up must be >= 0 and threads >= 1, got {warmup} and {threads}")
    palette, table = load_palette(folder)
    unit = _timer(palette)[1]
    per_token = palette.anchors[0].modality == "text"
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        timer = _latency(palette, batch_size, warmup, repeats, prompt_tokens)
        rows = table["stitches"]
        for row in tqdm(rows, desc="profiling stitches", disable=not progress, leave=False):
            # a stitch screening dropped before training is never served: not timed
            row["latency_ms"] = timer(int(row["id"])) if row.get("servable", True) else None
        env = environment()
        table["latency"] = {"batch_size": batch_size, "threads": torch.get_num_threads(), "warmup": warmup,
                            "repeats": repeats, "statistic": "median",
                            "unit": unit, **({"prompt_tokens": prompt_tokens} if per_token else {}),
                            "processor": env["processor"], "gpu": env["gpu"], "torch": env["torch"],
                            "esta": env["esta"]}
    finally:
        torch.set_num_threads(before)
    write_json(Path(folder) / TABLE, table)
    return table
