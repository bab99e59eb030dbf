"""Vision transformers from transformers (ViT, DeiT) as anchors.

The anchor takes raw images (uint8 or float in [0, 1], ``[B, C, H, W]`` at the model's size) and applies its own
preprocessing (the mean and std of its ``preprocessor_config.json``), so a stitch normalises its input the way its
front anchor was pretrained. The head is the anchor's final LayerNorm, the first ([CLS]) token, and a task
classifier: a new one for the target task, or the pretrained one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DeiTModel, PretrainedConfig, ViTModel

from ..errors import EstaError
from ..files import write_json
from ..hf_config import IMAGE_ARCHITECTURE, StitchImageConfig
from .base import (
    Anchor,
    FamilyKind,
    OnnxIO,
    class_path,
    import_transformers_class,
    load_weights,
)

VISION_MODELS: dict[str, type] = {"vit": ViTModel, "deit": DeiTModel}
#: prefix tokens before the patches ([CLS], and DeiT's distillation token): stitched anchors must agree.
PREFIX_TOKENS = {"vit": 1, "deit": 2}


class VisionAnchor(Anchor):
    family = "vision"
    modality = "image"
    # transformers >= 5 names ViT/DeiT attention projections q_proj/k_proj/v_proj.
    default_lora_targets = ("q_proj", "k_proj", "v_proj")

    def __init__(
        self,
        config: PretrainedConfig,
        embeddings: nn.Module | None,
        blocks: nn.ModuleList,
        norm: nn.Module | None,
        classifier: nn.Module | None,
        image_mean: list[float],
        image_std: list[float],
        first_block: int = 0,
        source: str = "",
    ) -> None:
        super().__init__(config, blocks, first_block, source)
        self.embeddings = embeddings
        self.norm = norm
        self.classifier = classifier
        c = int(config.num_channels)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.register_buffer("_mean", torch.tensor(self.image_mean, dtype=torch.float32).view(1, c, 1, 1), False)
        self.register_buffer("_std", torch.tensor(self.image_std, dtype=torch.float32).view(1, c, 1, 1), False)

    # -- properties a family must agree on ---------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        s = self.config.image_size
        return int(s if isinstance(s, int) else s[0])

    @property
    def patch_size(self) -> int:
        s = self.config.patch_size
        return int(s if isinstance(s, int) else s[0])

    @property
    def num_channels(self) -> int:
        return int(self.config.num_channels)

    @property
    def fixed_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + PREFIX_TOKENS[self.config.model_type]

    @property
    def num_labels(self) -> int:
        return int(self.classifier.out_features) if isinstance(self.classifier, nn.Linear) else 0

    # -- the pieces --------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self._mean) / self._std
        return x.to(self._param_dtype())

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 4 or inputs.shape[1] != self.num_channels or inputs.shape[-1] != self.image_size:
            raise EstaError(
                f"images must be [batch, {self.num_channels}, {self.image_size}, {self.image_size}], "
                f"got {list(inputs.shape)}"
            )
        return self.embeddings(self.preprocess(inputs))

    def block(self, i: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.block_module(i)(hidden)

    def token_weights(self, hidden: torch.Tensor, summary_weight: float) -> torch.Tensor | None:
        """Give the [CLS] token ``summary_weight`` of the whole fit (0: every token counts the same, SN-Net's fit).

        Why: the head reads only [CLS], one token in 50 here; a plain fit is dominated by the patch tokens and can
        map [CLS] badly. Measured on animal-shapes (600-step demo setting, validation images): right after the
        plain fit, with each end anchor's probe head, the in-between stitches reached 11-32 % (anchors 60-66 %)."""
        if summary_weight <= 0:
            return None
        if not summary_weight < 1:
            raise EstaError(f"the [CLS] token's share of the stitching fit must be in [0, 1), got {summary_weight}")
        batch, tokens = hidden.shape[:2]
        w = torch.ones(batch, tokens, dtype=torch.float64)
        w[:, 0] = summary_weight / (1 - summary_weight) * (tokens - 1)  # CLS rows weigh this share of all rows
        return w

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the classifier sees: the final norm's [CLS] token."""
        return self.norm(hidden)[:, 0]

    def head(self, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.classifier(self.head_features(hidden))

    def embed_modules(self) -> dict[str, nn.Module]:
        return {"embeddings": self.embeddings} if self.embeddings is not None else {}

    def head_modules(self) -> dict[str, nn.Module]:
        return {"norm": self.norm, "classifier": self.classifier} if self.classifier is not None else {}

    def task_head(self) -> nn.Module | None:
        return self.classifier

    def _param_dtype(self) -> torch.dtype:
        return next(self.blocks.parameters()).dtype

    def new_task_head(self, num_labels: int) -> None:
        """Replace the classifier by a fresh one for ``num_labels`` classes (trunc-normal, std 0.02, as ViT)."""
        head = nn.Linear(self.width, num_labels, dtype=self._param_dtype())
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.classifier = head

    # -- saving parts ------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        config = self.config.to_dict()
        # Merged stitch-specific biases need a bias on every adapted projection.
        config["qkv_bias"] = True
        return {
            "family": self.family,
            "config": config,
            "embeddings_class": class_path(self.embeddings),
            "block_class": class_path(self.blocks[0]),
            "num_labels": self.num_labels,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "source": self.source,
        }

    def to_transformers(self, classes: list[str] | None = None):
        """This whole anchor (embedding, every block, final norm, classifier) as the plain transformers model
        (``ViTForImageClassification`` / ``DeiTForImageClassification``) with the task's labels: it loads and runs
        with transformers alone. Its input is ``pixel_values`` normalised as ``preprocessor_config()`` says."""
        from transformers import DeiTForImageClassification, ViTForImageClassification

        if self.embeddings is None or self.classifier is None or self.first_block != 0:
            raise EstaError("only a whole anchor (embedding, all blocks, head) converts to a transformers model")
        kinds = {"vit": ViTForImageClassification, "deit": DeiTForImageClassification}
        config = type(self.config).from_dict(self.config.to_dict())
        labels = list(classes) if classes else [f"LABEL_{i}" for i in range(self.num_labels)]
        if len(labels) != self.num_labels:
            raise EstaError(f"{len(labels)} class names for a head of {self.num_labels} classes")
        config.id2label = dict(enumerate(labels))
        config.label2id = {c: i for i, c in enumerate(labels)}
        config.qkv_bias = True  # merged stitch-specific biases live on every adapted projection
        config.architectures = [kinds[config.model_type].__name__]
        model = kinds[config.model_type](config)
        base = getattr(model, model.base_model_prefix)
        base.embeddings.load_state_dict(self.embeddings.state_dict())
        for dst, src in zip(base.layers, self.blocks, strict=True):
            dst.load_state_dict(src.state_dict())
        base.layernorm.load_state_dict(self.norm.state_dict())
        model.classifier.load_state_dict(self.classifier.state_dict())
        return model.to(self._param_dtype()).eval()

    def preprocessor_config(self, normalize: bool = True) -> dict:
        """What transformers' image processor needs to feed :meth:`to_transformers`'s model as esta feeds this
        (``normalize=False``: for a model that normalises inside, as esta's own stitches do)."""
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                "size": {"height": self.image_size, "width": self.image_size}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": normalize, "image_mean": self.image_mean,
                "image_std": self.image_std,
                # grey models take grey images as they are (the processor would otherwise make them RGB)
                "do_convert_rgb": self.num_channels == 3}

    def init_buffers(self) -> None:
        c = self.num_channels
        with torch.no_grad():
            self._mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, c, 1, 1)
            self._std = torch.tensor(self.image_std, dtype=torch.float32).view(1, c, 1, 1)

    @classmethod
    def stitch_config(cls, parts: dict, esta_config: dict, classes: list[str] | None) -> StitchImageConfig:
        n = (esta_config["end"] or esta_config["front"])["num_labels"]
        labels = list(classes) if classes else [f"LABEL_{i}" for i in range(n)]
        return StitchImageConfig(**parts, architectures=[IMAGE_ARCHITECTURE],
                                 id2label=dict(enumerate(labels)), label2id={c: i for i, c in enumerate(labels)},
                                 dtype=parts["esta_dtype"])

    def write_processor_files(self, folder: Any, normalize: bool) -> list[str]:
        write_json(Path(folder) / "preprocessor_config.json", self.preprocessor_config(normalize=normalize))
        return ["preprocessor_config.json"]

    @classmethod
    def card_usage(cls, front_spec: dict, plain: bool) -> tuple[str, str, list[str]]:
        if plain and front_spec["config"].get("num_channels") == 1:
            # a grey plain ViT/DeiT: pipeline() makes every image RGB, which it cannot take (esta's stitches can)
            return "image-classification", "AutoImageProcessor, AutoModelForImageClassification", [
                'model = AutoModelForImageClassification.from_pretrained(".")',
                'processor = AutoImageProcessor.from_pretrained(".")',
                'logits = model(**processor(grey_image, return_tensors="pt")).logits']
        return "image-classification", "pipeline", [
            'classify = pipeline("image-classification", model=".")', "classify(image)"]

    def onnx_io(self) -> OnnxIO:
        # float32 [batch, channels, height, width] in [0, 1]; the stitch's own normalisation is inside the graph
        image = (self.num_channels, self.image_size, self.image_size)
        batch = torch.export.Dim("batch", min=1, max=4096)
        return OnnxIO(names=["pixel_values"],
                      example=(torch.rand(2, *image, generator=torch.Generator().manual_seed(0)),),
                      check=(torch.rand(5, *image, generator=torch.Generator().manual_seed(1)),),  # not the traced
                      dynamic={"pixel_values": {0: batch}}, shape=("batch", *image),
                      to_inputs=lambda pixel_values: pixel_values)

    @classmethod
    def build_part(cls, spec: dict, first_block: int, last_block: int, embed: bool, head: bool) -> "VisionAnchor":
        cfg = dict(spec["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config._attn_implementation = "sdpa"  # what from_pretrained picks on CPU; standalone modules get none
        block_cls = import_transformers_class(spec["block_class"])
        blocks = nn.ModuleList([block_cls(config) for _ in range(first_block, last_block + 1)])
        embeddings = import_transformers_class(spec["embeddings_class"])(config) if embed else None
        norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if head else None
        classifier = nn.Linear(config.hidden_size, spec["num_labels"]) if head else None
        return cls(config, embeddings, blocks, norm, classifier, spec["image_mean"], spec["image_std"],
                   first_block=first_block, source=spec.get("source", ""))


def _preprocessing(source: str, config: PretrainedConfig, local: bool) -> tuple[list[float], list[float]]:
    """Image mean/std from the checkpoint's ``preprocessor_config.json``; ViT's 0.5/0.5 when it has none."""
    data = None
    if local:
        p = Path(source) / "preprocessor_config.json"
        if p.is_file():
            data = json.loads(p.read_text())
    else:
        try:
            from transformers.utils import cached_file

            f = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
            data = json.loads(Path(f).read_text()) if f else None
        except Exception:  # noqa: BLE001 - a missing processor file only means the defaults apply
            data = None
    c = int(config.num_channels)
    mean = (data or {}).get("image_mean", [0.5] * c)
    std = (data or {}).get("image_std", [0.5] * c)
    mean = [float(v) for v in (mean if isinstance(mean, list) else [mean] * c)]
    std = [float(v) for v in (std if isinstance(std, list) else [std] * c)]
    if len(mean) != c or len(std) != c:
        raise EstaError(f"{source}: preprocessor_config.json has {len(mean)} mean values for {c} channels")
    return mean, std


def load_vision_anchor(source: str, config: PretrainedConfig, num_labels: int | None, local: bool,
                       dtype: torch.dtype = torch.float32) -> VisionAnchor:
    """A ViT/DeiT anchor from a hub id or a local folder (any ``*Model`` / ``*ForImageClassification`` checkpoint).

    ``num_labels`` given: a new task head for that many classes. ``None``: keep the pretrained classifier.
    """
    classifier = None
    if num_labels is None:
        from transformers import AutoModelForImageClassification

        if not any(a.endswith("ForImageClassification") for a in (config.architectures or [])):
            raise EstaError(f"{source} has no image-classification head: give the number of target classes")
        full = load_weights(source, lambda: AutoModelForImageClassification.from_pretrained(
            source, dtype=dtype, local_files_only=local, trust_remote_code=False, use_safetensors=local or None))
        model = getattr(full, full.base_model_prefix)
        classifier = getattr(full, "classifier", None) or getattr(full, "cls_classifier", None)
        if not isinstance(classifier, nn.Linear):
            raise EstaError(f"{source}: cannot find a linear classifier head")
    else:
        # The base model loads from classification checkpoints too (their "vit."/"deit." prefix is stripped).
        model = load_weights(source, lambda: VISION_MODELS[config.model_type].from_pretrained(
            source, add_pooling_layer=False, dtype=dtype, local_files_only=local, use_safetensors=local or None))
    model.requires_grad_(False)
    mean, std = _preprocessing(source, config, local)
    anchor = VisionAnchor(model.config, model.embeddings, model.layers, model.layernorm, classifier, mean, std,
                          source=source)
    if num_labels is not None:
        anchor.new_task_head(num_labels)
    return anchor


def check_vision_family(sources: list[str], configs: list) -> None:
    """Every anchor of a vision family needs the same image size, patch size, channels and prefix tokens."""
    def fields(c) -> dict:
        as_int = lambda v: int(v if isinstance(v, int) else v[0])  # noqa: E731
        return {"image_size": as_int(c.image_size), "patch_size": as_int(c.patch_size),
                "num_channels": int(c.num_channels), "prefix tokens": PREFIX_TOKENS[c.model_type]}

    ref = fields(configs[0])
    for src, c in zip(sources[1:], configs[1:]):
        for k, v in fields(c).items():
            if v != ref[k]:
                raise EstaError(
                    f"anchors cannot be stitched: {k} differs ({sources[0]}: {ref[k]}, {src}: {v}); "
                    "every anchor of a vision family needs the same image size, patch size, channels and prefix tokens"
                )


FAMILY = FamilyKind("vision", VisionAnchor, tuple(VISION_MODELS),
                    lambda source, config, num_labels, local, dtype: load_vision_anchor(source, config, num_labels,
                                                                                       local, dtype),
                    check_vision_family)
