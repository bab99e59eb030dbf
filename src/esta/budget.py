"""Budgets: a cost limit with its unit, so that no file converts GFLOPs or millions of parameters by hand.

A Task measures its stitches on one :class:`CostAxis` (image classification: FLOPs per image; instruction tuning:
parameters, since FLOPs grow with the text's length). Users write budgets in the axis's display unit (``0.5`` on
the FLOPs axis is 0.5 GFLOPs) or with an explicit unit (``0.5GFLOPs``, ``500MFLOPs``, ``300M``, ``1.2B``);
everything inside esta compares raw counts (FLOPs, parameters).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import EstaError


@dataclass(frozen=True)
class CostAxis:
    key: str  # the field of a StitchCost and of a result row: "flops" or "params"
    scale: float  # raw counts per display unit
    unit: str  # the display unit, e.g. "GFLOPs"

    def of(self, costs) -> list[float]:
        """Every stitch's cost on this axis (raw counts) from ``count_costs``' rows."""
        return [float(getattr(c, self.key)) for c in costs]

    def show(self, raw: float) -> str:
        return f"{raw / self.scale:.4g} {self.unit}"


FLOPS = CostAxis("flops", 1e9, "GFLOPs")
PARAMS = CostAxis("params", 1e6, "M parameters")
#: measured on a machine (``esta profile``): milliseconds per forward at the profiled batch size and threads
LATENCY = CostAxis("latency_ms", 1.0, "ms")
AXES = {a.key: a for a in (FLOPS, PARAMS, LATENCY)}

#: suffixes a budget may carry, per axis: multiplier to raw counts
_SUFFIXES = {
    "flops": {"gflops": 1e9, "mflops": 1e6, "tflops": 1e12, "flops": 1.0},
    "params": {"b": 1e9, "m": 1e6, "k": 1e3, "mparams": 1e6, "bparams": 1e9, "params": 1.0},
    "latency_ms": {"ms": 1.0, "s": 1e3, "us": 1e-3},
}


@dataclass(frozen=True)
class Budget:
    """A cost limit in raw counts on one axis."""

    value: float
    axis: CostAxis

    @classmethod
    def parse(cls, text: str | float, axis: CostAxis) -> "Budget":
        """``0.5`` (the axis's display unit), or a number with a unit of that axis (``0.5GFLOPs``, ``300M``)."""
        if isinstance(text, (int, float)):
            number, suffix = float(text), ""
        else:
            m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
            if not m:
                raise EstaError(f"cannot read budget {text!r}: budgets are numbers, optionally with a unit "
                                f"({', '.join(_SUFFIXES[axis.key])})")
            number, suffix = float(m.group(1)), m.group(2).lower()
        if suffix and suffix not in _SUFFIXES[axis.key]:
            other = [k for k, units in _SUFFIXES.items() if suffix in units and k != axis.key]
            why = f"this task's budgets are {axis.unit}" + (f", not {other[0]}" if other else "")
            raise EstaError(f"budget {text!r}: unknown unit {suffix!r} ({why})")
        value = number * (_SUFFIXES[axis.key][suffix] if suffix else axis.scale)
        if not (math.isfinite(value) and value > 0):
            raise EstaError(f"budgets must be positive numbers of {axis.unit}, got {text!r}")
        return cls(value, axis)

    def __str__(self) -> str:
        return self.axis.show(self.value)


def parse_any(text: str | float, default: CostAxis) -> Budget:
    """A budget on whichever axis its unit names (``12ms``: latency; ``0.2GFLOPs``: FLOPs; ``300M``: parameters);
    a bare number is on ``default``."""
    m = re.fullmatch(r"\s*[-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?\s*([A-Za-z]*)\s*", str(text))
    suffix = m.group(1).lower() if m else ""
    axis = next((AXES[k] for k, units in _SUFFIXES.items() if suffix in units), default) if suffix else default
    return Budget.parse(text, axis)


def parse_budgets(texts: list | str | None, axis: CostAxis) -> list[float] | None:
    """Raw-count budgets from a comma-separated string or a list (``None``/empty: none given)."""
    if texts is None or texts == "" or texts == []:
        return None
    items = [t for t in texts.split(",") if t.strip()] if isinstance(texts, str) else list(texts)
    return [Budget.parse(t, axis).value for t in items]


def check_budgets(budgets: list[float], costs: list[float], axis: CostAxis, what: str = "stitch") -> None:
    """Refuse a budget below the cheapest stitch before any work."""
    cheapest = min(costs)
    for b in budgets:
        if b < cheapest:
            raise EstaError(f"budget {axis.show(b)} is below the cheapest {what} ({axis.show(cheapest)}): "
                            "no stitch fits it")
