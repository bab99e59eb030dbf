"""Kept for existing imports: the language job now lives in ``esta.tasks.instruction_tuning`` (its Task) and
``esta.recipe`` (the job every Task shares)."""

from .instruct import record_text, whole_text
from .lm_eval import flag_outside_anchors
from .report import plot_lm
from .tasks.instruction_tuning import LMAdaptConfig, adapt_lm

__all__ = ["LMAdaptConfig", "adapt_lm", "flag_outside_anchors", "plot_lm", "record_text", "whole_text"]
