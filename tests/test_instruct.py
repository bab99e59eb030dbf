import json

import pytest
import torch
from lm_fixtures import save_tiny_lm
from transformers import AutoTokenizer

from esta.errors import EstaError
from esta.families import load_family
from esta.instruct import (
    IGNORE,
    build_dataset,
    collate,
    encode,
    lm_loss,
    load_records,
    prompt_text,
)
from esta.palette import Palette
from esta.pst import PSTConfig

RECORDS = [{"instruction": "w1 w2", "input": "w3", "output": "w4 w5 w6"},
           {"instruction": "w7", "output": "w8"}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return [save_tiny_lm(root / "a", "llama", 32, 2, 4, 2, seed=0), save_tiny_lm(root / "b", "llama", 48, 3, 4, 2, seed=1)]


def test_records_load_from_json_and_jsonl_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert load_records(tmp_path / "a.json") == load_records(tmp_path / "a.jsonl") == RECORDS
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(EstaError, match="record 0 needs"):
        load_records(tmp_path / "bad.json")
    with pytest.raises(EstaError, match="does not exist"):
        load_records(tmp_path / "none.json")


def test_labels_cover_only_the_response_and_eos(lm):
    tok = AutoTokenizer.from_pretrained(lm[0])
    ex = encode(tok, RECORDS[0], max_length=256)
    response = tok("w4 w5 w6", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt_text(tok, RECORDS[0]), add_special_tokens=False)["input_ids"])
    assert ex["labels"] == [IGNORE] * n_prompt + response and ex["input_ids"][n_prompt:] == response
    short = encode(tok, RECORDS[0], max_length=6)  # too long: the response keeps half, the prompt keeps its end
    assert len(short["input_ids"]) == 6 and short["labels"][-3:] == response[:3]
    assert short["input_ids"][:3] == ex["input_ids"][n_prompt - 3:n_prompt]


def test_loss_ignores_prompt_and_padding(lm):
    tok = AutoTokenizer.from_pretrained(lm[0])
    palette = Palette(load_family(lm))
    palette.apply_pst(PSTConfig())
    batch = collate(build_dataset(tok, RECORDS).examples, pad_id=tok.pad_token_id)
    assert batch["attention_mask"][1].sum() < batch["input_ids"].shape[1]  # the short record is padded
    loss = lm_loss(palette, batch, stitch=0)
    # changing prompt tokens' labels cannot matter (they are ignored); changing a response token's label does
    logits = palette({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, stitch=0)
    lab = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][lab != IGNORE], lab[lab != IGNORE])
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert all(p.grad is None for n, p in palette.named_parameters() if not p.requires_grad)
