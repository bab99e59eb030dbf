"""A crash costs at most the steps since the last checkpoint: kill -9 mid-run, --resume, and the run is the one an
uninterrupted run gives (same deployed bytes, importance, final loss; the whole run's step count and time)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import SRC, esta, image_folder

TRAIN = ["--batch-size", "8", "--groups", "3", "--no-progress"]


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, vit_family):
    data = image_folder(tmp_path / "data", per_class=8)
    args = ["train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "400", "--checkpoint-every", "20",
            "--no-sweep", *TRAIN]
    straight = esta(*args, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "esta.cli", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and 0 < json.loads(state.read_text() or "{}").get("step", 0) < 400:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 400, "the run finished before it could be killed"
    resumed = esta(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert [s["importance"] for s in a["stitches"]] == [s["importance"] for s in b["stitches"]]
    assert a["train"]["final_loss"] == b["train"]["final_loss"]
    assert b["train"]["seconds"] > 0 and b["train"]["steps"] == 400
    for da, db in zip(a["deployed"], b["deployed"]):
        assert Path(da["path"], "model.safetensors").read_bytes() == Path(db["path"], "model.safetensors").read_bytes()
