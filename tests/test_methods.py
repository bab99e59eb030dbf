"""Baselines and ablations run through the same pipeline and differ only where they should."""

import pytest
import torch
from helpers import image_folder

from esta.adapt import AdaptConfig, adapt, held_out_sets
from esta.data import TensorImageDataset
from esta.errors import EstaError
from esta.importance import SamplingConfig
from esta.methods import METHODS, get_method
from esta.runs import load_run
from esta.train import TrainConfig


def run(tmp_path, family, method: str, **kw) -> dict:
    data = image_folder(tmp_path / "data", per_class=12)
    cfg = AdaptConfig(anchors=family, data=str(data), out_dir=str(tmp_path / method), method=method,
                      train=TrainConfig(steps=6, batch_size=8, sampling=SamplingConfig(groups=3)),
                      validation_examples=6, progress=False, **kw)
    return adapt(cfg)


def one_per_group_and_anchor(r: dict) -> bool:
    """The default budgets: each budget group's costliest stitch (3 groups here) and each anchor's own cost."""
    budgets = [d["budget"] for d in r["deployed"]]
    anchor_costs = {s["flops"] for s in r["stitches"] if s["is_anchor"]}
    return (anchor_costs <= set(budgets) and len(set(budgets)) == len(budgets) <= 3 + len(anchor_costs)
            and all(d["flops"] <= d["budget"] for d in r["deployed"]))


def test_unknown_method_is_refused():
    with pytest.raises(EstaError, match="unknown method 'lora'.*snnet"):
        get_method("lora")


def test_validation_and_evaluation_sets_never_overlap():
    labels = torch.arange(40) % 4
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous()
    val, ev = held_out_sets(TensorImageDataset(images, labels), 8, 20, seed=0)
    ids = lambda d: {int(x) for x in d.images[:, 0, 0, 0]}  # noqa: E731
    assert len(val) == 8 and len(ev) == 20 and not ids(val) & ids(ev)
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # stratified


def test_snnet_fine_tunes_everything_and_deploys_by_validation(tmp_path, vit_family):
    r = run(tmp_path, vit_family, "snnet")
    assert r["method"] == "snnet"
    assert r["train"]["trainable_params"] == r["train"]["total_params"]  # anchors + stitching layers, no LoRA
    assert one_per_group_and_anchor(r) and len(r["summary"]["group_accuracy"]) == len(r["deployed"])
    palette, _ = load_run(tmp_path / "snnet")  # reloads as a full fine-tune, no PST layers
    assert not any("lora" in n for n, _ in palette.named_parameters())


def test_anchors_lora_trains_and_deploys_only_anchors(tmp_path, vit_family):
    r = run(tmp_path, vit_family, "anchors-lora")
    anchors = {s["id"] for s in r["stitches"] if s["is_anchor"]}
    assert {s["id"] for s in r["stitches"] if s["updates"]} <= anchors
    assert {d["stitch_id"] for d in r["deployed"]} <= anchors and one_per_group_and_anchor(r)
    assert all(s["accuracy"] is None for s in r["stitches"] if s["id"] not in anchors)  # only anchors swept


def test_shared_bias_ablation_has_one_bias_per_layer(tmp_path, vit_family):
    run(tmp_path, vit_family, "esta-shared-bias", sweep=False)
    palette, _ = load_run(tmp_path / "esta-shared-bias")
    keys = {n.rsplit(".", 1)[-1] for n, _ in palette.named_parameters() if "stitch_bias" in n}
    assert keys == {"shared"}


def test_every_method_is_listed_in_the_cli_help():
    from esta.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(m in text for m in METHODS)


def test_linear_probe_fits_heads_only_and_deploys_anchors(tmp_path, vit_family):
    r = run(tmp_path, vit_family, "linear-probe")
    anchors = {s["id"] for s in r["stitches"] if s["is_anchor"]}
    assert r["train"]["steps"] == 0 and not any(s["updates"] for s in r["stitches"])
    assert {d["stitch_id"] for d in r["deployed"]} <= anchors and one_per_group_and_anchor(r)
    assert r["head_init"]["mode"] == "probe" and len(r["head_init"]["probes"]) == 3


def test_snnet_samples_over_all_stitches_and_esta_keeps_its_groups():
    base = SamplingConfig(anchor_share=0.2)
    snnet = get_method("snnet").sampling(base)
    assert snnet.uniform and not snnet.by_group and snnet.anchor_share == 0
    assert get_method("snnet-groups").sampling(base).by_group
    esta = get_method("esta").sampling(base)
    assert esta.by_group and not esta.uniform and esta.anchor_share == 0.2
    assert get_method("esta-uniform").sampling(base).anchor_share == 0.2  # the ablation changes one thing only


def test_the_palette_is_reported_beside_its_anchors_tuned_alone_and_probed(tmp_path, vit_family):
    from esta.adapt import compare_alone

    data = image_folder(tmp_path / "data", per_class=12)
    cfg = AdaptConfig(anchors=vit_family, data=str(data), out_dir=str(tmp_path / "esta"),
                      train=TrainConfig(steps=4, batch_size=8, sampling=SamplingConfig(groups=3)),
                      validation_examples=6, progress=False)
    r = adapt(cfg)
    probes = [x for x in r["references"] if x["method"] == "linear-probe"]
    assert [x["name"] for x in probes] == ["a0", "a1", "a2"] and all(0 <= x["accuracy"] <= 1 for x in probes)
    refs = compare_alone(r, cfg, ["anchors-lora"])
    alone = [x for x in refs if x["method"] == "anchors-lora"]
    assert [x["name"] for x in alone] == ["a0", "a1", "a2"] and sum(x["steps"] for x in alone) == 3 * 4
    assert (tmp_path / "esta" / "references" / "anchors-lora" / "results.json").is_file()
    on_disk = __import__("json").loads((tmp_path / "esta" / "results.json").read_text())
    assert on_disk["references"] == refs
    with pytest.raises(EstaError, match="alone"):
        compare_alone(r, cfg, ["snnet"])
