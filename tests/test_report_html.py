"""report.html: one self-contained page per run; every network a point with its numbers on hover (checked in
headless Chromium where Debian's package is installed, as scripts/setup.sh does as root)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from esta.cli import main


def _results(n_stitches: int = 6) -> dict:
    """A hand-made image run: anchors 0 and 1, stitches between them, one deployed, a reference and a probe."""
    stitches = [{"id": i, "name": f"anchor{i}" if i < 2 else f"0[:{i}]->1[{i}:]", "is_anchor": i < 2,
                 "front": 0 if i != 1 else 1, "end": 1, "front_last": None if i < 2 else i - 1,
                 "end_first": None if i < 2 else i, "flops": 1e8 * (1 + i), "params": 1e6 * (1 + i),
                 "accuracy": 0.5 + 0.01 * i, "importance": 1e-4 * i, "updates": 10 * i, "deployed": i in (0, 3)}
                for i in range(n_stitches)]
    return {"method": "esta", "task": "toy", "stitches": stitches, "train": {"seconds": 1.0, "steps": 10},
            "deploy_by": "validation", "deployed": [{"name": "anchor0"}, {"name": stitches[3]["name"]}],
            "anchors_in_palette": [{"stitch_id": 0, "name": "Ti"}, {"stitch_id": 1, "name": "S"}],
            "references": [{"method": "anchors-lora", "name": "Ti", "flops": 1e8, "accuracy": 0.52, "steps": 5},
                           {"method": "linear-probe", "name": "S", "flops": 2e8, "accuracy": 0.4, "steps": 0}],
            "pairs": [{"front": 0, "end": 1, "front_name": "Ti", "end_name": "S", "spearman": 1.0,
                       "points": [{"share": 1 - i / 10, "accuracy": s["accuracy"]}
                                  for i, s in enumerate(stitches[2:], 2)]}]}


def _embedded(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))


def test_esta_report_writes_one_self_contained_page_with_every_network(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    results = _results()
    results["stitches"][4]["name"] = "</script><b>x"  # nothing in the data can break out of the page
    (run / "run.json").write_text(json.dumps({"config": {}, "task_kind": "image-classification", "space": {}}))
    (run / "results.json").write_text(json.dumps(results))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    urls = set(re.findall(r"https?://[^\s'\"]+", page)) - {"http://www.w3.org/2000/svg"}  # the SVG namespace: a name
    assert not urls and "<link" not in page and "src=" not in page  # offline: nothing to fetch
    data = _embedded(page)
    kinds = [p["kind"] for p in data["points"]]
    assert kinds.count("anchor") == 2 and kinds.count("stitch") == 4 and {"alone", "probe"} <= set(kinds)
    assert [p["name"] for p in data["points"] if p.get("deployed") is True] == ["Ti", results["stitches"][3]["name"]]
    assert data["points"][4]["name"] == "</script><b>x" and len(data["pairs"][0]["points"]) == 4
    (run / "results.json").write_text("{not json")
    assert main(["report", str(run)]) == 2  # damaged: one line, no traceback


@pytest.mark.skipif(not shutil.which("chromium"), reason="Chromium is not installed (scripts/setup.sh installs it "
                    "as root; scripts/check_report.py is the same check)")
def test_the_page_draws_every_network_and_a_hover_shows_its_numbers_in_headless_chromium(tmp_path):
    from esta.budget import FLOPS
    from esta.html_report import point, write_html_report
    from esta.results import ACCURACY

    pts = [point("anchor" if i < 2 else "stitch", f"n{i}", 1e8 * (1 + i), 0.5 + 0.01 * i, updates=i, importance=None,
                 deployed=i == 3, pair=None if i < 2 else "Ti->S") for i in range(7)]
    report = write_html_report(tmp_path, "t", "s", pts, [], ACCURACY, FLOPS)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"{Path(report).resolve().as_uri()}#selftest"], capture_output=True, text=True,
                         timeout=120).stdout
    shown = json.loads(html.unescape(re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S).group(1)))
    assert shown["stitches"] == 7 and shown["rows"] == 7 and shown["tooltip_visible"]
    assert shown["tooltip"].startswith(shown["hovered"]) and "accuracy: 5" in shown["tooltip"]
    assert "updates:" in shown["tooltip"] and "deployed:" in shown["tooltip"]


def test_a_language_runs_page_names_its_anchors_by_size_not_by_cache_folder(tmp_path):
    from esta.tasks.instruction_tuning import InstructionTuning

    sources = ["/c/gguf/qwen2.5-coder-0.5b-instruct-b2ac4fa51d56f478", "/c/gguf/qwen2.5-coder-1.5b-instruct-b6baece38db40a07"]
    rows = [{"stitch_id": i, "name": n, "params": p, "validation_perplexity": v, "updates": 5, "importance": None}
            for i, n, p, v in ((0, "anchor0", 6e8, 8.0), (1, "anchor1", 1.7e9, 5.6), (2, "0[:1]->1[0:]", 1.6e9, 6.1))]
    results = {"method": "esta", "task": "chat.jsonl", "train": {"steps": 3, "seconds": 1.0},
               "anchors": [{"stitch_id": i, "source": s} for i, s in enumerate(sources)],
               "deployed": [{"stitch_id": 2}], "deployment": {"stitches": rows}}
    page = InstructionTuning.write_html(results, tmp_path).read_text()
    names = {p["kind"]: [] for p in _embedded(page)["points"]}
    for p in _embedded(page)["points"]:
        names[p["kind"]].append(p["name"])
    assert names == {"anchor": ["0.5B", "1.5B"], "stitch": ["0[:1]->1[0:]"]}
    assert "b2ac4fa5" not in page
