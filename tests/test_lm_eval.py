import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import save_tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from esta.errors import EstaError
from esta.lm_eval import (
    MCItem,
    continuation_logprob,
    encode_pair,
    interval95,
    mc_accuracy,
    mc_items,
    mc_scores,
    perplexity,
    text_batches,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_lm(tmp_path_factory.mktemp("lm") / "m", "llama", 32, 2, 4, 2)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return (lambda x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits), \
        AutoTokenizer.from_pretrained(path)


def test_continuation_logprob_matches_a_direct_computation(tiny):
    model, tok = tiny
    scores = continuation_logprob(model, tok, "w1 w2", [" w3", " w4 w5"])
    ids = torch.tensor([tok("w1 w2 w4 w5", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = F.log_softmax(model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), -1)[0]
    direct = float(logp[1, ids[0, 2]] + logp[2, ids[0, 3]])
    assert scores[1] == pytest.approx(direct, abs=1e-4)


def test_single_token_choices_take_one_pass_and_agree_with_the_padded_batch(tiny):
    model, tok = tiny
    calls = []
    counted = lambda x: calls.append(x["input_ids"].shape) or model(x)  # noqa: E731
    fast = continuation_logprob(counted, tok, "w1 w2", [" w3", " w4", " w5"])
    assert calls == [torch.Size([1, 2])]  # the context once, not three padded rows
    ids = torch.tensor([tok("w1 w2 w3", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = F.log_softmax(model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), -1)[0, 1]
    want = [float(logp[tok(w, add_special_tokens=False)["input_ids"][0]]) for w in (" w3", " w4", " w5")]
    assert fast == pytest.approx(want, abs=1e-4)


def test_mc_accuracy_picks_the_likeliest_choice(tiny):
    model, tok = tiny
    items = [MCItem("w1 w2", ["w3", "w4", "w5"], a) for a in range(3)]
    best = max(range(3), key=continuation_logprob(model, tok, "w1 w2", [" w3", " w4", " w5"]).__getitem__)
    assert mc_accuracy(model, tok, items) == pytest.approx(1 / 3)
    assert mc_accuracy(model, tok, [items[best]]) == 1.0


def test_perplexity_ignores_padding(tiny):
    model, tok = tiny
    one = perplexity(model, text_batches(tok, ["w1 w2 w3 w4"], batch_size=1))
    padded = perplexity(model, text_batches(tok, ["w1 w2 w3 w4", "w5 w6"], batch_size=2))
    alone = perplexity(model, text_batches(tok, ["w5 w6"], batch_size=1))
    assert one["tokens"] == 3 and padded["tokens"] == 4
    expected = math.exp((3 * math.log(one["perplexity"]) + math.log(alone["perplexity"])) / 4)
    assert padded["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_benchmark_folders_map_to_items(tmp_path):
    rows = {"id": ["1"], "question": ["Which?"], "choices": [{"text": ["a", "b"], "label": ["A", "B"]}],
            "answerKey": ["B"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ai2_arc/ARC-Easy/validation"))
    (item,) = mc_items("arc-easy", tmp_path)
    assert item.choices == ["a", "b"] and item.answer == 1 and item.context == "Question: Which?\nAnswer:"
    with pytest.raises(EstaError, match="not found"):
        mc_items("hellaswag", tmp_path)


def test_acc_and_acc_norm_against_a_hand_computed_example(tiny):
    """A model that gives every position the same next-token distribution: a choice's log-likelihood is the sum of
    its tokens' fixed log-probabilities, so both figures can be worked out by hand."""
    _, tok = tiny
    vocab = len(tok)
    logp = torch.full((vocab,), -30.0)
    w3, w4, w5 = (tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("w3", "w4", "w5"))
    assert len(w3) == len(w4) == len(w5) == 1
    logp[w3[0]], logp[w4[0]], logp[w5[0]] = -1.0, -0.8, -0.8
    logits = logp.log_softmax(-1)  # normalised: what the model predicts, everywhere
    model = lambda x: logits.expand(*x["input_ids"].shape, vocab)  # noqa: E731
    # "w3": one token, 2 characters, log p = -1.0 (per character -0.5)
    # "w4 w5": two tokens, 5 characters, log p = -1.6 (per character -0.32)
    item = MCItem("w1 w2", ["w3", "w4 w5"], answer=1)
    s = mc_scores(model, tok, [item])
    assert (s["acc"], s["acc_norm"], s["n"]) == (0.0, 1.0, 1)  # acc picks w3, acc_norm picks "w4 w5"
    s = mc_scores(model, tok, [item, MCItem("w1 w2", ["w3", "w4 w5"], answer=0)])
    assert (s["acc"], s["acc_norm"]) == (0.5, 0.5)
    assert s["acc_ci95"] == pytest.approx(1.96 * math.sqrt(0.25 / 2))


def test_context_and_continuation_are_split_as_the_harness_splits_them(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "w1 w2 ", "w3")  # a trailing space moves to the continuation
    assert ctx == tok("w1 w2", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("w1 w2 w3", add_special_tokens=False)["input_ids"]
    assert interval95(0.5, 100) == pytest.approx(0.098)
