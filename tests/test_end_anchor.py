"""Stitches that learn from their end anchor: end-anchor calibration, in-place distillation, per-pair curves."""

import math

import pytest
import torch

from esta.calibration import CalibrationConfig, calibrate_stitching, layer_error
from esta.distillation import distillation_term
from esta.errors import EstaError
from esta.families import load_family
from esta.pairs import describe, pair_curves
from esta.palette import Palette
from esta.pst import PSTConfig
from esta.train import classification_loss


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stitch_layers", ["per-window", "per-cut"])
def test_calibration_lowers_every_layers_end_feature_error_on_held_out_inputs(vit_family, stitch_layers):
    torch.manual_seed(0)
    palette = Palette(load_family(vit_family, num_labels=3), stitch_layers=stitch_layers).eval()
    palette.init_stitching(_images(32, 0))
    held_out = _images(48, 1)
    before = {k: layer_error(palette, k, held_out) for k in palette.stitching}
    report = calibrate_stitching(palette, _images(96, 2), CalibrationConfig(steps=40, lr=3e-3, batch_size=16))
    assert set(report) == set(palette.stitching)
    for key in palette.stitching:
        after = layer_error(palette, key, held_out)
        assert after < before[key], f"{key}: {before[key]:.4f} -> {after:.4f}"
        assert report[key]["after"] <= report[key]["before"]
    assert not any(p.requires_grad for p in palette.stitching.parameters())  # frozen again, as least squares left it


def test_calibration_of_the_first_blocks_touches_only_the_layers_entering_there(vit_family):
    torch.manual_seed(0)
    palette = Palette(load_family(vit_family, num_labels=3), stitch_layers="per-cut").eval()
    palette.init_stitching(_images(32, 0))
    start = {k: [p.detach().clone() for p in layer.parameters()] for k, layer in palette.stitching.items()}
    report = calibrate_stitching(palette, _images(64, 2), CalibrationConfig(steps=10, lr=3e-3, batch_size=16,
                                                                            first_blocks=1))
    entering = {k for k in palette.stitching if any(c.end_first == 1 for c in palette.space.cuts_of_layer(k))}
    assert set(report) == entering and 0 < len(entering) < len(palette.stitching)
    for key, layer in palette.stitching.items():
        same = all(torch.equal(p, p0) for p, p0 in zip(layer.parameters(), start[key]))
        assert same == (key not in entering or report[key]["after"] == report[key]["before"])


def test_calibration_of_named_layers_touches_only_those(vit_family):
    torch.manual_seed(0)
    palette = Palette(load_family(vit_family, num_labels=3), stitch_layers="per-cut").eval()
    palette.init_stitching(_images(32, 0))
    start = {k: [p.detach().clone() for p in layer.parameters()] for k, layer in palette.stitching.items()}
    chosen = list(palette.stitching)[1]
    report = calibrate_stitching(palette, _images(64, 2), CalibrationConfig(steps=10, lr=3e-3, batch_size=16),
                                 keys=[chosen])
    assert set(report) == {chosen} and report[chosen]["after"] < report[chosen]["before"]
    for key, layer in palette.stitching.items():
        assert all(torch.equal(p, p0) for p, p0 in zip(layer.parameters(), start[key])) == (key != chosen)
    with pytest.raises(EstaError, match="no stitching layer named 'nope'"):
        calibrate_stitching(palette, _images(8, 2), CalibrationConfig(steps=1), keys=["nope"])


def test_per_cut_layers_keep_the_stitches_and_give_each_cut_its_own_layer(vit_family):
    anchors = load_family(vit_family, num_labels=3)
    shared, own = Palette(anchors), Palette(anchors, stitch_layers="per-cut")
    assert [s.name for s in shared.space.stitches] == [s.name for s in own.space.stitches]
    cuts = [s for s in own.space.stitches if not s.is_anchor]
    assert len(own.stitching) == len(cuts) > len(shared.stitching)
    assert len({s.layer for s in cuts}) == len(cuts)


@pytest.fixture
def palette(vit_family):
    torch.manual_seed(0)
    p = Palette(load_family(vit_family, num_labels=3))
    p.init_stitching(_images(16, 0))
    p.apply_pst(PSTConfig())
    with torch.no_grad():  # trained-looking adapters and heads, so that student and teacher differ everywhere
        for q in p.parameters():
            if q.requires_grad:
                q.add_(torch.randn_like(q) * 0.05)
    return p


