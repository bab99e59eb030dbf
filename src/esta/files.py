"""Writing run folders safely: every file appears whole or not at all, and one run never lands on another.

``atomic_write`` writes beside the target and renames over it (a rename is atomic on POSIX), so a crash or a full
disk leaves either the old file or the new one, never half of one. ``claim_out_dir`` is the one rule for an output
folder: a folder that holds an esta run is refused unless the user asked to continue it (``resume``) or to replace
it whole (``overwrite``), so two runs' files are never mixed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import EstaError

#: what esta writes into a run folder; a folder holding any of them holds a run
RUN_MARKERS = ("run.json", "results.json", "checkpoint", "deployed")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to produce the file at a temporary path beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


def default_cache_dir() -> Path:
    """Where esta caches built-in data, probes and conversions: ``$ESTA_CACHE`` if set, else ``~/.cache/esta``."""
    configured = os.environ.get("ESTA_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "esta"


def read_json(path: str | Path, what: str = "run") -> Any:
    """Every JSON file esta reads back (run.json, results.json, manifests, configs): damage (truncated, garbled,
    not UTF-8) or absence is one :class:`EstaError` naming the file, never a traceback; ``what`` names the folder
    it belongs to (a run, a deployment) in the message for a missing file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise EstaError(f"{path} is missing: is this a finished esta {what}?") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise EstaError(f"{path} is damaged (not valid JSON: {e})") from e


def replace_dir(new: Path, folder: Path) -> None:
    """Put the finished folder ``new`` where ``folder`` is, whole: the old one is moved aside first and removed
    only after, so a crash leaves one complete folder (the old or the new), never a mix."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def holds_run(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / m).exists() for m in RUN_MARKERS)


def claim_out_dir(folder: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``folder`` ready for a run: refuse one that holds a run unless ``resume`` (continue it: it must hold a
    checkpoint) or ``overwrite`` (remove it whole first). A folder that holds no run is used as it is."""
    folder = Path(folder)
    if resume and overwrite:
        raise EstaError("--resume continues the run in the output folder and --overwrite deletes it: give one")
    if folder.exists() and not folder.is_dir():
        raise EstaError(f"output folder {folder} is a file")
    if resume:
        if not (folder / "checkpoint" / "state.json").is_file():
            raise EstaError(f"nothing to resume: {folder} holds no checkpoint (checkpoint/state.json)")
        return folder
    if holds_run(folder):
        if not overwrite:
            raise EstaError(f"{folder} already holds a run: give --resume to continue it, --overwrite to replace it, "
                            f"or another --out")
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".esta-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EstaError(f"cannot write to output folder {folder}: {e.strerror or e}") from e
    return folder


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Also write esta's log (INFO and up, with times) to ``path`` while the block runs; appends, so a resumed run
    continues the same file."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logger = logging.getLogger("esta")
    logger.addHandler(handler)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    except Exception as e:  # the reason a run stopped belongs in its log too (to the file only: the CLI prints it)
        handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "run stopped: %s", (e,), None))
        raise
    finally:
        logger.setLevel(old_level)
        logger.removeHandler(handler)
        handler.close()


def _state():
    """Accelerate's process state, set up as training's Accelerator sets it up (``cpu=True`` without a GPU is what
    makes it see a torchrun launch on CPUs); it is shared, so whichever asks first must ask the same way."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in the one process that writes (rank 0), and when there is only one process."""
    return _state().is_main_process


def wait_for_everyone() -> None:
    _state().wait_for_everyone()


def claim_for_all(folder: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """:func:`claim_out_dir` in the main process only (several processes must not each delete and create it);
    the others wait until it is ready."""
    if is_main_process():
        claim_out_dir(folder, resume=resume, overwrite=overwrite)
    wait_for_everyone()
    return Path(folder)


@contextmanager
def main_log(path: Path) -> Iterator[None]:
    """:func:`log_to` in the main process; nothing in the others."""
    if is_main_process():
        with log_to(path):
            yield
    else:
        yield
