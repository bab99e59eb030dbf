"""One palette artifact runs every stitch exactly as that stitch deployed alone, at about the anchors' size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import esta, image_folder

from esta.adapt import load_run
from esta.deploy import DeployedStitch
from esta.errors import EstaError
from esta.serving import best_within, load_palette


def test_the_palette_artifact_equals_every_stitch_deployed_alone(tmp_path, vit_family):
    data = image_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    r = esta("train", "--anchors", *vit_family, "--data", str(data), "--steps", "30", "--batch-size", "8",
             "--groups", "3", "--lr", "0.02", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    r = esta("deploy", "--run", str(run), "--palette")
    assert r.returncode == 0, r.stderr[-2000:]
    served, table = load_palette(run / "palette")
    trained, _ = load_run(run)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert len(table["stitches"]) == len(served) == 17
    with torch.no_grad():
        for s in trained.space.stitches:  # every stitch, anchors and cuts
            alone = DeployedStitch.from_palette(trained, s.id)(images)
            torch.testing.assert_close(served(images, stitch=s.id), alone, atol=1e-5, rtol=1e-5, msg=s.name)
            assert table["stitches"][s.id]["flops"] > 0
    anchors = sum(f.stat().st_size for a in vit_family for f in Path(a).glob("*.safetensors"))
    palette_size = (run / "palette" / "palette.safetensors").stat().st_size
    assert palette_size <= 1.3 * anchors, (palette_size, anchors)
    cheapest = min(r["flops"] for r in table["stitches"])
    assert best_within(table, cheapest)["flops"] == cheapest
    with pytest.raises(EstaError, match="no stitch fits"):
        best_within(table, cheapest / 2)
