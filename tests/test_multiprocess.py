"""Several processes are a launch option: same stitch at every step, same weights as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mp_worker
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


def test_two_processes_train_like_one(vit_family, tmp_path):
    (tmp_path / "mp").mkdir()
    (tmp_path / "sp").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", str(TESTS / "mp_worker.py"), *vit_family, str(tmp_path / "mp")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / "mp" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["seen"] == ranks[1]["seen"]  # every process ran the same stitch at every step
    assert ranks[0]["importance"] == ranks[1]["importance"]
    s0, s1 = (load_file(str(tmp_path / "mp" / f"state{k}.safetensors")) for k in (0, 1))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)

    mp_worker.run(vit_family, tmp_path / "sp")  # one process, whole batches
    single = json.loads((tmp_path / "sp" / "rank0.json").read_text())
    assert single["seen"] == ranks[0]["seen"]
    one = load_file(str(tmp_path / "sp" / "state0.safetensors"))
    for k in one:  # averaging two half-batch gradients == one full-batch gradient
        torch.testing.assert_close(s0[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