def test_the_distillation_term_is_zero_for_an_anchor(palette):
    images = _images(8, 3)
    teachers = palette.end_anchor_ids()
    for a in palette.space.anchor_ids():
        assert teachers[a] is None  # the trainer gives an anchor no teacher: its loss is the task loss alone
        logits = palette(images, stitch=a)
        assert float(distillation_term(logits, logits.detach())) == pytest.approx(0.0, abs=1e-6)
    s = next(s for s in palette.space.stitches if not s.is_anchor)
    assert palette.space[teachers[s.id]].front == s.end  # a stitch's teacher is the anchor whose head it ends in
    with torch.no_grad():
        assert float(distillation_term(palette(images, stitch=s.id), palette(images, stitch=teachers[s.id]))) > 0


def test_distillation_gradient_reaches_only_the_stitchs_own_parameters_and_the_shared_lora(palette):
    images, labels = _images(8, 4), torch.arange(8) % 3
    s = next(s for s in palette.space.stitches if not s.is_anchor and s.front == 1)
    teacher = palette.end_anchor_ids()[s.id]
    loss = classification_loss(palette, (images, labels), s.id, teacher, distill=1.0, temperature=2.0)
    loss.backward()
    on_path = {id(p) for p in palette.path_parameters(s.id)}
    got = [n for n, p in palette.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert got
    for name, p in palette.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert id(p) in on_path, f"{name} is off the stitch's path (e.g. the teacher's own biases) but moved"
    biases = [n for n in got if ".stitch_bias." in n]
    assert biases and all(n.endswith(f".stitch_bias.{s.id}") for n in biases)  # its own, never the anchor's
    assert any("lora_" in n and n.startswith(f"anchors.{s.end}.") for n in got)  # the end anchor's shared LoRA
    # pure distillation: the labels play no part
    palette.zero_grad(set_to_none=True)
    other = classification_loss(palette, (images, (labels + 1) % 3), s.id, teacher, distill=1.0, temperature=2.0)
    assert float(other) == pytest.approx(float(loss), rel=1e-6)


def _row(i, name, front, end, j, m, flops, acc):
    anchor = j is None
    return {"id": i, "name": name, "is_anchor": anchor, "front": front, "end": end, "front_last": j,
            "end_first": m, "flops": flops, "accuracy": acc}


def test_per_pair_figures_of_a_hand_made_results_file():
    rows = [_row(0, "anchor0", 0, 0, None, None, 1.0, 0.70), _row(1, "anchor1", 1, 1, None, None, 4.0, 0.80),
            # four stitches 0 -> 1 of 4-block anchors; cost rises as they run more of anchor 1
            _row(2, "0[:3]->1[3:]", 0, 1, 2, 3, 1.5, 0.71), _row(3, "0[:2]->1[2:]", 0, 1, 1, 2, 2.2, 0.74),
            _row(4, "0[:1]->1[1:]", 0, 1, 0, 1, 3.1, 0.73), _row(5, "0[:1]->1[0:]", 0, 1, 0, 0, 3.9, 0.78),
            _row(6, "unevaluated", 0, 1, 1, 1, 2.5, None)]
    (p,) = pair_curves(rows, depths=[4, 4], names=["Ti", "S"])
    assert (p["front_name"], p["end_name"], p["count"]) == ("Ti", "S", 4)
    assert p["spearman"] == pytest.approx(0.8)  # ranks 1,3,2,4 against 1,2,3,4
    assert p["most_end"]["name"] == "0[:1]->1[0:]"  # fewest front blocks, then the most end blocks
    assert p["most_end"]["gap_to_end"] == pytest.approx(0.02)
    assert p["above_cheaper"] == 4
    assert [q["share"] for q in p["points"]] == [0.25, 0.5, 0.75, 1.0]
    (line,) = describe([p])
    assert "Ti->S" in line and "0.80" in line and "+2.00 behind S" in line and "4 of 4 beat" in line
    # perplexity: lower is better, so a curve whose perplexity falls with cost climbs
    ppl = [{**r, "perplexity": 10 - 5 * r["accuracy"] if r["accuracy"] else None} for r in rows]
    (q,) = pair_curves(ppl, "perplexity", higher_is_better=False, depths=[4, 4])
    assert q["spearman"] == pytest.approx(0.8) and q["most_end"]["gap_to_end"] == pytest.approx(0.1)
    assert q["above_cheaper"] == 4 and math.isfinite(q["spearman_with_anchors"])
