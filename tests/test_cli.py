"""Bad input gets one clear ``esta: error:`` line and a non-zero exit: no traceback, nothing else on stderr."""

import json
from pathlib import Path

import pytest
from helpers import esta, image_folder, one_error_line, save_tiny

from esta.space import build_space


def test_anchors_with_different_patch_size(tmp_path):
    a = save_tiny(tmp_path / "a", patch_size=4)
    b = save_tiny(tmp_path / "b", width=32, heads=4, patch_size=2)
    one_error_line(esta("train", "--anchors", a, b, "--data", "digits", "--out", str(tmp_path / "r")),
                   "patch_size", a, b)


def test_anchors_with_different_image_size(tmp_path):
    a = save_tiny(tmp_path / "a", image_size=8)
    b = save_tiny(tmp_path / "b", width=32, heads=4, image_size=16)
    one_error_line(esta("train", "--anchors", a, b, "--data", "digits", "--out", str(tmp_path / "r")),
                   "image_size")


def test_missing_anchor_folder(tmp_path):
    a = save_tiny(tmp_path / "a")
    one_error_line(esta("train", "--anchors", a, str(tmp_path / "nope"), "--out", str(tmp_path / "r")),
                   "nope", "does not exist")


def test_empty_dataset_folder(tmp_path, vit_family):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
    one_error_line(esta("train", "--anchors", *vit_family[:2], "--data", str(tmp_path / "data"),
                        "--out", str(tmp_path / "r")), "no images")


def test_budget_below_the_cheapest_stitch_is_refused_before_training(tmp_path, vit_family):
    data = image_folder(tmp_path / "data")
    r = esta("train", "--anchors", *vit_family[:2], "--data", str(data), "--budgets", "0.0000001",
             "--out", str(tmp_path / "r"), "--no-progress")
    one_error_line(r, "below the cheapest stitch")
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_train_deploy_evaluate_on_an_image_folder(tmp_path, vit_family):
    data = image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    r = esta("train", "--anchors", *vit_family, "--data", str(data), "--steps", "6", "--batch-size", "8",
             "--groups", "3", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["stitches"]) == len(build_space([3, 3, 3])) == 17
    budgets = [d["budget"] for d in results["deployed"]]
    anchor_costs = [s["flops"] for s in results["stitches"] if s["is_anchor"]]
    assert set(anchor_costs) <= set(budgets) and 3 <= len(budgets) <= 6  # a budget per group and per anchor
    for d in results["deployed"]:
        assert d["accuracy"] == pytest.approx(d["accuracy_in_palette"])  # reloaded model == palette
        assert d["regret"] >= 0 and d["regret_in_budget"] >= 0 and Path(d["path"], "model.safetensors").is_file()
        assert d["flops"] <= d["budget"]
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "results.csv").is_file()
    # redeploy for one explicit budget from the finished run, then evaluate the deployed stitch alone
    budget = results["deployed"][1]["budget"] / 1e9
    r = esta("deploy", "--run", str(out), "--budgets", f"{budget:.9f}", "--out", str(tmp_path / "dep"))
    assert r.returncode == 0, r.stderr
    r = esta("evaluate", "--model", str(tmp_path / "dep" / "budget00"), "--data", str(data), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert 0.0 <= json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] <= 1.0


def _other_value(flag, default):
    """A command-line value for ``flag`` that differs from the config's ``default``, and the value it becomes."""
    from typing import Literal, get_args, get_origin

    hint = flag.hint
    if hint is bool:
        return [flag.name if not default else "--no-" + flag.name[2:]], not default
    if get_origin(hint) is Literal:
        choice = next(c for c in get_args(hint) if c != default)
        return [flag.name, choice], choice
    if flag.path == "anchors":
        return [flag.name, "a", "b"], ["a", "b"]
    if get_origin(hint) in (list, tuple):
        words = ["1", "2"] if get_args(hint)[:1] == (int,) else ["x1", "x2"]
        value = [int(w) for w in words] if words[0] == "1" else words
        return [flag.name, ",".join(words)], tuple(value) if isinstance(default, tuple) else value
    if hint is float or isinstance(default, float):
        value = (default or 0.5) * 0.5 + 0.125
        return [flag.name, repr(value)], value
    if hint is int or isinstance(default, int) or flag.path == "train_examples":  # int, or int | "default"
        value = (default if isinstance(default, int) else 1) + 3
        return [flag.name, str(value)], value
    return [flag.name, "some-value"], "some-value"


