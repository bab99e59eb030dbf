"""Every run says what it was made with and how it went; importing esta changes nothing; no silent fallbacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import SRC, build, esta, image_folder, toy_task

from esta.errors import EstaError


def test_importing_esta_leaves_matplotlib_alone():
    code = "import matplotlib; b = matplotlib.get_backend(); import esta, esta.report, esta.analysis; " \
           "print(b, matplotlib.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": SRC, "MPLBACKEND": "svg"})
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert before == after == "svg"


def test_a_run_records_its_environment_loss_history_and_log(tmp_path, vit_family):
    data = image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    r = esta("train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "25", "--batch-size", "8",
             "--groups", "3", "--no-progress", "--out", str(out), "--no-sweep")
    assert r.returncode == 0, r.stderr
    env = json.loads((out / "run.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and "git_commit" in env and env["cpus"] >= 1
    lines = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 25]
    assert all(x["loss"] > 0 and x["lr"] >= 0 and x["seconds"] > 0 for x in lines) and lines[0]["lr"] > 0
    log = (out / "esta.log").read_text()
    assert "trained in" in log and "palette:" in log


def test_a_layer_refuses_a_stitch_that_does_not_run_it(vit_family):
    data = toy_task()
    palette, _ = build(vit_family, data)
    with pytest.raises(EstaError, match="no stitch is selected"):
        palette.anchors[0](data.images[:2])  # an anchor run directly: no stitch selected
    layer = next(m for m in palette.anchors[0].modules() if hasattr(m, "own_bias"))
    with pytest.raises(EstaError, match="does not run this layer"):
        layer.own_bias(10_000)  # a stitch from another palette
    palette(data.images[:2], stitch=0)  # through the palette, with a stitch, it runs
