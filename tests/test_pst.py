import pytest
import torch
from torch import nn

from esta.families import load_family
from esta.palette import Palette
from esta.pst import ActiveStitch, PSTConfig, StitchLinear, plain_state_dict


@pytest.fixture
def palette(vit_family, images):
    torch.manual_seed(0)
    p = Palette(load_family(vit_family, num_labels=3))
    p.init_stitching(images)
    p.apply_pst(PSTConfig())
    return p


def test_frozen_anchor_weights_and_trainable_parts(palette):
    names = {n for n, p in palette.named_parameters() if p.requires_grad}
    assert names and all(any(k in n for k in ("lora_", "stitch_bias", "classifier")) for n in names)
    for anchor in palette.anchors:  # every pretrained weight is frozen, the new task head is not
        pretrained = [p for n, p in anchor.named_parameters()
                      if not any(k in n for k in ("lora_", "stitch_bias", "classifier"))]
        assert pretrained and not any(p.requires_grad for p in pretrained)
        assert all(p.requires_grad for p in anchor.classifier.parameters())
    assert all(not layer.base.weight.requires_grad for layer in palette.stitching.values())  # least squares
    assert palette.trainable_parameters() < 0.5 * palette.total_parameters()


def test_gradients_reach_only_trainable_parameters_on_the_path(palette, images):
    s = next(s for s in palette.space.stitches if not s.is_anchor)
    palette(images, stitch=s.id).logsumexp(-1).sum().backward()
    on_path = {id(p) for p in palette.path_parameters(s.id)}
    for name, p in palette.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif id(p) not in on_path:
            assert p.grad is None, f"{name} is off the path but got a gradient"
    # every trainable tensor on the path got one (lora_A's gradient is zero at init, but it exists)
    assert all(p.grad is not None for p in palette.path_parameters(s.id))


def test_a_step_changes_only_the_active_stitchs_own_biases(palette, images):
    s = next(s for s in palette.space.stitches if not s.is_anchor and s.front == 1)
    before = {n: p.detach().clone() for n, p in palette.named_parameters()}
    opt = torch.optim.AdamW([p for p in palette.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):  # the second step has Adam state and nonzero B, so everything on the path moves
        nn.functional.cross_entropy(palette(images, stitch=s.id), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {n for n, p in palette.named_parameters() if not torch.equal(p, before[n])}
    biases = {n for n in changed if ".stitch_bias." in n}
    assert biases and all(n.endswith(f".stitch_bias.{s.id}") for n in biases)
    assert not any(n.startswith("anchors.0.") for n in changed)  # anchor 0 is not on the path
    assert not any(not p.requires_grad for n, p in palette.named_parameters() if n in changed)  # frozen stay
    assert {n for n in changed if "lora_B" in n}  # and the shared LoRA on the path did learn


def test_merge_is_exact_for_every_stitch():
    torch.manual_seed(0)
    active = ActiveStitch()
    layer = StitchLinear(nn.Linear(6, 4), rank=2, alpha=4, active=active, stitch_ids=[3, 7])
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.stitch_bias["3"].normal_()
        layer.stitch_bias["7"].normal_()
    x = torch.randn(5, 6)
    for sid in (3, 7):
        active.id = sid
        plain = nn.Linear(6, 4)
        plain.load_state_dict(plain_state_dict(layer, sid))
        torch.testing.assert_close(plain(x), layer(x), atol=1e-6, rtol=1e-6)


def test_shared_and_no_bias_modes():
    active = ActiveStitch(id=5)
    shared = StitchLinear(nn.Linear(3, 3), 1, 1, active, [5, 6], bias="shared")
    none = StitchLinear(nn.Linear(3, 3), 1, 1, active, [5, 6], bias="none")
    assert list(shared.stitch_bias.keys()) == ["shared"] and shared.own_bias(6) is shared.own_bias(5)
    assert len(none.stitch_bias) == 0 and none.own_bias(5) is None


def test_full_finetune_trains_everything(vit_family, images):
    p = Palette(load_family(vit_family, num_labels=3))
    p.init_stitching(images)
    p.apply_pst(PSTConfig(full_finetune=True))
    assert p.trainable_parameters() == p.total_parameters()
    assert not any(isinstance(m, StitchLinear) for m in p.modules())


def test_key_projections_get_no_stitch_bias(palette):
    """A key bias shifts every score of a query equally, which the softmax cancels: it would be dead weight."""
    for anchor in palette.anchors:
        for block in anchor.blocks:
            assert len(block.attention.k_proj.stitch_bias) == 0
            assert len(block.attention.q_proj.stitch_bias) > 0 and len(block.attention.v_proj.stitch_bias) > 0


def test_fused_forward_matches_the_plain_formula_and_its_gradients():
    from esta.pst import ActiveStitch, StitchLinear

    torch.manual_seed(0)
    active = ActiveStitch(3)
    layer = StitchLinear(torch.nn.Linear(6, 5), rank=2, alpha=4.0, active=active, stitch_ids=[3, 4])
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.stitch_bias["3"].normal_()
    x = torch.randn(2, 7, 6, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = (torch.nn.functional.linear(ref_x, layer.base.weight, layer.base.bias)
           + (ref_x @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling + layer.stitch_bias["3"])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.stitch_bias["3"]], g)
    ref_grads = torch.autograd.grad(ref, [ref_x, layer.lora_A, layer.lora_B, layer.stitch_bias["3"]], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    active.id = 4  # another stitch: its own (zero) bias, and stitch 3's bias gets no gradient
    layer(x).sum().backward()
    assert layer.stitch_bias["3"].grad is None and layer.stitch_bias["4"].grad is not None


def test_two_threads_run_two_stitches_of_one_palette_at_once(palette, images):
    """The active stitch is per thread: two forwards that interleave mid-way (both wait at a barrier inside the
    same shared layer) each get exactly their own stitch's output, and a layer run with no stitch selected fails."""
    import threading

    from helpers import perturb_adapters

    from esta.errors import EstaError

    perturb_adapters(palette)  # every stitch's biases differ, so a mixed-up stitch changes the output
    palette.eval()
    a, b = [s.id for s in palette.space.stitches if s.front == 0][:2]
    with torch.no_grad():
        expected = {k: palette(images, stitch=k) for k in (a, b)}
    shared = next(m for m in palette.anchors[0].modules() if isinstance(m, StitchLinear))  # both stitches run it
    barrier = threading.Barrier(2, timeout=30)
    hook = shared.register_forward_pre_hook(lambda *_: (barrier.wait(), None)[1])  # None: the input stays
    got: dict[int, torch.Tensor] = {}

    def run(k: int) -> None:
        with torch.no_grad():
            got[k] = palette(images, stitch=k)

    threads = [threading.Thread(target=run, args=(k,)) for k in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hook.remove()
    for k in (a, b):
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    assert not torch.equal(expected[a], expected[b])
    with pytest.raises(EstaError, match="no stitch is selected"):
        shared(torch.zeros(1, shared.in_features))  # outside a palette forward no stitch is selected
