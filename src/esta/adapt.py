"""Kept for existing imports: the image job now lives in ``esta.tasks.image_classification`` (its Task) and
``esta.recipe`` (the job every Task shares)."""

from .data import held_out_sets, materialize, warn_missing_classes
from .probe import probe_heads
from .recipe import RESUMABLE_CHANGES, check_resumable, compare_alone, export_choices, run
from .selection import DEPLOY_RULES, select
from .tasks.image_classification import AdaptConfig, write_report


def adapt(config: AdaptConfig) -> dict:
    """The whole job for an image task (``esta.run``)."""
    return run(config)


__all__ = ["AdaptConfig", "adapt", "compare_alone", "probe_heads", "write_report", "held_out_sets", "materialize",
           "warn_missing_classes", "DEPLOY_RULES", "RESUMABLE_CHANGES", "check_resumable", "export_choices", "select"]
