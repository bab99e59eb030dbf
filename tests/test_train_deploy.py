import json

import pytest
import torch
from helpers import build, toy_task

from esta.cost import count_costs
from esta.deploy import DeployedStitch
from esta.families import load_family
from esta.importance import SamplingConfig
from esta.palette import Palette
from esta.pst import PSTConfig
from esta.selection import choose
from esta.train import TrainConfig, classification_loss, train


@pytest.mark.parametrize("family", ["vit_family", "deit_family"])
def test_tiny_checkpoints_load_as_anchors_and_train(family, request):
    paths = request.getfixturevalue(family)
    data = toy_task()
    palette, flops = build(paths, data)
    assert all(f > 0 for f in flops) and flops[0] < flops[1] < flops[2]  # anchors, small to large
    probe = [s.id for s in palette.space.stitches if s.is_anchor]
    loss0 = sum(torch.nn.functional.cross_entropy(palette(data.images, s), data.labels).item() for s in probe)
    cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, checkpoint_every=0,
                      sampling=SamplingConfig(groups=3), score_init_batch=True)
    result = train(palette, data, flops, cfg, progress=False)
    palette.eval()
    loss1 = sum(torch.nn.functional.cross_entropy(palette(data.images, s), data.labels).item() for s in probe)
    assert loss1 < loss0
    assert result.steps == 60 and sum(result.updates) == 60
    assert all(v > 0 for v in result.importance)  # every stitch was scored before training


@pytest.mark.parametrize("layers", [{}, {"stitch_layers": "per-cut", "stitch_offsets": True}])
def test_deployed_stitch_equals_its_in_palette_forward(vit_family, tmp_path, layers):
    data = toy_task()
    palette, flops = build(vit_family, data, **layers)
    if layers:  # offsets that matter: each stitching layer's differs by position
        assert all(layer.base.offset.std(0).sum() > 0 for layer in palette.stitching.values())
    with torch.no_grad():  # a trained-looking state: nonzero LoRA and biases everywhere
        for p in palette.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    palette.eval()
    for s in palette.space.stitches:
        model = DeployedStitch.from_palette(palette, s.id)
        model.save_pretrained(tmp_path / str(s.id))
        loaded = DeployedStitch.from_pretrained(tmp_path / str(s.id))
        assert not any("lora" in k or "stitch_bias" in k for k in loaded.state_dict())
        torch.testing.assert_close(loaded(data.images), palette(data.images, stitch=s.id), atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "5" / "esta_stitch.json").read_text())
    assert cfg["format"] == "esta-stitch" and cfg["stitch"]["id"] == 5


def test_deployed_parameter_count_matches_cost(vit_family, tmp_path):
    data = toy_task()
    torch.manual_seed(0)
    palette = Palette(load_family(vit_family, num_labels=3))
    palette.init_stitching(data.images[:32])
    costs = count_costs(palette, data.images[:1], progress=False)
    palette.apply_pst(PSTConfig())
    for sid in (0, 4, len(palette) - 1):
        model = DeployedStitch.from_palette(palette, sid)
        assert sum(p.numel() for p in model.parameters()) == costs[sid].params


