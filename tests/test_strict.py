"""The catalog of bad inputs: each gets exit code 2, one ``esta: error:`` line, no traceback, and leaves what was
there untouched. Tiny random models; one shared finished run is copied for the cases that damage a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SRC, esta, image_folder, save_tiny
from safetensors.torch import load_file

from esta.deploy import CONFIG_NAME

TRAIN = ["--batch-size", "8", "--groups", "3", "--no-progress"]


def error2(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and exactly one ``esta: error:`` line, the last thing printed (progress logs of a run
    that got as far as training may come before it)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("esta: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=8)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, vit_family, data) -> Path:
    """One finished run (6 steps, checkpoints every 2), never modified: cases copy it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    r = esta("train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "6", "--checkpoint-every", "2",
             "--out", str(out), *TRAIN)
    assert r.returncode == 0, r.stderr
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. the impossible, refused before any model or data is loaded ------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], ["steps"]), (["--steps", "-5"], ["steps"]), (["--epochs", "0"], ["epochs"]),
    (["--batch-size", "0"], ["batch size"]), (["--batch-size", "-3"], ["batch size"]),
    (["--lr", "nan"], ["learning rate"]), (["--lr", "-1"], ["learning rate"]),
    (["--eps", "2"], ["eps"]), (["--tau", "0"], ["tau"]), (["--beta", "1.5"], ["beta"]),
    (["--groups", "0"], ["group"]), (["--lora-rank", "0"], ["rank"]), (["--stitch-lora-rank", "0"], ["rank"]),
    (["--budgets", "-1"], ["budgets"]), (["--eval-examples", "-3"], ["evaluation examples"]),
    (["--calibration-examples", "0"], ["calibration"]), (["--anchor-share", "1.5"], ["anchor_share"]),
    (["--method", "snnet", "--validation-examples", "0"], ["validation"]),
    (["--method", "no-such-method"], ["no-such-method"]),
])
def test_impossible_settings_are_refused_up_front(tmp_path, vit_family, flags, words, capsys):
    from esta.cli import main

    out = tmp_path / "never"
    # a missing data folder: were the settings not checked first, the error would name the data instead.
    # In-process (main() is what the esta command runs): no interpreter start-up for each of these cases.
    code = main(["train", "--anchors", *vit_family[:2], "--data", str(tmp_path / "no-data"), "--out", str(out),
                 *TRAIN, *flags])
    err = capsys.readouterr().err
    error2(subprocess.CompletedProcess([], code, "", err), *words)
    assert not out.exists()


