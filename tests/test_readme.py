"""The README's Python examples run as written (the language one on a tiny family in place of the Qwen pair)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import SRC, TEST_CACHE
from lm_fixtures import save_tiny_lm

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Python API")
    api = text[start:text.index("\n## ", start)]  # up to the next section
    return re.findall(r"```python\n(.*?)```", api, flags=re.S)


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "ESTA_CACHE": str(TEST_CACHE)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_readme_python_examples_run_as_written(tmp_path):
    low_level, whole_job, language, with_transformers = python_blocks()
    for code in (low_level, whole_job):
        r = run_block(code, tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "GFLOPs" in r.stdout  # the whole job printed its deployed networks
    r = run_block(with_transformers, tmp_path)  # reads what the whole job deployed
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] in [str(d) for d in range(10)]  # a digits class name
    family = [save_tiny_lm(tmp_path / "a", "llama", 32, 3, 4, 2, seed=0),
              save_tiny_lm(tmp_path / "b", "llama", 48, 4, 6, 3, seed=1)]
    (tmp_path / "my_alpaca.jsonl").write_text("\n".join(json.dumps(
        {"instruction": f"w{i % 7} w{i % 5}", "input": "", "output": f"w{i % 11} w3"}) for i in range(40)))
    anchors = '["path/or/hub-id/of/Qwen2.5-0.5B-Instruct", "…/Qwen2.5-1.5B-Instruct"]'
    assert anchors in language
    # a tiny family, short texts and 20 steps in place of the Qwen pair's 300: the code is the README's
    code = language.replace(anchors, json.dumps(family)).replace(
        'out_dir="runs/llm"', 'out_dir="runs/llm", max_length=32, train=esta.TrainConfig(steps=20, batch_size=2)')
    r = run_block(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