def test_a_crash_loses_only_the_steps_since_the_last_checkpoint(vit_family, tmp_path):
    data = toy_task()
    cfg = TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup_steps=2, checkpoint_every=4,
                      sampling=SamplingConfig(groups=3), score_init_batch=True)
    straight, flops = build(vit_family, data)
    r1 = train(straight, data, flops, cfg, out_dir=tmp_path / "a", progress=False)

    calls = {"n": 0}

    def crashing_loss(model, batch, stitch):  # dies during step 6 (after the scoring pass over every stitch)
        calls["n"] += 1
        if calls["n"] == len(straight) + 6:
            raise RuntimeError("power cut")
        return classification_loss(model, batch, stitch)

    first, _ = build(vit_family, data)
    with pytest.raises(RuntimeError, match="power cut"):
        train(first, data, flops, cfg, loss_fn=crashing_loss, out_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 4
    # a fresh process rebuilds the palette (other random init): resuming must not rely on anything in memory
    resumed, _ = build(vit_family, data, seed=123)
    r2 = train(resumed, data, flops, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert r2.updates == r1.updates
    torch.testing.assert_close(torch.tensor(r2.importance), torch.tensor(r1.importance))
    a, b = straight.adaptation_state(), resumed.adaptation_state()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_choose_uses_importance(vit_family):
    data = toy_task()
    palette, flops = build(vit_family, data)
    groups = [[s.id for s in palette.space.stitches]]
    imp = [0.0] * len(palette)
    imp[3] = 1.0
    assert choose(groups, flops, imp)[0].stitch_id == 3


def test_a_non_finite_loss_stops_training_with_one_clear_error(tmp_path, vit_family):
    from esta.errors import EstaError
    from esta.families import load_family
    from esta.palette import Palette
    from esta.pst import PSTConfig
    from esta.train import TrainConfig, train

    data = toy_task(n=32)
    palette = Palette(load_family(vit_family, num_labels=3))
    palette.init_stitching(data.images[:8])
    palette.apply_pst(PSTConfig())
    with pytest.raises(EstaError, match=r"non-finite .* at step 1, stitch .*learning rate"):
        train(palette, data, [1.0] * len(palette), TrainConfig(steps=3, batch_size=8, lr=1e-3),
              loss_fn=lambda model, batch, s: model(batch[0], stitch=s).sum() * float("nan"), progress=False)


def _one_step(palette, data, k: int, stitches: list[int]):
    cfg = TrainConfig(steps=1, batch_size=16, lr=1e-2, warmup_steps=0, checkpoint_every=0, log_every=0,
                      sampling=SamplingConfig(groups=1), stitches_per_step=k)
    return train(palette, data, [1.0] * len(palette), cfg, progress=False, stitches=stitches)


def test_k_stitches_per_step_on_one_stitch_is_the_plain_step(vit_family):
    """Two halves of a batch, each its own backward of loss/2, give the full batch's mean gradient."""
    import copy

    data = toy_task(n=16)
    palette, _ = build(vit_family, data)
    twin = copy.deepcopy(palette)
    anchor = palette.space.anchor_ids()[1]
    one, two = _one_step(palette, data, 1, [anchor]), _one_step(twin, data, 2, [anchor])
    assert one.updates[anchor] == 1 and two.updates[anchor] == 2
    moved = 0
    for (name, p), q in zip(palette.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
        moved += p.requires_grad
    assert moved


def test_each_stitch_of_a_step_is_scored_on_its_own_part_only(vit_family):
    """With K=2 on one stitch, its importance is beta*Q1 + (1-beta)*Q2, each Q the SNIP score of that half's own
    loss: the first half's gradient is held aside while the second is scored."""
    import copy

    from torch.utils.data import DataLoader

    from esta.importance import snip_score
    from esta.train import ResumableBatches, _split

    data = toy_task(n=16)
    palette, _ = build(vit_family, data)
    anchor = palette.space.anchor_ids()[0]
    before = copy.deepcopy(palette).train()
    images, labels = next(iter(DataLoader(data, batch_sampler=ResumableBatches(16, 16, 1, 0))))
    params = before.path_parameters(anchor)
    q = []
    for part in _split((images, labels), 2):
        before.zero_grad(set_to_none=True)
        classification_loss(before, part, anchor).backward()
        q.append(snip_score(params, per_parameter=True))  # the default score: per parameter
    assert q[0] != pytest.approx(q[1])
    result = _one_step(palette, data, 2, [anchor])
    beta = SamplingConfig().beta
    assert result.importance[anchor] == pytest.approx(beta * q[0] + (1 - beta) * q[1], rel=1e-4)


def test_stitches_per_step_must_fit_the_batch():
    from esta.errors import EstaError

    for k in (0, 17):
        with pytest.raises(EstaError, match="stitches per step"):
            TrainConfig(batch_size=16, stitches_per_step=k).check()
