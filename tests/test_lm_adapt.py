import json
import os
import subprocess
import sys

import datasets
from helpers import SRC, esta, one_error_line
from lm_fixtures import save_tiny_lm

from esta.importance import SamplingConfig
from esta.lm_adapt import LMAdaptConfig, adapt_lm
from esta.train import TrainConfig


def test_instruction_tuning_a_tiny_llama_family_end_to_end(tmp_path):
    family = [save_tiny_lm(tmp_path / "a", "llama", 32, 3, 4, 2, seed=0),
              save_tiny_lm(tmp_path / "b", "llama", 48, 4, 6, 3, seed=1)]
    records = [{"instruction": f"w{i % 7} w{i % 5}", "input": "w9" if i % 2 else "", "output": f"w{i % 11} w3"}
               for i in range(40)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    rows = {"id": ["1", "2"], "question": ["w1 w2", "w3"],
            "choices": [{"text": ["w4", "w5"], "label": ["A", "B"]}] * 2, "answerKey": ["A", "B"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "mc/ai2_arc/ARC-Easy/validation"))
    r = adapt_lm(LMAdaptConfig(
        anchors=family, data=str(tmp_path / "data.json"), out_dir=str(tmp_path / "run"), max_length=32,
        train=TrainConfig(steps=6, batch_size=4, lr=1e-3, sampling=SamplingConfig(groups=3), checkpoint_every=0),
        mc_root=str(tmp_path / "mc"), mc_tasks=["arc-easy"], mc_examples=2, progress=False))
    assert len(r["anchors"]) == 2 and r["anchors"][0]["params"] < r["anchors"][1]["params"]
    # default budgets: one per budget group of the whole space (3) and the anchors' costs, whatever screening kept
    assert len(r["deployed"]) >= 3 and r["samples"]["heldout_records"] == 8
    for d in r["anchors"] + r["deployed"]:
        assert d["perplexity"] > 1 and 0 <= d["mc_accuracy"] <= 1
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 5_000
    # screening ran on every stitch; only kept stitches were trained and deployed
    sc = r["screening"]
    assert len(sc["losses"]) == len(sc["kept"]) + len(sc["dropped"]) and {0, 1} <= set(sc["kept"])
    assert all(d["stitch_id"] in sc["kept"] for d in r["deployed"])
    assert sorted(s for g in r["groups"] for s in g) == sorted(sc["kept"])
    # every trained stitch, anchors included, has a validation perplexity, and each budget deployed the lowest
    # of all the stitches that fit it (not only of its budget group: an anchor alone in a cheaper group competes)
    dep = r["deployment"]
    assert dep["by"] == "validation" and dep["validation_records"] == 8
    assert len(dep["by_importance"]) == len(r["deployed"])
    val = {row["stitch_id"]: row["validation_perplexity"] for row in dep["stitches"]}
    params = {row["stitch_id"]: row["params"] for row in dep["stitches"]}
    assert all(v is not None and v > 1 for v in val.values()) and {0, 1} <= set(val)
    for d in r["deployed"]:
        assert val[d["stitch_id"]] == min(val[s] for s in val if params[s] <= d["budget"])
    assert sum(row["updates"] for row in dep["stitches"]) == 6
    assert (tmp_path / "run" / "deployed" / "budget00" / "tokenizer_config.json").is_file()
    # the deployed stitches generate and chat from the command line, chosen by budget
    run = str(tmp_path / "run")
    biggest = max(d["params"] for d in r["deployed"]) / 1e6
    g = esta("generate", "--run", run, "--budget", f"{biggest + 1:.3f}", "--prompt", "w1 w2", "--max-new-tokens", "4")
    assert g.returncode == 0, g.stderr
    c = subprocess.run([sys.executable, "-m", "esta.cli", "chat", "--model", r["deployed"][0]["path"],
                        "--max-new-tokens", "3"], input="w1 w2\nw3\n\n", capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert c.returncode == 0, c.stderr
    assert c.stdout.count("esta> ") == 2
    one_error_line(esta("generate", "--run", run, "--budget", "0.001", "--prompt", "x"), "fits")


def test_llm_stitches_score_zero_before_training(tmp_path):
    # why lm-train skips the importance scoring batch: every stitch's SNIP score is exactly 0 before training
    from transformers import AutoTokenizer

    from esta.families import load_family
    from esta.importance import snip_score
    from esta.instruct import build_dataset, collate, lm_loss
    from esta.palette import Palette
    from esta.pst import PSTConfig

    family = [save_tiny_lm(tmp_path / "a", "llama", 32, 3, 4, 2, seed=0),
              save_tiny_lm(tmp_path / "b", "qwen2", 48, 4, 6, 3, seed=1)]
    palette = Palette(load_family(family), kernel=2)
    palette.apply_pst(PSTConfig())
    tok = AutoTokenizer.from_pretrained(family[0])
    batch = collate(build_dataset(tok, [{"instruction": "w1 w2", "input": "", "output": "w3 w4"}] * 2, 16).examples, 0)
    for s in range(len(palette)):
        lm_loss(palette, batch, s).backward()
        params = palette.path_parameters(s)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # it does learn...
        assert snip_score(params) == 0.0  # ...but |theta * grad| is 0 everywhere
        palette.zero_grad(set_to_none=True)


def test_a_deployed_stitch_worse_than_both_anchors_is_flagged(caplog):
    from esta.lm_adapt import flag_outside_anchors

    anchors = [{"perplexity": 22.0, "mc_accuracy": 0.48}, {"perplexity": 14.0, "mc_accuracy": 0.63}]
    deployed = [{"name": "between", "params": 1e9, "perplexity": 19.0, "mc_accuracy": 0.5},
                {"name": "broken", "params": 1.5e9, "perplexity": 160.0, "mc_accuracy": 0.40},
                {"name": "no-mc", "params": 1.2e9, "perplexity": 21.0, "mc_accuracy": None}]
    flag_outside_anchors(deployed, anchors)
    assert [d["outside_anchors"] for d in deployed] == [[], ["perplexity", "mc_accuracy"], []]
    assert "broken" in caplog.text and "between" not in caplog.text
    # with the sample size known, a gap within two standard errors of a difference is noise, not a flag
    noisy = [{"name": "close", "params": 1e9, "perplexity": 22.0, "mc_accuracy": 0.454},
             {"name": "far", "params": 1e9, "perplexity": 22.0, "mc_accuracy": 0.40}]
    flag_outside_anchors(noisy, [{"perplexity": 22.4, "mc_accuracy": 0.508}, anchors[1]], mc_questions=240)
    assert [d["outside_anchors"] for d in noisy] == [[], ["mc_accuracy"]]


def test_lm_train_flags_reach_the_config(monkeypatch, tmp_path):
    # the CLI keeps the LLM job's own training defaults (no scoring batch, warm-up) and overrides only its flags
    import esta.recipe
    from esta.cli import main

    seen = {}

    def fake_adapt_lm(cfg):
        seen["cfg"] = cfg
        return {"anchors": [], "deployed": []}

    monkeypatch.setattr(esta.recipe, "run", fake_adapt_lm)  # the job esta train runs
    assert main(["lm-train", "--anchors", "a", "b", "--data", "d.jsonl", "--mc-examples", "0", "--steps", "7",
                 "--groups", "3", "--deploy-by", "importance", "--validation-examples", "5", "--no-progress",
                 "--lora-rank", "4", "--bias", "shared", "--lora-targets", "q_proj,v_proj"]) == 0
    cfg = seen["cfg"]
    assert (cfg.pst.lora_rank, cfg.pst.bias, cfg.pst.lora_targets) == (4, "shared", ("q_proj", "v_proj"))
    assert (cfg.train.steps, cfg.train.sampling.groups, cfg.deploy_by, cfg.validation_examples) == (7, 3, "importance", 5)
    defaults = LMAdaptConfig().train
    assert cfg.train.score_init_batch is False and cfg.train.warmup_steps == defaults.warmup_steps
    assert cfg.train.sampling.eps == defaults.sampling.eps and cfg.mc_root is None


def test_unset_lm_train_flags_keep_the_config_defaults(monkeypatch):
    import esta.recipe
    from esta.cli import main

    seen = {}
    monkeypatch.setattr(esta.recipe, "run",
                        lambda cfg: seen.setdefault("cfg", cfg) and {"anchors": [], "deployed": []})
    assert main(["lm-train", "--anchors", "a", "b", "--data", "d.jsonl", "--mc-examples", "0"]) == 0
    cfg, ref = seen["cfg"], LMAdaptConfig()
    for name in ("dtype", "max_length", "heldout_examples", "validation_examples", "screen_ratio", "screen_examples",
                 "deploy_by", "kernel", "train", "pst", "train_examples"):
        assert getattr(cfg, name) == getattr(ref, name), name
