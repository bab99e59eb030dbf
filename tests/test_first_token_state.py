"""Stitching layers with a first-token state (causal LMs): the end anchor's own state at the cut for position 0."""

import numpy as np
import pytest
import torch
from lm_fixtures import WORDS, save_tiny_lm, save_tokenizer, trained_looking_lm_palette

from esta.deploy import DeployedStitch
from esta.families import load_family
from esta.palette import Palette


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    return [save_tiny_lm(root / "a", "llama", 32, 3, 4, 2, seed=0),
            save_tiny_lm(root / "b", "llama", 48, 4, 6, 3, seed=1)]


def records(n: int, t: int, seed: int) -> dict:
    """Chat-like records: every one starts with the same token (<s>), as a chat template's do."""
    ids = torch.randint(4, len(WORDS), (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_every_stitch_gives_its_first_token_the_end_anchors_own_state(pair):
    x = records(3, 6, seed=1)
    with_state = Palette(load_family(pair), stitch_layers="per-cut", first_token_state=True).eval()
    plain = Palette(load_family(pair), stitch_layers="per-cut").eval()
    for palette in (with_state, plain):
        palette.init_stitching(records(4, 9, seed=0))
    end = with_state.space.anchor_ids()[1]
    with torch.no_grad():
        reference = with_state(x, stitch=end)[:, 0]  # position 0 sees only itself: the same token, the same logits
        for s in with_state.space.stitches:
            if s.is_anchor:
                continue
            torch.testing.assert_close(with_state(x, stitch=s.id)[:, 0], reference, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(plain(x, stitch=s.id)[:, 0], reference, atol=1e-2)  # the fit alone does not
    for key, layer in with_state.stitching.items():  # the map of the other tokens is the same fit
        assert torch.equal(layer.weight, plain.stitching[key].weight) and torch.equal(layer.bias, plain.stitching[key].bias)


def test_vision_families_get_no_first_token_state(vit_family):
    palette = Palette(load_family(vit_family, num_labels=3), first_token_state=True)
    assert all(layer.first_state is None for layer in palette.stitching.values())


def test_the_state_is_deployed_and_runs_through_transformers_generation_and_onnx(tmp_path):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    import esta  # noqa: F401
    from esta.export import export_onnx
    from esta.generate import generate

    palette = trained_looking_lm_palette(tmp_path, first_token_state=True)
    assert all(layer.base.first_state is not None for layer in palette.stitching.values())
    cut = max((s for s in palette.space.stitches if not s.is_anchor), key=lambda s: s.end_first)
    deployed = DeployedStitch.from_palette(palette, cut.id)
    deployed.save_pretrained(tmp_path / "dep")
    save_tokenizer(tmp_path / "dep")
    prompt = torch.randint(4, len(WORDS), (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = palette({"input_ids": prompt}, stitch=cut.id)
        loaded = DeployedStitch.from_pretrained(tmp_path / "dep")
        torch.testing.assert_close(loaded({"input_ids": prompt}), expected, atol=1e-5, rtol=1e-5)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "dep").eval()
        torch.testing.assert_close(model(prompt).logits, expected, atol=1e-5, rtol=1e-5)
    ours = generate(lambda inp: palette(inp, stitch=cut.id), prompt, 6, use_cache=True)
    assert torch.equal(ours, generate(lambda inp: palette(inp, stitch=cut.id), prompt, 6, use_cache=False))
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                            do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)
    report = export_onnx(tmp_path / "dep")
    assert report["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    x = torch.randint(4, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(9))  # unseen batch and length
    got = session.run(["logits"], {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, palette({"input_ids": x}, stitch=cut.id).numpy(), atol=1e-4, rtol=0)
