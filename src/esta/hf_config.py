"""The transformers configs of esta's deployed stitches (``config.json`` of a deployed folder).

Kept apart from the model classes (``esta.hf_native``) and free of esta's other modules: the families name their
config class (``Anchor.stitch_config``) and deployment writes it, below the models that read it back.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

IMAGE_TYPE = "esta_image_stitch"
CAUSAL_LM_TYPE = "esta_causal_lm_stitch"
#: the model classes of ``esta.hf_native`` that read each config (its ``architectures``)
IMAGE_ARCHITECTURE = "StitchForImageClassification"
CAUSAL_LM_ARCHITECTURE = "StitchForCausalLM"


class StitchConfig(PretrainedConfig):
    """The parts of a deployed stitch, as ``esta_stitch.json`` records them (anchor specs, cut, stitching layer;
    a three-segment route also its middle anchor and second stitching layer)."""

    def __init__(self, stitch: dict | None = None, front: dict | None = None, end: dict | None = None,
                 stitching: list[int] | None = None, esta_dtype: str = "float32", esta_meta: dict | None = None,
                 mid: dict | None = None, stitching2: list[int] | None = None, **kwargs: Any) -> None:
        self.stitch = stitch
        self.front = front
        self.end = end
        self.stitching = stitching
        self.esta_dtype = esta_dtype
        self.esta_meta = esta_meta or {}
        self.mid = mid
        self.stitching2 = stitching2
        super().__init__(**kwargs)

    def esta_config(self) -> dict:
        # getattr: transformers may build a config without calling __init__ with every field (an older config.json)
        mid = getattr(self, "mid", None)
        three = {"mid": mid, "stitching2": getattr(self, "stitching2", None)} if mid is not None else {}
        return {"stitch": self.stitch, "front": self.front, "end": self.end, "stitching": self.stitching,
                "dtype": self.esta_dtype, **three}


class StitchImageConfig(StitchConfig):
    model_type = IMAGE_TYPE


class StitchCausalLMConfig(StitchConfig):
    model_type = CAUSAL_LM_TYPE

    def __init__(self, use_cache: bool = True, **kwargs: Any) -> None:
        self.use_cache = use_cache  # generate() reads it; transformers' base config no longer keeps it
        super().__init__(**kwargs)
