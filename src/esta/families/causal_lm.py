"""Causal language models from transformers (LLaMA, Qwen2, Mistral architectures) as anchors.

Inputs are a dict ``{"input_ids": [B, T], "attention_mask": [B, T] (optional), "caches": {...} (optional)}``. Each
anchor computes its own context from them: its own rotary table (head sizes and rope settings differ across
sizes), its own causal / sliding-window masks, and its own KV cache, kept in ``inputs["caches"]`` under the
anchor's identity. A stitch therefore carries one cache per part, and every block writes to its own anchor's cache
at its own layer index. The head is the anchor's final RMSNorm and LM head (both frozen: the task is language).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache, PretrainedConfig

from ..errors import EstaError
from ..hf_config import CAUSAL_LM_ARCHITECTURE, StitchCausalLMConfig
from .base import (
    Anchor,
    FamilyKind,
    OnnxIO,
    class_path,
    import_transformers_class,
    load_weights,
)

log = logging.getLogger("esta")

LM_MODELS = ("llama", "qwen2", "mistral")


class CausalLMAnchor(Anchor):
    family = "causal-lm"
    modality = "text"
    score = "perplexity"
    default_lora_targets = ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: PretrainedConfig, embed_tokens: nn.Module | None, blocks: nn.ModuleList,
                 norm: nn.Module | None, lm_head: nn.Module | None, rotary: nn.Module, first_block: int = 0,
                 source: str = "") -> None:
        super().__init__(config, blocks, first_block, source)
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = rotary

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    # -- the pieces --------------------------------------------------------------------------------------------
    def embed(self, inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        if ids.dim() != 2:
            raise EstaError(f"input_ids must be [batch, tokens], got {list(ids.shape)}")
        return self.embed_tokens(ids)

    def context(self, inputs: dict, hidden: torch.Tensor, first: int = 0) -> dict:
        # imported here: transformers.masking_utils pulls in torch._dynamo (2 s), which no vision run needs
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        caches = inputs.get("caches")
        cache = None
        if caches is not None:  # one cache per anchor (per part of a stitch), created on first use
            cache = caches.setdefault(id(self), DynamicCache(config=self.config))
        # The past is read from the layers this run writes: an end part starts at block ``first``, and its cache's
        # earlier layers stay empty (reading layer 0 put every cached token of an end part at position 0).
        types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * (first + 1))
        past = cache.get_seq_length(first) if cache is not None else 0
        position_ids = inputs.get("position_ids")
        if position_ids is None:
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        mask_kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=inputs.get("attention_mask"),
                           cache=cache, position_ids=position_ids)

        def sized_by(kind: str) -> int:  # the first layer of this kind that this run writes
            return next((i for i in range(first, len(types)) if types[i] == kind), first)

        masks = {"full_attention": create_causal_mask(**mask_kwargs, layer_idx=sized_by("full_attention"))}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(
                **mask_kwargs, layer_idx=sized_by("sliding_attention"))
        return {"position_embeddings": self.rotary(hidden, position_ids), "position_ids": position_ids,
                "masks": masks, "cache": cache}

    def block(self, i: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        types = getattr(self.config, "layer_types", None)
        kind = types[i] if types else "full_attention"
        out = self.block_module(i)(hidden, attention_mask=ctx["masks"][kind],
                                   position_embeddings=ctx["position_embeddings"],
                                   position_ids=ctx["position_ids"], cache=ctx["cache"],
                                   use_cache=ctx["cache"] is not None)
        return out[0] if isinstance(out, tuple) else out

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads: the final norm's hidden states, every token."""
        return self.norm(hidden)

    def head(self, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.lm_head(self.head_features(hidden))

    def token_mask(self, inputs: dict) -> torch.Tensor | None:
        """The tokens the stitching layers are fitted on: no padding, and not the first token.

        The first token is the attention sink: from the second block on its hidden state carries "massive
        activations" (entries of 300-3,000 in Qwen2.5 against 5-15 on other tokens) that dominate a squared error and
        appear at different depths in different sizes. Fitted with it, the early-cut Qwen2.5-Coder 0.5B->1.5B stitch
        had perplexity 1,920 at init; fitted without it, 18 (anchors 19 and 13).
        """
        ids = inputs["input_ids"]
        m = inputs.get("attention_mask")
        m = m.bool().clone() if m is not None else torch.ones_like(ids, dtype=torch.bool)
        m[:, 0] = False
        return m

    def embed_modules(self) -> dict[str, nn.Module]:
        return {"embed_tokens": self.embed_tokens} if self.embed_tokens is not None else {}

    def head_modules(self) -> dict[str, nn.Module]:
        return {"norm": self.norm, "lm_head": self.lm_head} if self.lm_head is not None else {}

    # -- saving parts ------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        config = self.config.to_dict()
        if config.get("model_type") in ("llama", "mistral"):
            config["attention_bias"] = True  # merged stitch-specific biases need a bias on q/k/v (and o)
        config["tie_word_embeddings"] = False  # a stitch's embedding and LM head come from different anchors
        return {"family": self.family, "config": config, "block_class": class_path(self.blocks[0]),
                "norm_class": class_path(self.norm if self.norm is not None else self.blocks[0].input_layernorm),
                "rotary_class": class_path(self.rotary), "source": self.source}

    def to_transformers(self, classes: list[str] | None = None):
        """This whole anchor as the plain transformers model (``Qwen2ForCausalLM``, ``LlamaForCausalLM``, ...): it
        loads and generates with transformers alone. ``classes`` is unused (a language model has none)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        if self.embed_tokens is None or self.lm_head is None or self.first_block != 0:
            raise EstaError("only a whole anchor (embedding, all blocks, head) converts to a transformers model")
        cfg = dict(self.spec()["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        dtype = self.embed_tokens.weight.dtype
        with no_init_weights():  # every weight is copied below: no random initialisation of a 1.5B model
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.model.embed_tokens.load_state_dict(self.embed_tokens.state_dict())
        for dst, src in zip(model.model.layers, self.blocks, strict=True):
            dst.load_state_dict(src.state_dict())
        model.model.norm.load_state_dict(self.norm.state_dict())
        model.lm_head.load_state_dict(self.lm_head.state_dict())
        return model.eval()

    @classmethod
    def stitch_config(cls, parts: dict, esta_config: dict, classes: list[str] | None) -> StitchCausalLMConfig:
        last = (esta_config["end"] or esta_config["front"])["config"]
        first = esta_config["front"]["config"]
        return StitchCausalLMConfig(**parts, architectures=[CAUSAL_LM_ARCHITECTURE], vocab_size=last["vocab_size"],
                                    bos_token_id=first.get("bos_token_id"), eos_token_id=last.get("eos_token_id"),
                                    pad_token_id=first.get("pad_token_id"), tie_word_embeddings=False, use_cache=True,
                                    dtype=parts["esta_dtype"])

    @classmethod
    def card_usage(cls, front_spec: dict, plain: bool) -> tuple[str, str, list[str]]:
        return "text-generation", "AutoModelForCausalLM, AutoTokenizer", [
            'model = AutoModelForCausalLM.from_pretrained(".")', 'tokenizer = AutoTokenizer.from_pretrained(".")',
            'model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=32)']

    def onnx_io(self) -> OnnxIO:
        # the no-cache forward: int64 input_ids and attention_mask [batch, length], both dynamic
        vocab = int(self.config.vocab_size)

        def tokens(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
            mask = torch.ones_like(ids)
            mask[0, : t // 3] = 0  # a left-padded row: the mask must be honoured, not traced away
            return ids, mask

        batch = torch.export.Dim("batch", min=1, max=4096)
        length = torch.export.Dim("length", min=2, max=int(getattr(self.config, "max_position_embeddings", 4096)))
        example, check = tokens(2, 7, 0), tokens(3, 11, 1)
        return OnnxIO(names=["input_ids", "attention_mask"], example=example, check=check,
                      dynamic={n: {0: batch, 1: length} for n in ("input_ids", "attention_mask")},
                      shape=("batch", "length"),
                      to_inputs=lambda input_ids, attention_mask: {"input_ids": input_ids,
                                                                   "attention_mask": attention_mask},
                      real=check[1].bool().numpy())  # a padded position's logits mean nothing: compare real tokens

    @classmethod
    def build_part(cls, spec: dict, first_block: int, last_block: int, embed: bool, head: bool) -> "CausalLMAnchor":
        cfg = dict(spec["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config._attn_implementation = "sdpa"
        block_cls = import_transformers_class(spec["block_class"])
        blocks = nn.ModuleList([block_cls(config, layer_idx=i) for i in range(first_block, last_block + 1)])
        embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id) if embed else None
        norm = import_transformers_class(spec["norm_class"])(config.hidden_size, eps=config.rms_norm_eps) \
            if head else None
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if head else None
        rotary = import_transformers_class(spec["rotary_class"])(config=config)
        return cls(config, embed_tokens, blocks, norm, lm_head, rotary, first_block, spec.get("source", ""))


def load_causal_lm_anchor(source: str, config: PretrainedConfig, local: bool, dtype: torch.dtype = torch.float32,
                          gguf_file: str | None = None) -> CausalLMAnchor:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if local and not gguf_file:
        kw["use_safetensors"] = True  # never unpickle a .bin
    full = load_weights(source, lambda: AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, local_files_only=local, trust_remote_code=False, **kw))
    full.requires_grad_(False)
    m = full.model
    lm_head = full.lm_head
    if lm_head.weight is m.embed_tokens.weight:  # tied: untie, so the two can be told apart in a stitch
        lm_head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False, dtype=lm_head.weight.dtype)
        lm_head.weight = nn.Parameter(m.embed_tokens.weight.detach().clone(), requires_grad=False)
    return CausalLMAnchor(full.config, m.embed_tokens, m.layers, m.norm, lm_head, m.rotary_emb, source=source)


def check_tokenizers(sources: list[str]) -> None:
    """Refuse anchors whose tokenizers differ: a stitch feeds the front anchor's tokens to the end anchor's head."""
    from transformers import AutoTokenizer

    vocabs = []
    for s in sources:
        try:
            vocabs.append(AutoTokenizer.from_pretrained(s, trust_remote_code=False).get_vocab())
        except Exception as e:  # noqa: BLE001 - no tokenizer means we cannot check: say so
            raise EstaError(f"cannot load the tokenizer of anchor {s!r} to compare vocabularies: {e}") from e
    for s, v in zip(sources[1:], vocabs[1:]):
        if v != vocabs[0]:
            diff = len(set(v.items()) ^ set(vocabs[0].items()))
            raise EstaError(f"anchors cannot be stitched: the tokenizers of {sources[0]} and {s} differ "
                            f"({len(vocabs[0])} vs {len(v)} tokens, {diff} entries differ); a family must share one "
                            "tokenizer")


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.bfloat16) -> str:
    """A GGUF file as an ordinary transformers folder (safetensors + tokenizer), converted once and cached.

    transformers dequantises GGUF to float on load; saving that once makes every later load a fast safetensors read.
    The cache key is the file's name, size and modification time, so a replaced file is converted again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import default_cache_dir

    path = Path(path)
    if not path.is_file():
        raise EstaError(f"GGUF file {str(path)!r} does not exist")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    out = Path(cache_dir or default_cache_dir()) / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return str(out)
    log.info("converting %s to safetensors in %s (once)", path, out)
    try:
        kw = {}
        try:  # transformers ≥ 5 keeps GGUF weights packed unless asked; we want plain weights to save once
            from transformers import GgufConfig

            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantise
            pass
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a broken or unsupported file: one clear message
        raise EstaError(f"cannot read GGUF file {path}: {e}") from e
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


FAMILY = FamilyKind("causal-lm", CausalLMAnchor, LM_MODELS,
                    lambda source, config, num_labels, local, dtype: load_causal_lm_anchor(source, config, local, dtype),
                    lambda sources, configs: check_tokenizers(sources))
