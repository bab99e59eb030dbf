"""ONNX export of deployed image and language stitches: the graph equals the torch model within 1e-4, at any batch
size (and, for language, any length)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build, esta, perturb_adapters, toy_task

from esta.deploy import DeployedStitch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here (pip install 'esta[onnx]')")


def test_a_deployed_stitch_exports_to_onnx_and_matches_torch(tmp_path, vit_family):
    data = toy_task()
    palette, _ = build(vit_family[:2], data, stitch_layers="per-cut", stitch_offsets=True)  # esta's image default
    perturb_adapters(palette)  # a trained-looking stitch: nonzero adapters and biases everywhere
    sid = next(s.id for s in palette.space.stitches if not s.is_anchor)
    DeployedStitch.from_palette(palette, sid).save_pretrained(tmp_path / "dep")
    r = esta("export", "--model", str(tmp_path / "dep"), "--format", "onnx")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    pixels = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        expected = palette(pixels, stitch=sid).numpy()
    got = session.run(["logits"], {"pixel_values": pixels.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_a_stitched_llm_exports_its_forward_to_onnx(tmp_path):
    from lm_fixtures import WORDS, trained_looking_lm_palette

    from esta.export import export_onnx

    palette = trained_looking_lm_palette(tmp_path)
    cut = max((s for s in palette.space.stitches if not s.is_anchor), key=lambda s: s.end_first)
    DeployedStitch.from_palette(palette, cut.id).save_pretrained(tmp_path / "dep")
    report = export_onnx(tmp_path / "dep")
    assert report["max_abs_diff"] <= 1e-4 and report["inputs"] == ["input_ids", "attention_mask"]
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    x = torch.randint(4, len(WORDS), (4, 13), generator=torch.Generator().manual_seed(9))  # unseen batch and length
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        expected = palette({"input_ids": x, "attention_mask": mask}, stitch=cut.id).numpy()
    got = session.run(["logits"], {"input_ids": x.numpy(), "attention_mask": mask.numpy()})[0]
    keep = mask.bool().numpy()
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)
