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

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput

IMAGE_TYPE = "esta_image_stitch"
CAUSAL_LM_TYPE = "esta_causal_lm_stitch"


class _StitchConfig(PretrainedConfig):
    """The parts of a deployed stitch, as ``esta_stitch.json`` records them (anchor specs, cut, stitching layer)."""

    def __init__(self, stitch: dict | None = None, front: dict | None = None, end: dict | None = None,
                 stitching: list[int] | None = None, esta_dtype: str = "float32", esta_meta: dict | None = None,
                 **kwargs: Any) -> None:
        self.stitch = stitch
        self.front = front
        self.end = end
        self.stitching = stitching
        self.esta_dtype = esta_dtype
        self.esta_meta = esta_meta or {}
        super().__init__(**kwargs)

    def esta_config(self) -> dict:
        return {"stitch": self.stitch, "front": self.front, "end": self.end, "stitching": self.stitching,
                "dtype": self.esta_dtype}


class StitchImageConfig(_StitchConfig):
    model_type = IMAGE_TYPE


class StitchCausalLMConfig(_StitchConfig):
    model_type = CAUSAL_LM_TYPE

    def __init__(self, use_cache: bool = True, **kwargs: Any) -> None:
        self.use_cache = use_cache  # generate() reads it; transformers' base config no longer keeps it
        super().__init__(**kwargs)


class _StitchModel(PreTrainedModel):
    """The stitch's parts as one transformers model (state-dict keys ``front.*``, ``end.*``, ``stitching.*``, the
    same as :class:`~esta.deploy.DeployedStitch`)."""

    base_model_prefix = "esta"
    _supports_sdpa = True

    def __init__(self, config: _StitchConfig) -> None:
        super().__init__(config)
        # late: deploy imports this module to write config.json
        from .deploy import DeployedStitch

        built = DeployedStitch._build(config.esta_config())
        self.front, self.end, self.stitching = built.front, built.end, built.stitching
        self.esta_stitch = built.stitch
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Every weight comes from the saved file (a stitch is never initialised from scratch); only the buffers
        # that are not saved are rebuilt: the rotary tables (transformers' own rule) and an image anchor's
        # normalisation constants.
        from .families.vision import VisionAnchor

        if isinstance(module, VisionAnchor):
            c = module.num_channels
            with torch.no_grad():
                module._mean = torch.tensor(module.image_mean, dtype=torch.float32).view(1, c, 1, 1)
                module._std = torch.tensor(module.image_std, dtype=torch.float32).view(1, c, 1, 1)
        elif "RotaryEmbedding" in type(module).__name__:
            super()._init_weights(module)

    def _run(self, inputs: Any) -> torch.Tensor:
        # esta's modules are imported late: registration may run while one of them is being imported
        from .palette import run_stitch

        end = self.end if self.end is not None else self.front
        return run_stitch(self.front, end, self.stitching, self.esta_stitch, inputs)


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
        parts = [model.front] + ([model.end] if model.end is not None else [])
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


def hf_config(esta_config: dict, classes: list[str] | None = None) -> _StitchConfig:
    """The transformers config of a deployed stitch described by ``esta_stitch.json``'s content."""
    base = {"stitch": esta_config["stitch"], "front": esta_config["front"], "end": esta_config["end"],
            "stitching": esta_config["stitching"], "esta_dtype": esta_config.get("dtype", "float32"),
            "esta_meta": esta_config.get("meta", {})}
    family = esta_config["front"]["family"]
    if family == "vision":
        n = (esta_config["end"] or esta_config["front"])["num_labels"]
        labels = list(classes) if classes else [f"LABEL_{i}" for i in range(n)]
        return StitchImageConfig(**base, architectures=[StitchForImageClassification.__name__],
                                 id2label=dict(enumerate(labels)), label2id={c: i for i, c in enumerate(labels)},
                                 dtype=base["esta_dtype"])
    last = (esta_config["end"] or esta_config["front"])["config"]
    first = esta_config["front"]["config"]
    return StitchCausalLMConfig(**base, architectures=[StitchForCausalLM.__name__], vocab_size=last["vocab_size"],
                                bos_token_id=first.get("bos_token_id"), eos_token_id=last.get("eos_token_id"),
                                pad_token_id=first.get("pad_token_id"), tie_word_embeddings=False, use_cache=True,
                                dtype=base["esta_dtype"])


