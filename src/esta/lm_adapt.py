"""Kept for existing imports: the language job now lives in ``esta.tasks.instruction_tuning`` (its Task) and
``esta.recipe`` (the job every Task shares)."""

from .instruct import record_text, whole_text
from .lm_eval import flag_outside_anchors
from .recipe import run
from .report import plot_lm
from .tasks.instruction_tuning import LMAdaptConfig


def adapt_lm(config: LMAdaptConfig) -> dict:
    """The whole job for instruction tuning (``esta.run``)."""
    return run(config)

__all__ = ["LMAdaptConfig", "adapt_lm", "flag_outside_anchors", "plot_lm", "record_text", "whole_text"]