# -- 2. runs are never mixed ----------------------------------------------------------------------------------------
def test_an_out_folder_holding_a_run_is_refused_then_replaced_whole_with_overwrite(tmp_path, vit_family, data,
                                                                                    finished):
    run = copy_run(finished, tmp_path)
    (run / "deployed" / "budget99").mkdir()  # a stale folder from some other run
    before = snapshot(run)
    args = ["train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "4", "--out", str(run), *TRAIN]
    error2(esta(*args), "already holds a run", "--overwrite", "--resume")
    assert snapshot(run) == before
    r = esta(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (run / "deployed" / "budget99").exists()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4
    manifest = json.loads((run / "deployed" / "manifest.json").read_text())
    assert sorted(p.name for p in (run / "deployed").iterdir() if p.is_dir()) == \
        sorted(e["folder"] for e in manifest["deployed"])


def test_resume_refuses_other_settings_and_names_them(tmp_path, vit_family, data, finished):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    base = ["train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "6", "--checkpoint-every", "2",
            "--out", str(run), *TRAIN]
    line = error2(esta(*base, "--resume", "--lr", "0.5", "--seed", "3"), "cannot resume", "lr", "seed")
    assert "0.5" in line
    error2(esta(*base, "--resume", "--overwrite"), "--resume", "--overwrite")
    assert snapshot(run) == before
    error2(esta(*[a if a != str(run) else str(tmp_path / "empty") for a in base], "--resume"), "nothing to resume")


def test_resume_may_change_what_is_deployed_not_what_is_trained(tmp_path):
    # budgets and the deployment rule only choose among trained stitches: a finished run resumes to redeploy
    from dataclasses import replace

    from esta.config import RecipeConfig
    from esta.errors import EstaError
    from esta.recipe import check_resumable

    cfg = RecipeConfig()
    (tmp_path / "run.json").write_text(json.dumps({"config": cfg.to_dict()}))
    check_resumable(tmp_path, replace(cfg, budgets=["0.1", "0.2"], deploy_by="loss"))
    with pytest.raises(EstaError, match="kernel"):
        check_resumable(tmp_path, replace(cfg, kernel=cfg.kernel + 1))


def test_redeploy_writes_a_fresh_folder_with_a_manifest(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    budget = json.loads((run / "results.json").read_text())["deployed"][-1]["budget"] / 1e9
    r = esta("deploy", "--run", str(run), "--budgets", f"{budget:.9f}")
    assert r.returncode == 0, r.stderr
    folders = sorted(p.name for p in (run / "deployed").iterdir() if p.is_dir())
    manifest = json.loads((run / "deployed" / "manifest.json").read_text())
    assert folders == ["budget00"] and [e["folder"] for e in manifest["deployed"]] == folders
    results = json.loads((run / "results.json").read_text())  # and the run's results describe what is there now
    assert [Path(d["path"]).name for d in results["deployed"]] == folders and results["deployed"][0]["redeployed"]
    assert results["summary"]["mean_deployed_accuracy"] == results["deployed"][0]["accuracy"]
    assert len(results["deployed_at_training"]) > 1


def test_deploying_an_unfinished_run_needs_allow_unfinished(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    state = run / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "step": 2}))  # as a run killed after its first checkpoint would be
    before = snapshot(run)
    error2(esta("deploy", "--run", str(run)), "unfinished", "step 2 of 6", "--allow-unfinished")
    assert snapshot(run) == before
    assert esta("deploy", "--run", str(run), "--allow-unfinished").returncode == 0


# -- 3. one line for every damaged file -----------------------------------------------------------------------------
@pytest.mark.parametrize("victim, damage, command, words", [
    ("checkpoint/adaptation.safetensors", "truncate", "deploy", ["adaptation.safetensors", "damaged"]),
    ("checkpoint/state.json", "garbage", "deploy", ["state.json", "damaged"]),
    ("checkpoint/sampler.safetensors", "delete", "deploy", ["sampler.safetensors", "missing"]),
    ("checkpoint/optim.pt", "garbage", "resume", ["optim.pt", "damaged"]),
    ("run.json", "truncate", "deploy", ["run.json", "damaged"]),
    ("run.json", "garbage", "deploy", ["run.json", "damaged"]),
    ("results.json", "truncate", "deploy", ["results.json", "damaged"]),
    ("run.json", "truncate", "resume", ["run.json", "damaged"]),
])
def test_a_damaged_checkpoint_is_one_line(tmp_path, vit_family, data, finished, victim, damage, command, words):
    run = copy_run(finished, tmp_path)
    path = run / victim
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00not what it should be\xff" * 5)
    else:
        path.unlink()
    if command == "deploy":
        r = esta("deploy", "--run", str(run))
    else:
        r = esta("train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "6", "--checkpoint-every",
                 "2", "--out", str(run), "--resume", *TRAIN)
    error2(r, *words)


@pytest.mark.parametrize("tamper, words", [
    ("bad-json", ["not valid JSON"]), ("image-mean", ["edited"]), ("missing-key", ["edited"]),
    ("cut-out-of-range", ["does not describe"]), ("hidden-size", ["does not describe"]),
    ("unknown-family", ["unknown anchor family"]), ("truncated-weights", ["damaged"]),
])
def test_a_tampered_deployed_stitch_is_refused(tmp_path, data, finished, tamper, words):
    src = Path(json.loads((finished / "results.json").read_text())["deployed"][0]["path"])
    model = Path(shutil.copytree(src, tmp_path / "model"))
    cfg_path = model / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    if tamper == "bad-json":
        cfg_path.write_text(cfg_path.read_text()[:-20])
    elif tamper == "image-mean":
        cfg["front"]["image_mean"] = [0.9] * len(cfg["front"]["image_mean"])
        cfg_path.write_text(json.dumps(cfg))
    elif tamper == "missing-key":
        del cfg["stitch"]
        cfg_path.write_text(json.dumps(cfg))
    elif tamper in ("cut-out-of-range", "hidden-size", "unknown-family"):  # an edit that also fixed the checksum
        cfg.pop("checksum")
        if tamper == "cut-out-of-range":  # (an anchor becomes a cut at block 99 of 3)
            cfg["stitch"].update(front_last=99, end_first=cfg["stitch"]["end_first"] or 0,
                                 layer=cfg["stitch"]["layer"] or "0-0")
        elif tamper == "hidden-size":
            cfg["front"]["config"]["hidden_size"] *= 2
        else:
            cfg["front"]["family"] = "audio"
        cfg_path.write_text(json.dumps(cfg))
    else:
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:64])
    error2(esta("evaluate", "--model", str(model), "--data", str(data), "--no-progress"), *words)


def test_damaged_or_pickled_anchor_weights_are_one_line(tmp_path, data):
    from transformers import ViTConfig, ViTForImageClassification

    torn = Path(save_tiny(tmp_path / "torn"))
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:200])
    error2(esta("train", "--anchors", str(torn), str(torn), "--data", str(data), "--out", str(tmp_path / "r1"),
                *TRAIN), "torn")
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=2)
    model = ViTForImageClassification(cfg)
    model.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()  # what an old checkpoint holds: a pickle only
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    error2(esta("train", "--anchors", str(tmp_path / "pickled"), str(tmp_path / "pickled"), "--data", str(data),
                "--out", str(tmp_path / "r2"), *TRAIN), "pickled", "safetensors")


