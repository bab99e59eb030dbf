"""A family registered from outside esta (one Anchor class and one registry entry, nothing else) trains, deploys,
loads with transformers, exports to ONNX and serves: no module outside ``families/`` knows a family by its name."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import image_folder

import esta.families as families
from esta.deploy import DeployedStitch
from esta.families.base import FamilyKind
from esta.families.vision import VisionAnchor, check_vision_family, load_vision_anchor
from esta.tasks import AdaptConfig
from esta.train import TrainConfig


class PatchAnchor(VisionAnchor):
    """A family of its own name that reads images: everything else it inherits through the Anchor's hooks."""

    family = "patch-test"


def _load(source, config, num_labels, local, dtype) -> PatchAnchor:
    anchor = load_vision_anchor(source, config, num_labels, local, dtype)
    anchor.__class__ = PatchAnchor
    return anchor


@pytest.fixture
def patch_family(monkeypatch):
    kind = FamilyKind("patch-test", PatchAnchor, ("vit",), _load, check_vision_family)
    # first in the registry, so ViT checkpoints load as this family in this test
    monkeypatch.setattr(families, "FAMILIES", {kind.name: kind, **families.FAMILIES})
    return kind


def test_a_family_registered_from_a_test_trains_deploys_exports_and_serves(patch_family, vit_family, tmp_path):
    import esta

    data = image_folder(tmp_path / "data", per_class=6)
    results = esta.run(AdaptConfig(anchors=vit_family, data=str(data), out_dir=str(tmp_path / "run"), progress=False,
                                   train=TrainConfig(steps=4, batch_size=8), validation_examples=4,
                                   probe_examples=16, cache_dir=str(tmp_path / "cache")))
    assert results["deployed"]
    folder = tmp_path / "run" / "deployed" / "budget00"
    saved = json.loads((folder / "esta_stitch.json").read_text())
    assert saved["front"]["family"] == "patch-test" or saved.get("weights") == "transformers"

    # a stitch of the family, saved and read back by esta and by transformers' Auto classes
    from esta.runs import load_run

    palette, _ = load_run(tmp_path / "run")
    assert isinstance(palette.anchors[0], PatchAnchor)
    sid = next(s.id for s in palette.space.stitches if not s.is_anchor)
    DeployedStitch.from_palette(palette.eval(), sid).save_pretrained(tmp_path / "stitch")
    assert json.loads((tmp_path / "stitch" / "esta_stitch.json").read_text())["front"]["family"] == "patch-test"
    model = DeployedStitch.from_pretrained(tmp_path / "stitch")
    assert isinstance(model.front, PatchAnchor)
    from transformers import AutoModelForImageClassification

    hf = AutoModelForImageClassification.from_pretrained(tmp_path / "stitch")
    pixels = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=pixels).logits, palette(pixels, stitch=sid), atol=1e-5, rtol=0)

    pytest.importorskip("onnxruntime", reason="onnxruntime cannot be installed here (pip install 'esta[onnx]')")
    from esta.export import export_onnx

    assert export_onnx(tmp_path / "stitch")["max_abs_diff"] <= 1e-4

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient
    from PIL import Image

    from esta.runs import save_run_palette
    from esta.serve import create_app

    client = TestClient(create_app(save_run_palette(tmp_path / "run")))
    assert client.get("/health").json()["family"] == "patch-test"
    png = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (8, 8), dtype=torch.uint8).numpy(), mode="L").save(png, format="PNG")
    r = client.post("/classify?budget_gflops=1", content=png.getvalue())
    assert r.status_code == 200, r.text
