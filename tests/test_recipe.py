"""One recipe, two Tasks: the same commands (train, --resume, deploy, evaluate, bench --quick) on a tiny causal-LM
family as on an image family; typed budgets, typed results and the registries they rest on."""

import json
from pathlib import Path

import pytest
from helpers import esta, one_error_line
from lm_fixtures import save_tiny_lm

from esta.budget import FLOPS, PARAMS, Budget, parse_budgets
from esta.errors import EstaError
from esta.families import FAMILIES, anchor_class
from esta.recipe import RecipeConfig, run
from esta.results import ACCURACY, PERPLEXITY, RunResults, largest_fall
from esta.tasks import TASKS, AdaptConfig, LMAdaptConfig, task_class, task_for_family

RECORDS = [{"instruction": f"w{i % 7} w{i % 5}", "input": "w9" if i % 2 else "", "output": f"w{i % 11} w3"}
           for i in range(40)]


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory) -> tuple[list[str], str]:
    root = tmp_path_factory.mktemp("lm")
    family = [save_tiny_lm(root / "a", "llama", 32, 3, 4, 2, seed=0),
              save_tiny_lm(root / "b", "llama", 48, 4, 6, 3, seed=1)]
    (root / "data.json").write_text(json.dumps(RECORDS))
    return family, str(root / "data.json")


def test_budgets_carry_their_unit():
    assert Budget.parse("0.5", FLOPS).value == 0.5e9 and Budget.parse("500MFLOPs", FLOPS).value == 0.5e9
    assert Budget.parse(0.25, FLOPS).value == 0.25e9 and str(Budget.parse("0.25GFLOPs", FLOPS)) == "0.25 GFLOPs"
    assert Budget.parse("300M", PARAMS).value == 300e6 and Budget.parse("1.5B", PARAMS).value == 1.5e9
    assert parse_budgets("0.1,0.2GFLOPs", FLOPS) == [0.1e9, 0.2e9] and parse_budgets("", FLOPS) is None
    with pytest.raises(EstaError, match="unknown unit 'gflops'.*M parameters"):
        Budget.parse("0.5GFLOPs", PARAMS)
    for bad in ("-1", "0", "abc", "1e999"):
        with pytest.raises(EstaError, match="budget"):
            Budget.parse(bad, FLOPS)


def test_every_config_belongs_to_one_task_and_every_family_kind_to_one_anchor_class():
    assert task_class(AdaptConfig()) is TASKS["image-classification"][1]
    assert task_class(LMAdaptConfig()) is TASKS["instruction-tuning"][1]
    assert task_for_family("causal-lm")[0] is LMAdaptConfig
    with pytest.raises(EstaError, match="belongs to no Task"):
        run(RecipeConfig())
    assert set(FAMILIES) == {"vision", "causal-lm"} and anchor_class("vision").family == "vision"
    with pytest.raises(EstaError, match="unknown anchor family 'audio'"):
        anchor_class("audio")


def test_a_metric_knows_its_direction():
    assert largest_fall([0.5, 0.7, 0.6, 0.8], ACCURACY) == pytest.approx(10.0)  # points: 0.7 then 0.6
    assert largest_fall([30.0, 20.0, 25.0], PERPLEXITY) == pytest.approx(5.0)  # a rise of perplexity is a fall
    assert largest_fall([30.0, 20.0, 19.0], PERPLEXITY) == 0.0
    assert PERPLEXITY.gain(20.0, 25.0) == 5.0 and ACCURACY.gain(0.6, 0.5) == pytest.approx(10.0)


