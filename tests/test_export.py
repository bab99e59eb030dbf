"""ONNX export of a deployed image stitch: the graph equals the torch model within 1e-4, at any batch size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build, esta, toy_task

from esta.deploy import DeployedStitch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here (pip install 'esta[onnx]')")


def test_a_deployed_stitch_exports_to_onnx_and_matches_torch(tmp_path, vit_family):
    data = toy_task()
    palette, _ = build(vit_family[:2], data)
    with torch.no_grad():  # a trained-looking stitch: nonzero adapters and biases everywhere
        for p in palette.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
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
