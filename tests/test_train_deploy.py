import json

import pytest
import torch
from helpers import build, toy_task

from esta.cost import count_costs
from esta.deploy import DeployedStitch, choose
from esta.families import load_family
from esta.importance import SamplingConfig
from esta.palette import Palette
from esta.pst import PSTConfig
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


def test_deployed_stitch_equals_its_in_palette_forward(vit_family, tmp_path):
    data = toy_task()
    palette, flops = build(vit_family, data)
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