def write_transformers_files(folder: Path, esta_config: dict, front: Any, classes: list[str] | None) -> list[str]:
    """Beside a deployed stitch's weights, what transformers reads: ``config.json`` of esta's registered type and,
    for an image stitch, an image processor that only resizes and rescales (the model normalises inside). Returns
    the names written."""
    from .files import write_json

    write_json(folder / "config.json", hf_config(esta_config, classes).to_dict())
    if front.family != "vision":
        return ["config.json"]
    write_json(folder / "preprocessor_config.json", front.preprocessor_config(normalize=False))
    return ["config.json", "preprocessor_config.json"]


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


register()  # importing this module registers (esta._register imports it when the Auto classes load)


def model_card(esta_config: dict, point: dict, run: dict, command: str | None) -> str:
    """A deployed folder's ``README.md``: what it is, what it costs, how it scored, how to load it, what made it.

    ``point``: the deployed network's entry of the run's typed results (``results.json`` -> ``run`` ->
    ``deployed``); ``run``: that section's other fields (task, metric, method, seed, steps)."""
    from .budget import AXES
    from .results import METRICS

    stitch, front, end = esta_config["stitch"], esta_config["front"], esta_config["end"]
    language = front["family"] == "causal-lm"
    plain = esta_config.get("weights") == "transformers"  # a whole anchor saved as the plain transformers model
    metric, axis = METRICS[run["metric"]], AXES[run["cost_axis"]]
    if stitch["front"] == stitch["end"]:
        what = f"anchor {front['source']} (all {front['config']['num_hidden_layers']} blocks), adapted to the task"
    else:
        what = (f"blocks 0-{stitch['front_last']} of {front['source']}, a linear stitching layer, then blocks "
                f"{stitch['end_first']}-{end['config']['num_hidden_layers'] - 1} of {end['source']}")
    value = metric.show(point.get("value"))
    budget = point.get("budget")
    if language:
        imports = "AutoModelForCausalLM, AutoTokenizer"
        use = ['model = AutoModelForCausalLM.from_pretrained(".")', 'tokenizer = AutoTokenizer.from_pretrained(".")',
               'model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=32)']
    elif plain and front["config"].get("num_channels") == 1:
        # a grey plain ViT/DeiT: pipeline() makes every image RGB, which it cannot take (esta's stitches can)
        imports = "AutoImageProcessor, AutoModelForImageClassification"
        use = ['model = AutoModelForImageClassification.from_pretrained(".")',
               'processor = AutoImageProcessor.from_pretrained(".")',
               'logits = model(**processor(grey_image, return_tensors="pt")).logits']
    else:
        imports = "pipeline"
        use = ['classify = pipeline("image-classification", model=".")', "classify(image)"]
    per = " per image" if axis.key == "flops" else ""
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {'text-generation' if language else 'image-classification'}",
        "tags: [esta, stitchable-networks, model-stitching]", "---", "",
        f"# {point.get('name', stitch.get('name', 'stitch'))}: a network deployed by esta for {run['task']}", "",
        f"A stitched network from esta (Efficient Stitchable Task Adaptation): {what}.", "",
        "| | |", "|---|---|",
        f"| budget | {axis.show(budget) if budget is not None else '-'} |",
        f"| cost | {axis.show(point['cost'])}{per} ({point['params'] / 1e6:.2f} M parameters) |",
        f"| {metric.name} on held-out data | {value} |",
        f"| method, seed, steps | {run['method']}, {run['seed']}, {run['steps']} |",
        f"| chosen by | {run['deploy_by']} |", "",
        "## Use", "", "```python",
        "# a whole anchor: plain transformers, esta not needed" if plain else
        "import esta  # registers esta's model types with the Auto classes (no trust_remote_code)",
        f"from transformers import {imports}", "", *use, "```", "",
    ]
    if command:
        lines += ["## Made by", "", "```bash", command, "```", ""]
    return "\n".join(lines)
