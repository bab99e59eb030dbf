"""Several processes are a launch option: same stitch at every step, same weights as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mp_worker
import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("k, port", [(1, 29517), (2, 29519)])
def test_two_processes_train_like_one(vit_family, tmp_path, k, port):
    """With K stitches per step each process splits its shard into K parts; part j of every process together is
    part j of the whole batch (shards interleave), so two processes train exactly like one, for K = 1 or 2."""
    (tmp_path / "mp").mkdir()
    (tmp_path / "sp").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), str(TESTS / "mp_worker.py"), *vit_family, str(k),
                        str(tmp_path / "mp")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / "mp" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["seen"] == ranks[1]["seen"]  # every process ran the same stitch at every step
    assert ranks[0]["importance"] == ranks[1]["importance"]
    s0, s1 = (load_file(str(tmp_path / "mp" / f"state{k}.safetensors")) for k in (0, 1))
    assert all(torch.equal(s0[name], s1[name]) for name in s0)

    mp_worker.run(vit_family, tmp_path / "sp", stitches_per_step=k)  # one process, whole batches
    single = json.loads((tmp_path / "sp" / "rank0.json").read_text())
    assert single["seen"] == ranks[0]["seen"]
    one = load_file(str(tmp_path / "sp" / "state0.safetensors"))
    assert single["importance"] == pytest.approx(ranks[0]["importance"], rel=1e-4, abs=1e-12)
    for name in one:  # averaging two half-batch gradients == one full-batch gradient
        torch.testing.assert_close(s0[name], one[name], atol=1e-5, rtol=1e-4, msg=name)


def _torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "esta.cli", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_two_process_image_run_writes_and_reports_once(vit_family, tmp_path):
    from helpers import image_folder

    data = image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    r = _torchrun(["train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "6", "--batch-size", "8",
                   "--groups", "3", "--no-progress", "--out", str(out)], 29531)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stitches adapted to") == 1  # one report, from the main process
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "deployed" / "manifest.json").read_text())
    assert [Path(d["path"]).name for d in results["deployed"]] == [e["folder"] for e in manifest["deployed"]]
    assert not list(tmp_path.glob("run.*"))  # no leftover temporary deployment folders from a second writer


def test_two_process_language_run_writes_and_reports_once(tmp_path):
    from lm_fixtures import save_tiny_lm

    family = [save_tiny_lm(tmp_path / "a", "llama", 32, 3, 4, 2, seed=0),
              save_tiny_lm(tmp_path / "b", "llama", 48, 4, 6, 3, seed=1)]
    records = [{"instruction": f"w{i % 7} w{i % 5}", "input": "", "output": f"w{i % 11} w3"} for i in range(40)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    r = _torchrun(["lm-train", "--anchors", *family, "--data", str(tmp_path / "data.json"), "--steps", "4",
                   "--batch-size", "2", "--groups", "3", "--max-length", "32", "--mc-examples", "0",
                   "--screen-ratio", "0", "--heldout", "8", "--validation-examples", "8", "--no-progress",
                   "--out", str(out)], 29533)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["deployed"] and all(Path(d["path"]).is_dir() for d in results["deployed"])