def test_the_same_commands_run_a_language_family_end_to_end(tmp_path, lm_family):
    family, data = lm_family
    out = tmp_path / "run"
    train = ["train", "--anchors", *family, "--data", data, "--out", str(out), "--steps", "6", "--batch-size", "4",
             "--groups", "3", "--checkpoint-every", "3", "--validation-examples", "8", "--no-progress"]
    r = esta(*train)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    typed = RunResults.from_json(results)
    assert typed.task_kind == "instruction-tuning" and typed.metric == "perplexity" and typed.cost_axis == "params"
    assert len(typed.deployed) == len(results["deployed"]) >= 2 and all(p.value > 1 for p in typed.deployed)
    assert [p.validation is not None for p in typed.deployed] == [True] * len(typed.deployed)
    assert json.loads((out / "run.json").read_text())["task_kind"] == "instruction-tuning"

    # the run replays from its run.json, to the same results
    replay = esta("train", "--config", str(out / "run.json"), "--out", str(tmp_path / "replay"), "--no-progress")
    assert replay.returncode == 0, replay.stderr
    replayed = json.loads((tmp_path / "replay" / "results.json").read_text())
    assert [(d["stitch_id"], d["perplexity"]) for d in replayed["deployed"]] == \
        [(d["stitch_id"], d["perplexity"]) for d in results["deployed"]]

    # --resume of a finished run trains nothing more and deploys the same stitches
    again = esta(*train, "--resume")
    assert again.returncode == 0, again.stderr
    resumed = json.loads((out / "results.json").read_text())
    assert [d["stitch_id"] for d in resumed["deployed"]] == [d["stitch_id"] for d in results["deployed"]]
    assert resumed["train"]["steps"] == 6

    # deploy again for a budget in millions of parameters, or with a unit
    smallest = min(d["params"] for d in results["deployed"])
    d = esta("deploy", "--run", str(out), "--budgets", f"{smallest / 1e6:.6f}")
    assert d.returncode == 0, d.stderr
    assert "M parameters" in d.stdout and len(list((out / "deployed").glob("budget*"))) == 1
    assert (out / "deployed" / "budget00" / "tokenizer_config.json").is_file()
    redeployed = RunResults.from_json(json.loads((out / "results.json").read_text()))
    assert [p.cost for p in redeployed.deployed] == [smallest]  # the typed results follow the new deployment
    one_error_line(esta("deploy", "--run", str(out), "--budgets", "1e-9M"), "below the cheapest")
    one_error_line(esta("deploy", "--run", str(out), "--budgets", "0.2GFLOPs"), "budgets are M parameters")

    # evaluate a deployed language stitch: perplexity on records
    e = esta("evaluate", "--model", str(out / "deployed" / "budget00"), "--data", data, "--examples", "10")
    assert e.returncode == 0, e.stderr
    measured = json.loads(e.stdout)
    assert measured["examples"] == 10 and measured["perplexity"] > 1

    # image-only flags are refused for a language family, in one line
    one_error_line(esta(*train[:-1], "--head-init", "random", "--overwrite"), "--head-init",
                   "only for image classification")


def test_bench_quick_runs_a_language_family(tmp_path, lm_family, monkeypatch):
    from esta.bench import BenchConfig, run_bench, slug

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    family, data = lm_family
    # linear-probe has nothing to fit on a language family (its LM head is kept): skipped with a log line
    cfg = BenchConfig.quick(anchors=family, tasks=[data], methods=["esta", "snnet", "anchors-lora", "linear-probe"],
                            steps=3,
                            batch_size=4, eval_examples=8, validation_examples=6, out_dir=str(tmp_path / "bench"),
                            progress=False)
    bench = run_bench(cfg)
    task = bench["tasks"][data]
    assert set(task) == {"esta", "snnet", "anchors-lora"}
    for r in task.values():
        assert r["metric"] == "perplexity" and r["cost_axis"] == "params" and r["mean_perplexity"] > 1
    assert [a["name"] for a in task["anchors-lora"]["anchors"]] == ["a", "b"]
    c = bench["claims"][data]
    assert "esta_minus_snnet_mean_points" in c and c["trainable_params_ratio"] < 1
    assert {row["reference"] for row in c["esta_at_anchor_budgets"]} == {"anchors-lora"}
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "mean perplexity" in md and "ppl" in md
    assert (tmp_path / "bench" / f"pareto-{slug(data)}.png").stat().st_size > 5_000


def test_train_flags_for_a_language_family_keep_the_language_config_defaults(lm_family):
    from dataclasses import replace

    from esta.cli import build_parser, training_config

    family, data = lm_family
    cfg = training_config(build_parser().parse_args(["train", "--anchors", *family, "--data", data, "--out", "x"]))
    assert isinstance(cfg, LMAdaptConfig)
    assert cfg == replace(LMAdaptConfig(), anchors=family, data=data, out_dir="x")  # no default written twice
    cfg = training_config(build_parser().parse_args(["train", "--anchors", *family, "--data", data, "--steps", "9",
                                                     "--heldout", "5", "--budgets", "0.1,300M"]))
    assert cfg.train.steps == 9 and cfg.heldout_examples == 5 and cfg.budgets == ["0.1", "300M"]