def custom_code_folder(root: Path) -> Path:
    """A checkpoint folder whose config asks for its own Python (auto_map), which would print a marker."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "esta-test-custom", "architectures": ["Custom"], "num_hidden_layers": 3,
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}}))
    (root / "custom.py").write_text("print('FOREIGN CODE RAN')\nfrom transformers import PretrainedConfig\n"
                                    "class CustomConfig(PretrainedConfig):\n    model_type = 'esta-test-custom'\n")
    return root


@pytest.mark.parametrize("command", ["space", "train", "lm-train", "analyze"])
def test_no_entry_point_runs_a_folders_own_code_or_asks(tmp_path, data, command):
    folder = custom_code_folder(tmp_path / "custom")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"instruction": "say hi", "input": "", "output": "hi"}) + "\n")
    args = {
        "space": ["space", "--anchors", str(folder), str(folder)],
        "train": ["train", "--anchors", str(folder), str(folder), "--data", str(data), "--out", str(tmp_path / "r"),
                  *TRAIN],
        "lm-train": ["lm-train", "--anchors", str(folder), str(folder), "--data", str(records), "--out",
                     str(tmp_path / "r"), "--mc-examples", "0", "--no-progress"],
        "analyze": ["analyze", "grad-angles", "--anchors", str(folder), str(folder), "--out", str(tmp_path / "r"),
                    "--no-progress"],
    }[command]
    env_run = subprocess.run([sys.executable, "-m", "esta.cli", *args], capture_output=True, text=True,
                             input="y\ny\n", timeout=120, env={**os.environ, "PYTHONPATH": SRC})
    assert "FOREIGN CODE RAN" not in env_run.stdout + env_run.stderr
    assert "[y/N]" not in env_run.stdout + env_run.stderr
    error2(env_run, str(folder))


def test_a_missing_anchor_folder_in_space_is_one_line(tmp_path):
    error2(esta("space", "--anchors", str(tmp_path / "nope"), str(tmp_path / "nope")), "nope")


# -- 4. data --------------------------------------------------------------------------------------------------------
def test_a_mistyped_builtin_task_fails_at_once_with_a_suggestion(tmp_path, vit_family):
    error2(esta("train", "--anchors", *vit_family[:2], "--data", "animal-shape", "--out", str(tmp_path / "r"),
                *TRAIN), "animal-shapes")


def test_instruction_data_errors_name_the_line(tmp_path):
    from esta.errors import EstaError
    from esta.instruct import load_records

    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    lines = [good] * 10 + ['{"instruction": "a", "output": ']
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(EstaError, match="line 11 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "num.jsonl").write_text(good + "\n\n" + json.dumps({"instruction": "a", "input": 3, "output": "b"}))
    with pytest.raises(EstaError, match="line 3 has an 'input' of type int"):
        load_records(tmp_path / "num.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(good.replace('"b"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(EstaError, match="not UTF-8"):
        load_records(tmp_path / "latin1.jsonl")


def test_a_class_missing_from_a_split_is_named_in_a_warning(tmp_path, vit_family, caplog):
    from esta.adapt import warn_missing_classes
    from esta.data import load_image_task
    from esta.errors import EstaError

    root = image_folder(tmp_path / "d", per_class=4)
    (root / "test" / "class2").mkdir()
    (root / "train" / "class2").mkdir()
    shutil.copy(root / "train" / "class0" / "0.png", root / "train" / "class2" / "0.png")
    task = load_image_task(str(root), image_size=8, num_channels=1)
    with caplog.at_level("WARNING"):
        warn_missing_classes(task)
    assert "class2" in caplog.text and "test" in caplog.text
    with pytest.raises(EstaError, match="class2.*--strict"):
        warn_missing_classes(task, strict=True)


def test_an_unwritable_out_folder_is_one_line(tmp_path, vit_family, data):
    (tmp_path / "a-file").write_text("x")
    error2(esta("train", "--anchors", *vit_family[:2], "--data", str(data), "--out", str(tmp_path / "a-file" / "r"),
                *TRAIN), "a-file")


# -- 5. finite or stop; a crash costs at most the steps since the last checkpoint ----------------------------------
@pytest.mark.parametrize("method", [["--uniform-sampling"], ["--method", "snnet"]])
def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_deploys_nothing(tmp_path, vit_family, data,
                                                                                   method):
    out = tmp_path / "r"
    r = esta("train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "30", "--lr", "1e9",
             *method, "--checkpoint-every", "1", "--out", str(out), *TRAIN)
    error2(r, "non-finite", "learning rate")
    assert not (out / "deployed").exists() and not (out / "results.json").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] < 30
    for name, t in load_file(str(out / "checkpoint" / "adaptation.safetensors")).items():
        assert torch.isfinite(t).all(), name


def test_one_image_per_class_runs_or_is_one_line(tmp_path, vit_family):
    data = image_folder(tmp_path / "tiny", per_class=1)
    base = ["train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "3", "--batch-size", "2",
            "--groups", "2", "--no-progress"]
    r = esta(*base, "--deploy-by", "loss", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-2000:]
    error2(esta(*base, "--out", str(tmp_path / "b")), "too few", "validation")  # the default deploys by validation
    error2(esta(*base, "--method", "snnet", "--out", str(tmp_path / "c")), "too few", "validation")


# -- 4. every JSON file of a finished run, damaged, under every command that reads it --------------------------
def _readers(run: Path, rel: Path, data: Path, vit_family: list[str]) -> dict[str, list[str]]:
    """The commands that read ``rel`` of a finished run (a run's files, a deployed folder's, the palette's)."""
    if rel.parts[0] == "palette":
        return {"serve": ["serve"], "profile": ["profile", "--palette", str(run / "palette"), "--repeats", "1",
                                                "--warmup", "0", "--no-progress"]}
    if rel.parts[0] == "deployed":
        model = run / rel.parent if rel.parent.name.startswith("budget") else run / "deployed" / "budget00"
        return {"evaluate": ["evaluate", "--model", str(model), "--data", str(data), "--no-progress"],
                "export": ["export", "--model", str(model), "--format", "transformers"]}
    return {"deploy": ["deploy", "--run", str(run), "--out", str(run.parent / "redeployed")],
            "deploy --palette": ["deploy", "--run", str(run), "--palette", "--out", str(run.parent / "palette2")],
            "resume": ["train", "--anchors", *vit_family[:2], "--data", str(data), "--steps", "6",
                       "--checkpoint-every", "2", "--out", str(run), "--resume", "--no-sweep", *TRAIN]}


def _outcome(command: list[str], run: Path, capsys) -> tuple[int, str]:
    """Exit code and stderr of one command run in this process (any exception but EstaError escapes the test)."""
    from esta.cli import main
    from esta.errors import EstaError

    if command == ["serve"]:  # the app `esta serve` starts, built here
        from esta.serve import create_app

        try:
            create_app(run / "palette")
            return 0, ""
        except EstaError as e:
            return 2, f"esta: error: {e}"
    code = main(command)
    return code, capsys.readouterr().err


def test_every_json_file_of_a_run_truncated_or_garbled_is_one_line_for_every_reader(tmp_path, vit_family, data,
                                                                                     finished, capsys):
    """Each JSON file of a finished run (run.json, results.json, checkpoint/state.json, the deployments' manifest,
    each deployed folder's esta_stitch.json, config.json and preprocessor_config.json, the palette's table), cut in
    half or garbled, under each command that reads it (deploy, deploy --palette, --resume; evaluate, export; serve,
    profile): it works (the file is not one it needs) or exits 2 with one ``esta: error:`` line; never a traceback."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from esta.cli import main

    base = copy_run(finished, tmp_path / "base")
    assert main(["deploy", "--run", str(base), "--palette"]) == 0  # the palette artifact is part of the run too
    files = sorted(p.relative_to(base) for p in base.rglob("*.json"))
    names = {str(f) for f in files}
    assert {"run.json", "results.json", "checkpoint/state.json", "deployed/manifest.json",
            "palette/palette.json"} <= names, names
    assert {"esta_stitch.json", "config.json", "preprocessor_config.json"} <= {f.name for f in files}
    wrong, refused = [], set()
    for i, rel in enumerate(files):
        for damage in ("truncate", "garble"):
            run = Path(shutil.copytree(base, tmp_path / f"case{i}-{damage}" / "run"))
            text = (run / rel).read_bytes()
            (run / rel).write_bytes(text[: len(text) // 2] if damage == "truncate" else b"\x00{\xff" + text[::-1])
            for name, command in _readers(run, rel, data, vit_family).items():
                code, err = _outcome(command, run, capsys)
                lines = [line for line in err.splitlines() if line.strip()]
                if code == 2 and lines and lines[-1].startswith("esta: error: ") and "Traceback" not in err:
                    refused.add(rel)
                elif code != 0:
                    wrong.append(f"{rel} {damage}, {name}: exit {code}: {err[-300:]}")
    assert not wrong, "\n".join(wrong)
    # every file but the deployments' manifest (written for people and tools; no command reads it back) is read by
    # a command, which refuses the damage
    assert refused == set(files) - {Path("deployed/manifest.json")}, set(files) - refused
