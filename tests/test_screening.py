import math

import pytest
import torch
from lm_fixtures import WORDS, save_tiny_lm

from esta.errors import EstaError
from esta.families import load_family
from esta.instruct import lm_loss
from esta.palette import Palette
from esta.screening import screen_stitches


def batches(palette, n=2, t=9):
    """Batches labelled with the anchor's own greedy next tokens: the anchors are then good at them (low loss)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, len(WORDS), (2, t), generator=g)
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = palette(x, stitch=0).argmax(-1)[:, :-1]
        out.append({**x, "labels": labels})
    return out


@pytest.fixture(scope="module")
def palette(tmp_path_factory):
    # two identical anchors with identity stitching layers: natural cuts reproduce the anchor exactly; a random
    # tiny model is near-uniform, so its LM head is sharpened to make its own greedy labels easy (a low loss)
    path = save_tiny_lm(tmp_path_factory.mktemp("screen") / "a", "llama", 48, 4, 6, 3, seed=1)
    pal = Palette(load_family([path, path]), kernel=2)
    with torch.no_grad():
        for anchor in pal.anchors:
            anchor.lm_head.weight.mul_(30)
        for layer in pal.stitching.values():
            layer.weight.copy_(torch.eye(layer.out_features))
            layer.bias.zero_()
    return pal.eval()


def test_screening_drops_the_stitches_a_broken_stitching_layer_ruins_and_keeps_the_anchors(palette):
    data = batches(palette)
    key = next(iter(palette.stitching.keys()))
    healthy = screen_stitches(palette, data, lm_loss, ratio=1e6)
    assert healthy.dropped == [] and len(healthy.losses) == len(palette)
    natural = [c.id for c in palette.space.stitches if not c.is_anchor and c.end_first == c.front_last + 1]
    assert all(math.isclose(healthy.losses[c], healthy.losses[0], rel_tol=1e-4) for c in natural)
    layer = palette.stitching[key]
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():  # a least-squares fit gone wrong: huge outputs the end anchor cannot digest
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(0)) * 300)
        s = screen_stitches(palette, data, lm_loss, ratio=1.5)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    broken = {c.id for c in palette.space.cuts_of_layer(key)}
    assert broken <= set(s.dropped)
    assert set(palette.space.anchor_ids()) <= set(s.kept)
    assert sorted(s.kept + s.dropped) == list(range(len(palette)))
    worst_anchor = max(s.losses[a] for a in palette.space.anchor_ids())
    assert math.isclose(s.threshold, worst_anchor + math.log(1.5))
    assert all(s.losses[k] <= s.threshold for k in s.kept if k not in palette.space.anchor_ids())
    assert all(s.losses[k] > s.threshold for k in s.dropped)
    # the losses are the stitches' own: screening again after the repair gives the healthy ones back
    assert screen_stitches(palette, data, lm_loss, ratio=1e6).losses == healthy.losses


def test_screening_refuses_a_ratio_below_one(palette):
    with pytest.raises(EstaError, match="ratio"):
        screen_stitches(palette, batches(palette, 1), lm_loss, ratio=0.5)


def test_keeping_the_best_per_budget_group_keeps_the_lowest_screening_losses_and_every_anchor(palette):
    from esta.importance import budget_groups
    from esta.screening import best_per_group

    s = screen_stitches(palette, batches(palette), lm_loss, ratio=1e6)
    s.losses = [float(x) for x in torch.rand(len(palette), generator=torch.Generator().manual_seed(3))]  # distinct
    anchors = palette.space.anchor_ids()
    groups = budget_groups([float(i) for i in range(len(palette))], 3)  # any grouping of the ids will do
    capped = best_per_group(s, groups, 1, anchors)
    assert capped.per_group == 1 and set(anchors) <= set(capped.kept)
    assert sorted(capped.kept + capped.dropped) == list(range(len(palette)))
    for group in groups:
        others = [x for x in group if x not in anchors]
        assert [x for x in capped.kept if x in others] == ([min(others, key=lambda x: s.losses[x])] if others else [])
    assert best_per_group(s, groups, len(palette), anchors).kept == s.kept  # a cap above every group's size: no-op
    with pytest.raises(EstaError, match="at least 1"):
        best_per_group(s, groups, 0, anchors)
