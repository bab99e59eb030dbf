"""Tiny random Llama / Qwen2 checkpoints with a shared (or deliberately different) tokenizer, saved to folders."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def save_tokenizer(folder: Path, words: list[str] = WORDS) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)


def save_tiny_lm(folder: Path, kind: str = "llama", width: int = 32, depth: int = 3, heads: int = 4,
                 kv_heads: int = 2, seed: int = 0, words: list[str] = WORDS) -> str:
    torch.manual_seed(seed)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(vocab_size=len(words), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=(kind == "qwen2"))
    model_cls(cfg).save_pretrained(folder)
    save_tokenizer(folder, words)
    return str(folder)


def trained_looking_lm_palette(folder: Path, kind: str = "llama", first_token_state: bool = False):
    """A palette of two tiny LMs (other widths, depths and GQA groups) with fitted stitching layers and PST whose
    adapters are nonzero, as after training (merging must carry them into what is deployed); in eval mode."""
    from helpers import perturb_adapters

    from esta.families import load_family
    from esta.palette import Palette
    from esta.pst import PSTConfig

    shapes = {"llama": [(32, 3, 4, 2), (48, 4, 6, 3)], "qwen2": [(32, 2, 4, 1), (64, 3, 4, 2)]}[kind]
    family = [save_tiny_lm(folder / f"anchor{i}", kind, *shape, seed=i) for i, shape in enumerate(shapes)]
    palette = Palette(load_family(family), first_token_state=first_token_state)
    ids = torch.randint(4, len(WORDS), (4, 9), generator=torch.Generator().manual_seed(5))
    palette.init_stitching({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    palette.apply_pst(PSTConfig())
    perturb_adapters(palette)
    return palette.eval()
