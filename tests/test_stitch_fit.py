"""The stitching layers' least-squares fit summed batch by batch equals the fit on all calibration tokens at once."""

import pytest
import torch
from lm_fixtures import WORDS, save_tiny_lm

from esta.errors import EstaError
from esta.families import load_family
from esta.palette import Palette


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    return [save_tiny_lm(root / "s", "qwen2", 32, 3, 4, 2, seed=1),
            save_tiny_lm(root / "l", "qwen2", 48, 4, 4, 2, seed=2)]


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(4, len(WORDS), (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[k % 3, 12 - 2 * (k + 1):] = 0  # some right padding, which the fit must leave out
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def layers_of(palette):
    return {k: [t.clone() for t in layer.state_dict().values()] for k, layer in palette.stitching.items()}


@pytest.mark.parametrize("ridge,outliers", [(0.01, 0.0), (0.0, 0.0), (0.01, 1.2)])
def test_the_batched_fit_is_the_fit_on_all_tokens(family, ridge, outliers):
    parts = batches()
    width = max(b["input_ids"].shape[1] for b in parts)
    together = {k: torch.cat([b[k] for b in parts]) for k in ("input_ids", "attention_mask")}
    one = Palette(load_family(family, dtype=torch.float32), first_token_state=True)
    many = Palette(load_family(family, dtype=torch.float32), first_token_state=True)
    assert width == together["input_ids"].shape[1]
    if outliers:  # the outlier threshold comes from the first batch's median: the same median for both here
        parts = [together]
    one.init_stitching(together, ridge=ridge, outliers=outliers)
    many.init_stitching_batches(parts if outliers else batches(), ridge=ridge, outliers=outliers)
    a, b = layers_of(one), layers_of(many)
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.allclose(x, y, rtol=1e-3, atol=1e-4), key
    if outliers:  # some rows were left out, so the fit differs from the one on every token
        full = Palette(load_family(family, dtype=torch.float32), first_token_state=True)
        full.init_stitching_batches(parts, ridge=ridge)
        assert any(not torch.allclose(x, y, rtol=1e-3, atol=1e-4)
                   for key in a for x, y in zip(a[key], layers_of(full)[key]))


def test_the_batched_fit_refuses_too_few_tokens_and_no_batch(family):
    palette = Palette(load_family(family, dtype=torch.float32))
    with pytest.raises(EstaError, match="no calibration batch"):
        palette.init_stitching_batches([])
    ids = torch.randint(4, len(WORDS), (1, 6))
    with pytest.raises(EstaError, match="calibration tokens for a stitching layer"):
        palette.init_stitching_batches([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
