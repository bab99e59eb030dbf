"""What a number was measured with: versions, the source commit, the hardware and threads (written into every run)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def environment() -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"esta": _esta_version(), "git_commit": git_commit(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": gpu}


def _esta_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esta")
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout esta runs from (with ``+dirty`` when it has uncommitted changes), or None when
    esta is not run from a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=5)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
