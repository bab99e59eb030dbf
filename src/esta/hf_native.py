"""Deployed stitches as transformers models: ``AutoModelForImageClassification``, ``AutoModelForCausalLM``,
``pipeline`` and ``generate()`` take a deployed folder once esta is imported (no ``trust_remote_code``: esta
registers its two model types with the Auto classes itself, see ``esta._register``).

A deployed folder holds one ``model.safetensors`` that both readers share: esta's own ``esta_stitch.json`` and
transformers' ``config.json`` (``model_type`` ``esta_image_stitch`` or ``esta_causal_lm_stitch``) describe the same
parts, built by the same code (``DeployedStitch._build``), so the two forwards are one forward.

Image stitches take ``pixel_values`` in [0, 1] (the image processor saved beside them only resizes and rescales);
the front anchor's own normalisation runs inside the model, as in esta and in the ONNX export. A grey model given
RGB pixels (``pipeline`` always converts images to RGB) reads their luma, as PIL's ``convert("L")`` would.

Language stitches carry one KV cache per part (:class:`StitchCache`): each anchor keeps its own layer numbering,
rotary table and masks, exactly as in esta's own generation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput

from .hf_config import (
    CAUSAL_LM_ARCHITECTURE,
    CAUSAL_LM_TYPE,
    IMAGE_ARCHITECTURE,
    IMAGE_TYPE,
    StitchCausalLMConfig,
    StitchConfig,
    StitchImageConfig,
)

__all__ = ["CAUSAL_LM_TYPE", "IMAGE_TYPE", "StitchCausalLMConfig", "StitchImageConfig", "StitchForImageClassification",
           "StitchForCausalLM", "register"]

class _StitchModel(PreTrainedModel):
    """The stitch's parts as one transformers model (state-dict keys ``front.*``, ``end.*``, ``stitching.*``, the
    same as :class:`~esta.deploy.DeployedStitch`)."""

    base_model_prefix = "esta"
    _supports_sdpa = True

    def __init__(self, config: StitchConfig) -> None:
        super().__init__(config)
        # late: deploy imports this module to write config.json
        from .deploy import DeployedStitch

        built = DeployedStitch._build(config.esta_config())
        self.front, self.end, self.stitching = built.front, built.end, built.stitching
        if getattr(built, "mid", None) is not None:  # a three-segment route (keys mid.*, stitching2.*)
            self.mid, self.stitching2 = built.mid, built.stitching2
        self.esta_stitch = built.stitch
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Every weight comes from the saved file (a stitch is never initialised from scratch); only the buffers
        # that are not saved are rebuilt: the rotary tables (transformers' own rule) and an image anchor's
        # normalisation constants.
        from .families.base import Anchor

        if isinstance(module, Anchor):
            module.init_buffers()
        elif "RotaryEmbedding" in type(module).__name__:
            super()._init_weights(module)

    def _run(self, inputs: Any) -> torch.Tensor:
        # esta's modules are imported late: registration may run while one of them is being imported
        from .deploy import stitch_parts
        from .palette import run_stitch

        return run_stitch(*stitch_parts(self), self.esta_stitch, inputs)


class StitchForImageClassification(_StitchModel):
    config_class = StitchImageConfig
    main_input_name = "pixel_values"

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> ImageClassifierOutput | tuple:
        channels = self.front.num_channels
        if pixel_values.dim() == 4 and channels == 1 and pixel_values.shape[1] == 3:
            # ITU-R 601 luma, PIL's convert("L"): a grey image made RGB by the pipeline comes back unchanged
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=pixel_values.dtype, device=pixel_values.device)
            pixel_values = (pixel_values * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        logits = self._run(pixel_values)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutput(loss=loss, logits=logits)


class StitchCache(Cache):
    """One ``DynamicCache`` per part of a stitch, seen by ``generate()`` as one cache: its layers are both parts'
    layers (so reordering for beam search, cropping and batch expansion reach every one), and its length is the
    front part's."""

    def __init__(self, model: "StitchForCausalLM") -> None:
        from .deploy import stitch_parts  # late, as in _StitchModel._run

        parts, _ = stitch_parts(model)
        self.by_part = {id(p): DynamicCache(config=p.config) for p in parts}  # keyed as the anchors look them up
        super().__init__(layers=[layer for c in self.by_part.values() for layer in c.layers])


class StitchForCausalLM(_StitchModel, GenerationMixin):
    config_class = StitchCausalLMConfig
    main_input_name = "input_ids"

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make one DynamicCache for both parts: forward makes a StitchCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.front.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return (self.end if self.end is not None else self.front).lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("an esta stitch takes input_ids (its front anchor embeds them), not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = StitchCache(self)
        if cache is not None and not isinstance(cache, StitchCache):
            raise ValueError(f"an esta stitch keeps one cache per part: pass a StitchCache or none, not "
                             f"{type(cache).__name__}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "caches": cache.by_part if cache is not None else None}
        logits = self._run(inputs)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:  # next-token loss, -100 ignored (transformers' convention)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


def register() -> None:
    """Make the Auto classes know esta's model types (what ``import esta`` arranges; safe to call twice)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
    )

    for config, model, auto in ((StitchImageConfig, StitchForImageClassification, AutoModelForImageClassification),
                                (StitchCausalLMConfig, StitchForCausalLM, AutoModelForCausalLM)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        auto.register(config, model, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)


# the configs name these classes by string (esta.hf_config): keep the names in step
assert StitchForImageClassification.__name__ == IMAGE_ARCHITECTURE
assert StitchForCausalLM.__name__ == CAUSAL_LM_ARCHITECTURE
register()  # importing this module registers (esta._register imports it when the Auto classes load)
