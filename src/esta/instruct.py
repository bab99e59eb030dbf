"""Instruction tuning data: Alpaca-format records -> token ids whose loss covers the response only.

A record is ``{"instruction": str, "input": str (optional), "output": str}`` in a JSON list or a JSONL file, or a
ShareGPT-style conversation ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`` (or
``{"messages": [{"role": "user", "content": ...}, ...]}``), read as one record per answered user turn. The
prompt is the tokenizer's chat template when it has one (instruct models were trained on it) and the Alpaca
template otherwise; labels are ``-100`` on the prompt and on padding, so only response tokens (and the closing EOS)
are learned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .distillation import distillation_term
from .errors import EstaError

log = logging.getLogger("esta.instruct")

IGNORE = -100
ALPACA = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def chat_pairs(record: dict) -> list[dict]:
    """A ShareGPT-style conversation (``conversations: [{from, value}]`` or ``messages: [{role, content}]``) as
    Alpaca records, one per user turn that an assistant turn answers (earlier turns are not kept)."""
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        return []
    said = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in turns if isinstance(t, dict)]
    return [{"instruction": a[1].strip(), "input": "", "output": b[1].strip()}
            for a, b in zip(said, said[1:])
            if a[0] in ("human", "user") and b[0] in ("gpt", "assistant", "chatgpt")
            and isinstance(a[1], str) and isinstance(b[1], str) and a[1].strip() and b[1].strip()]


def load_records(path: str | Path) -> list[dict]:
    """Alpaca records from a ``.json`` list or a ``.jsonl`` file; a bad record is refused with its position.
    ShareGPT-style conversations (``conversations`` or ``messages``) become one Alpaca record per answered user
    turn (see :func:`chat_pairs`)."""
    path = Path(path)
    if not path.is_file():
        raise EstaError(f"instruction data {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EstaError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    where = []  # (line number, record) for .jsonl, so an error names the line a user would open
    try:
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    where.append(n)
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise EstaError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from e
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise EstaError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(records, list) or not records:
        raise EstaError(f"{path} holds no records (expected a list of {{instruction, input, output}})")
    if any(isinstance(r, dict) and ("conversations" in r or "messages" in r) for r in records):
        chats = []
        for i, r in enumerate(records):
            pairs = chat_pairs(r) if isinstance(r, dict) else []
            if not pairs and not (isinstance(r, dict) and "instruction" in r):
                at = f"line {where[i]}" if where else f"record {i}"
                raise EstaError(f"{path}: {at} is neither an Alpaca record nor a conversation with a user turn that "
                                f"an assistant turn answers")
            chats.extend(pairs or [r])
        records, where = chats, []
    empty = 0
    for i, r in enumerate(records):
        at = f"line {where[i]}" if where else f"record {i}"
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise EstaError(f"{path}: {at} needs string fields 'instruction' and 'output' (and optional 'input')")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise EstaError(f"{path}: {at} has an 'input' of type {type(r['input']).__name__}; it must be a string")
        empty += not r["output"].strip()
    if empty:
        log.warning("%s: %d of %d records have an empty response ('output'); they teach the model to stop at once",
                    path, empty, len(records))
    return records


def prompt_text(tokenizer: Any, record: dict) -> str:
    """The prompt up to where the response starts."""
    instruction, inp = record["instruction"].strip(), (record.get("input") or "").strip()
    if getattr(tokenizer, "chat_template", None):
        user = f"{instruction}\n\n{inp}" if inp else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return ALPACA.format(with_input=", paired with an input that provides further context" if inp else "",
                         instruction=instruction, input_block=f"### Input:\n{inp}\n\n" if inp else "")


def encode(tokenizer: Any, record: dict, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS, and labels masking the prompt. Long examples keep the prompt's end."""
    prompt = tokenizer(prompt_text(tokenizer, record), add_special_tokens=False)["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    response = response[: max(1, max_length // 2)] if len(prompt) + len(response) > max_length else response
    prompt = prompt[-(max_length - len(response)):] if len(prompt) + len(response) > max_length else prompt
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}


@dataclass
class InstructionDataset(torch.utils.data.Dataset):
    examples: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def build_dataset(tokenizer: Any, records: list[dict], max_length: int = 256) -> InstructionDataset:
    return InstructionDataset([encode(tokenizer, r, max_length) for r in records])


def collate(batch: list[dict[str, list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for k, b in enumerate(batch):
        t = len(b["input_ids"])
        ids[k, :t] = torch.tensor(b["input_ids"])
        labels[k, :t] = torch.tensor(b["labels"])
        mask[k, :t] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model, batch: dict[str, torch.Tensor], stitch: int, teacher: int | None = None, distill: float = 0.0,
            temperature: float = 1.0) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (response) tokens only: the trainer's ``loss_fn`` for LLMs. With a
    ``teacher`` stitch (the end anchor), mixed with per-token distillation towards its next-token distributions on
    the same (response) tokens."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    target = None
    if teacher is not None and distill:
        with torch.no_grad():  # first: the forward of the student must be the last to select its stitch
            target = model(inputs, stitch=teacher)[:, :-1][labels != IGNORE]
    logits = model(inputs, stitch=stitch)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    if target is None:
        return loss
    return (1 - distill) * loss + distill * distillation_term(logits[:, :-1][labels != IGNORE], target, temperature)


def record_text(record: dict) -> str:
    """A record as plain text (instruction, input, output) for perplexity."""
    return record["instruction"] + ("\n" + record["input"] if record.get("input") else "") + "\n" + record["output"]


def whole_text(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every real token (prompt and response) as a label, padding excluded."""
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)}
