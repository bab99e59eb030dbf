"""The peers' whole spaces as esta palettes: SN-Netv2's two-way space and SN-Net's space without nearest stitching
are built route by route as the peers build them, and a route of three segments (two stitching layers) trains,
deploys, loads with transformers, exports to ONNX and serves like any stitch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import esta, image_folder, perturb_adapters

from esta.deploy import DeployedStitch
from esta.report import model_card
from esta.routes import peer_space
from esta.space import Stitch, build_space
from esta.tasks import AdaptConfig
from esta.train import TrainConfig


def _route(s: Stitch, depths: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple((a, first, depths[a] - 1 if last is None else last) for a, first, last in s.segments)


@pytest.mark.parametrize("depths,options,peer,count", [
    ([12, 24], {"two_way": True}, "snnetv2", 134),
    ([12, 12, 12], {"pairing": "all"}, "snnet-all", 732),
    ([12, 12, 12], {"pairing": "all", "stitch_layers": "per-cut"}, "snnet-all", 732),
])
def test_the_options_build_the_peers_spaces_route_by_route(depths, options, peer, count):
    space = build_space(depths, **options)
    routes = [r.segments for r in peer_space(peer, depths)]
    assert len(space) == count and [_route(s, space.depths) for s in space.stitches] == routes
    three = [s for s in space.stitches if s.mid is not None]
    assert three and all(len(s.layer_keys) == 2 for s in three)
    fitted = set(space.layers)  # every layer a three-segment route runs is a two-segment cut's layer too
    assert all(set(s.layer_keys) <= fitted for s in three)
    for key in fitted:
        assert space.cuts_of_layer(key) and set(space.cuts_of_layer(key)) <= set(space.users_of_layer(key))


def test_other_spaces_keep_esta_two_segment_rules():
    assert len(build_space([12, 12, 12], two_way=True)) == 3 + 4 * 34  # SN-Netv2 takes two anchors
    assert all(s.mid is None for s in build_space([24, 28], two_way=True).stitches)  # 28 is no multiple of 24
    assert len(build_space([12, 12], pairing="all")) == 2 + 34


@pytest.mark.parametrize("flags,count", [(["--two-way", "--depths", "12,24"], 134),
                                         (["--pairing", "all", "--depths", "12,12,12"], 732)])
def test_esta_space_prints_the_peers_counts(flags, count):
    r = esta("space", *flags, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["count"] == count


def test_a_three_segment_route_trains_deploys_exports_and_serves(vit_family, tmp_path):
    from transformers import AutoModelForImageClassification

    import esta as esta_api
    from esta.runs import load_run, save_run_palette
    from esta.serving import load_palette

    data = image_folder(tmp_path / "data", per_class=6)
    results = esta_api.run(AdaptConfig(
        anchors=vit_family[:2], data=str(data), out_dir=str(tmp_path / "run"), two_way=True, progress=False,
        train=TrainConfig(steps=40, batch_size=8), validation_examples=4, probe_examples=16,
        cache_dir=str(tmp_path / "cache")))
    rows = {r["name"]: r for r in results["stitches"]}
    three = [r for r in results["stitches"] if r["mid"] is not None]
    assert len(results["stitches"]) == 8 and len(three) == 2  # SN-Netv2's space for two 3-block anchors
    assert sum(r["updates"] for r in three) > 0, [(r["name"], r["updates"], r["group"]) for r in results["stitches"]]
    assert all(r["accuracy"] is not None for r in three)
    assert all(p["front"] != p["end"] for p in results["pairs"])  # three-segment routes are in no pair's curve
    assert "0[:1]->1[1:2]->0[2:]" in rows and "1[:1]->0[1:2]->1[2:]" in rows

    palette, _ = load_run(tmp_path / "run")
    palette.eval()
    perturb_adapters(palette)  # stitch-specific biases on both stitching layers must be merged on deployment
    pixels = torch.rand(3, 1, 8, 8)
    for r in three:
        sid = r["id"]
        folder = tmp_path / f"stitch{sid}"
        DeployedStitch.from_palette(palette, sid).save_pretrained(folder)
        saved = json.loads((folder / "esta_stitch.json").read_text())
        assert saved["stitch"]["mid"] is not None and saved["stitching2"] and saved["mid"]["family"]
        run = {k: v for k, v in results["run"].items() if k != "deployed"}
        assert "another stitching layer" in model_card(saved, results["run"]["deployed"][0], run, None)
        with torch.no_grad():
            expected = palette(pixels, stitch=sid)
            torch.testing.assert_close(DeployedStitch.from_pretrained(folder)(pixels), expected, atol=1e-5, rtol=0)
            hf = AutoModelForImageClassification.from_pretrained(folder)
            torch.testing.assert_close(hf(pixel_values=pixels).logits, expected, atol=1e-5, rtol=0)

    served, table = load_palette(save_run_palette(tmp_path / "run"))
    trained, _ = load_run(tmp_path / "run")
    trained.eval()
    with torch.no_grad():
        for r in three:
            torch.testing.assert_close(served(pixels, stitch=r["id"]), trained(pixels, stitch=r["id"]), atol=1e-5,
                                       rtol=0)
    assert sum(s["name"] in {r["name"] for r in three} for s in table["stitches"]) == 2

    pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here (pip install 'esta[onnx]')")
    from esta.export import export_onnx

    assert export_onnx(tmp_path / f"stitch{three[0]['id']}")["max_abs_diff"] <= 1e-4


def test_a_three_segment_language_route_generates_with_its_caches(tmp_path):
    """An L->S->L route of a language pair: the end part runs the same anchor as the front, each part keeps its own
    cache; cached generation equals uncached, in the palette, deployed, and through transformers' generate()."""
    from lm_fixtures import WORDS, save_tiny_lm
    from transformers import AutoModelForCausalLM

    from esta.families import load_family
    from esta.generate import generate
    from esta.palette import Palette

    family = [save_tiny_lm(tmp_path / "s", "llama", 32, 3, 4, 2, seed=0),
              save_tiny_lm(tmp_path / "l", "llama", 48, 3, 6, 3, seed=1)]
    palette = Palette(load_family(family), two_way=True)
    ids = torch.randint(4, len(WORDS), (4, 9), generator=torch.Generator().manual_seed(5))
    palette.init_stitching({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    palette.eval()
    x = torch.randint(4, len(WORDS), (2, 5), generator=torch.Generator().manual_seed(4))
    three = [s for s in palette.space.stitches if s.mid is not None]
    assert {s.name for s in three} == {"1[:1]->0[1:2]->1[2:]", "0[:1]->1[1:2]->0[2:]"}
    for s in three:
        deployed = DeployedStitch.from_palette(palette, s.id)
        for model in (lambda inp, c=s.id: palette(inp, stitch=c), deployed):
            assert torch.equal(generate(model, x, 8, use_cache=True), generate(model, x, 8, use_cache=False))
        deployed.save_pretrained(tmp_path / s.name)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / s.name)
        out = hf.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x))
        assert torch.equal(out, generate(deployed, x, 8, use_cache=True))
