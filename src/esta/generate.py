"""Text generation through any stitch (in a palette or deployed), with a KV cache per part of the stitch.

``model`` is any callable ``inputs -> logits`` over causal-LM anchors: ``lambda x: palette(x, stitch=k)`` or a
:class:`~esta.deploy.DeployedStitch`. The caches live in ``inputs["caches"]``; each anchor part keeps its own (see
``families.causal_lm``), so after the prompt only the newest token is fed.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

Model = Callable[[dict], torch.Tensor]


@torch.no_grad()
def generate_ids(model: Model, input_ids: torch.Tensor, max_new_tokens: int = 64, *, use_cache: bool = True,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token (``[batch]``) as it is produced; greedy when ``temperature`` is 0."""
    ids = input_ids
    caches: dict | None = {} if use_cache else None
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "caches": caches}
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(inputs)[:, -1].float()
        nxt = _pick(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        yield nxt
        if eos_token_id is not None and bool(done.all()):
            return
        if use_cache:  # the caches hold the past: feed only the new token, the mask covers the whole sequence
            inputs = {"input_ids": nxt[:, None], "attention_mask": torch.ones_like(ids), "caches": caches}
        else:
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "caches": None}


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def generate(model: Model, input_ids: torch.Tensor, max_new_tokens: int = 64, **kw) -> torch.Tensor:
    """The prompt followed by the generated tokens, ``[batch, prompt + new]``."""
    new = list(generate_ids(model, input_ids, max_new_tokens, **kw))
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids


def context_length(anchors) -> int:
    """The longest text a stitch of these causal-LM anchors can run: the shortest anchor context (a stitch runs
    positions through parts of each)."""
    return min(int(getattr(a.config, "max_position_embeddings", 0) or 2**31) for a in anchors)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids of a conversation, ending where the assistant's reply starts (the chat template when there is one,
    the Alpaca template of ``instruct`` otherwise)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        from .instruct import prompt_text

        text = prompt_text(tokenizer, {"instruction": messages[-1]["content"]})
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def stream_text(model: Model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 256,
                stats: dict | None = None, **kw) -> Iterator[str]:
    """The reply as text pieces, as tokens arrive (decoding the whole reply each time keeps multi-byte characters
    and merged spaces right, and yields only what is new). ``stats``, if given, is filled with ``tokens`` (new
    tokens made, the end-of-sequence one excluded) and ``finish_reason`` (``"stop"``: end of sequence;
    ``"length"``: ``max_new_tokens`` reached)."""
    new: list[int] = []
    shown = ""
    stats = {} if stats is None else stats
    stats.update(tokens=0, finish_reason="length")
    for tok in generate_ids(model, input_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, **kw):
        if tokenizer.eos_token_id is not None and int(tok[0]) == tokenizer.eos_token_id:
            stats["finish_reason"] = "stop"
            break
        new.append(int(tok[0]))
        stats["tokens"] = len(new)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            yield text[len(shown):]
            shown = text


def chat(model: Model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0,
         read: Callable[..., str] = input, write: Callable[..., None] = print, prompt: bool = True) -> list[dict]:
    """A conversation on the terminal: each line read is a user turn, the reply streams as it is generated; an
    empty line or end of input ends it (``read`` raising EOFError or StopIteration). ``prompt``: show "you>" and
    "esta>". Returns the messages."""
    messages: list[dict] = []
    while True:
        try:
            line = (read("you> ") if prompt else read()).strip()
        except (EOFError, StopIteration):
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        if prompt:
            write("esta> ", end="", flush=True)
        reply = "".join(write(p, end="", flush=True) or p for p in stream_text(
            model, tokenizer, chat_prompt_ids(tokenizer, messages), max_new_tokens, temperature=temperature))
        write()
        messages.append({"role": "assistant", "content": reply})
    return messages
