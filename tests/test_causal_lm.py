import pytest
import torch
from lm_fixtures import WORDS, save_tiny_lm

from esta.deploy import DeployedStitch
from esta.errors import EstaError
from esta.families import load_family
from esta.palette import Palette
from esta.pst import PSTConfig


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {
        "llama": [save_tiny_lm(root / "l0", "llama", 32, 3, 4, 2, seed=0),
                  save_tiny_lm(root / "l1", "llama", 48, 4, 6, 3, seed=1)],  # wider, deeper, other GQA groups
        "qwen2": [save_tiny_lm(root / "q0", "qwen2", 32, 2, 4, 1, seed=2),
                  save_tiny_lm(root / "q1", "qwen2", 64, 3, 4, 2, seed=3)],  # other head size (16 vs 8)
    }


def tokens(n=2, t=7, seed=0):
    ids = torch.randint(4, len(WORDS), (n, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_identical_anchors_with_identity_stitching_reproduce_the_logits(kind, lm_family):
    from transformers import AutoModelForCausalLM

    path = lm_family[kind][1]
    palette = Palette(load_family([path, path]))
    with torch.no_grad():
        for layer in palette.stitching.values():
            layer.weight.copy_(torch.eye(layer.out_features))
            layer.bias.zero_()
    palette.eval()
    x = tokens()
    reference = AutoModelForCausalLM.from_pretrained(path).eval()(**x).logits
    torch.testing.assert_close(palette(x, stitch=0), reference, atol=1e-5, rtol=1e-5)
    natural = [s for s in palette.space.stitches if not s.is_anchor and s.end_first == s.front_last + 1]
    assert natural
    for s in natural:
        torch.testing.assert_close(palette(x, stitch=s.id), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_stitches_of_different_shapes_run_and_deploy(kind, lm_family, tmp_path):
    palette = Palette(load_family(lm_family[kind]))
    x = tokens()
    palette.init_stitching(x)
    palette.apply_pst(PSTConfig())
    for s in palette.space.stitches:  # LoRA B = 0 and biases 0: perturb so merging is tested for real
        for p in palette.path_parameters(s.id):
            p.data.add_(0.01 * torch.randn_like(p))
    palette.eval()
    for s in palette.space.stitches:
        out = palette(x, stitch=s.id)
        assert out.shape == (2, 7, len(WORDS)) and torch.isfinite(out).all()
        DeployedStitch.from_palette(palette, s.id).save_pretrained(tmp_path / str(s.id))
        loaded = DeployedStitch.from_pretrained(tmp_path / str(s.id))
        torch.testing.assert_close(loaded(x), palette(x, stitch=s.id), atol=1e-4, rtol=1e-4)


def test_a_bf16_palette_deploys_in_bf16(lm_family, tmp_path):
    """Frozen weights in bf16, adapters in float32: the merged stitch is saved and loaded in bf16, as small and as
    fast as the anchors, not silently promoted to float32."""
    palette = Palette(load_family(lm_family["qwen2"], dtype=torch.bfloat16))
    x = tokens()
    palette.init_stitching(x)
    palette.apply_pst(PSTConfig())
    palette.eval()
    s = next(s for s in palette.space.stitches if not s.is_anchor)
    path = DeployedStitch.from_palette(palette, s.id).save_pretrained(tmp_path / "d")
    loaded = DeployedStitch.from_pretrained(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # the rotary tables stay float32, as transformers keeps them (they are computed, not saved)
    for part, anchor in ((loaded.front, palette.anchors[s.front]), (loaded.end, palette.anchors[s.end])):
        assert part.rotary.inv_freq.dtype == torch.float32
        torch.testing.assert_close(part.rotary.inv_freq, anchor.rotary.inv_freq)
    torch.testing.assert_close(loaded(x).float(), palette(x, stitch=s.id).float(), atol=0.1, rtol=0.05)


def test_different_tokenizers_are_refused(lm_family, tmp_path):
    other = save_tiny_lm(tmp_path / "other", "llama", 32, 2, 4, 2, words=WORDS[:4] + [f"v{i}" for i in range(60)])
    with pytest.raises(EstaError, match="tokenizers .* differ"):
        load_family([lm_family["llama"][0], other])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generation_with_the_kv_cache_equals_generation_without(kind, lm_family, tmp_path):
    from esta.generate import generate

    palette = Palette(load_family(lm_family[kind]))
    x = tokens(n=2, t=5, seed=4)
    palette.init_stitching(tokens(n=4, t=9, seed=5))
    palette.eval()
    cuts = [s for s in palette.space.stitches if not s.is_anchor]
    late = max(cuts, key=lambda s: s.end_first)  # an end part that starts mid-way: its cache's first layers stay empty
    assert late.end_first > 0
    for cut in cuts:
        models = [lambda inp, c=cut.id: palette(inp, stitch=c)]
        if cut is late:
            models.append(DeployedStitch.from_palette(palette, cut.id))
        for model in models:
            cached = generate(model, x["input_ids"], 8, use_cache=True)
            plain = generate(model, x["input_ids"], 8, use_cache=False)
            assert cached.shape == (2, 13)
            assert torch.equal(cached, plain), cut.name
    # and the logits of a cached step, not only the greedy tokens
    with torch.no_grad():
        full = palette({"input_ids": x["input_ids"]}, stitch=late.id)[:, -1]
        caches: dict = {}
        palette({"input_ids": x["input_ids"][:, :4], "caches": caches}, stitch=late.id)
        step = palette({"input_ids": x["input_ids"][:, 4:], "attention_mask": torch.ones_like(x["input_ids"]),
                        "caches": caches}, stitch=late.id)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_least_squares_fits_without_padding_and_the_first_token(lm_family):
    # the first token is the attention sink (massive activations in real LLMs): it must not steer the fit
    anchor = load_family(lm_family["qwen2"])[0]
    x = tokens(n=2, t=5)
    x["attention_mask"][1, 3:] = 0
    mask = anchor.token_mask(x)
    assert mask.tolist() == [[False, True, True, True, True], [False, True, True, False, False]]
    assert x["attention_mask"][0, 0] == 1  # the caller's mask is left alone