def _with(config, path: str, value):
    """``config`` with only the setting at ``path`` (e.g. "train.sampling.groups") replaced by ``value``."""
    from dataclasses import replace

    head, _, rest = path.partition(".")
    return replace(config, **{head: _with(getattr(config, head), rest, value) if rest else value})


def test_every_training_flag_reaches_its_setting_and_unset_ones_keep_the_configs_defaults():
    """The flags are made from the config dataclasses: each one sets exactly its field (epochs and lr included),
    and a command line with none gives the config class's own defaults (nothing written twice)."""
    from dataclasses import replace

    from esta.cli import COMMANDS, _training_flags, build_parser, training_config
    from esta.flags import _get, given_settings
    from esta.tasks import AdaptConfig, LMAdaptConfig, config_for

    flags = _training_flags()
    assert {"train.epochs", "train.lr", "train.steps", "train.sampling.groups", "pst.lora_rank",
            "calibration.steps", "heldout_examples", "eval_examples"} <= {f.path for f in flags}
    parser = build_parser()
    assert training_config(parser.parse_args(["train"])) == replace(AdaptConfig(), **COMMANDS["train"])
    assert training_config(parser.parse_args(["demo"])) == replace(AdaptConfig(), **COMMANDS["demo"])
    for f in flags:
        cls = AdaptConfig if AdaptConfig in f.owners else LMAdaptConfig
        base = replace(cls(), **COMMANDS["train"])
        default = _get(base, f.path)
        words, value = _other_value(f, default)
        args = parser.parse_args(["train", *words])
        config = config_for(given_settings(args, flags), flags, COMMANDS["train"], cls)
        assert _get(config, f.path) == value, (f.name, _get(config, f.path), value)
        assert config == _with(base, f.path, _get(config, f.path)), f.name  # and nothing else moved


def test_a_flag_of_the_other_task_is_refused_in_one_line(tmp_path, vit_family):
    one_error_line(esta("train", "--anchors", *vit_family, "--max-length", "64", "--out", str(tmp_path / "r")),
                   "--max-length", "only for instruction tuning")


def test_a_run_replays_from_its_run_json_and_a_bad_config_is_one_line(tmp_path):
    from esta.adapt import AdaptConfig

    cfg = AdaptConfig(data="digits", method="snnet", budgets=[0.1, 0.2])
    cfg.train.sampling.groups = 4
    cfg.pst.lora_targets = ("query", "value")
    (tmp_path / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "space": {}}))
    assert AdaptConfig.from_file(tmp_path / "run.json") == cfg
    (tmp_path / "c.yaml").write_text("data: mnist\ntrain:\n  steps: 7\n  sampling:\n    anchor_share: 0.3\n")
    y = AdaptConfig.from_file(tmp_path / "c.yaml")
    assert (y.data, y.train.steps, y.train.sampling.anchor_share) == ("mnist", 7, 0.3)
    (tmp_path / "bad.yaml").write_text("train:\n  stepz: 7\n")
    one_error_line(esta("train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r")),
                   "unknown settings", "stepz")


def test_the_python_api_and_the_cli_train_a_method_at_the_same_rate(tmp_path, monkeypatch):
    """A method's learning rate is resolved by the library (esta.run), not by the CLI: SN-Net's own rate either way,
    and a rate given explicitly is kept."""
    import esta
    from esta import recipe
    from esta.adapt import AdaptConfig
    from esta.cli import build_parser, training_config
    from esta.methods import get_method

    seen = []
    monkeypatch.setattr(recipe, "_run", lambda config, task, out: seen.append(config) or {})
    esta.run(AdaptConfig(method="snnet", out_dir=str(tmp_path / "api"), progress=False))
    cli = training_config(build_parser().parse_args(["train", "--method", "snnet", "--out", str(tmp_path / "cli")]))
    esta.run(cli)
    esta.run(AdaptConfig(method="snnet", out_dir=str(tmp_path / "given"), progress=False,
                         train=esta.TrainConfig(lr=3e-5)))
    assert [c.train.lr for c in seen] == [get_method("snnet").lr, get_method("snnet").lr, 3e-5]
    assert get_method("snnet").lr != get_method("esta").lr
