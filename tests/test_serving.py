"""One palette artifact runs every stitch exactly as that stitch deployed alone, at about the anchors' size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import esta, image_folder

from esta.deploy import DeployedStitch
from esta.errors import EstaError
from esta.runs import load_run
from esta.serving import best_within, load_palette


@pytest.fixture(scope="module")
def run(tmp_path_factory, vit_family) -> Path:
    """A trained tiny run and its palette artifact (RUN/palette)."""
    tmp = tmp_path_factory.mktemp("serving")
    data = image_folder(tmp / "data", per_class=8)
    run = tmp / "run"
    r = esta("train", "--anchors", *vit_family, "--data", str(data), "--steps", "30", "--batch-size", "8",
             "--groups", "3", "--lr", "0.02", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    r = esta("deploy", "--run", str(run), "--palette")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_the_palette_artifact_equals_every_stitch_deployed_alone(run, vit_family):
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


def test_the_server_answers_each_budget_with_its_stitch_and_refuses_bad_requests(run):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from esta.serve import create_app

    client = TestClient(create_app(run / "palette", max_bytes=5000))
    served, table = load_palette(run / "palette")
    assert client.get("/health").json()["stitches"] == len(table["stitches"])
    assert len(client.get("/stitches").json()["stitches"]) == len(table["stitches"])
    image = Image.fromarray(torch.randint(0, 256, (8, 8), dtype=torch.uint8).numpy(), mode="L")
    png = io.BytesIO()
    image.save(png, format="PNG")
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, 1, 8, 8)
    costs = sorted({r["flops"] for r in table["stitches"]})
    for budget in [costs[0], costs[-1], costs[0], costs[len(costs) // 2]]:  # alternating budgets, one palette
        r = client.post(f"/classify?budget_gflops={budget / 1e9!r}", content=png.getvalue())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["flops"] <= budget and body["stitch_id"] == best_within(table, budget)["id"]
        with torch.no_grad():
            offline = served(x, stitch=body["stitch_id"]).softmax(-1)[0]
        assert body["index"] == int(offline.argmax())
        torch.testing.assert_close(torch.tensor(body["probabilities"]), offline, atol=1e-5, rtol=0)
    assert client.post(f"/classify?budget_gflops={costs[0] / 2e9!r}", content=png.getvalue()).status_code == 422
    assert client.post("/classify?budget_gflops=1", content=b"not an image").status_code == 400
    assert client.post("/classify?budget_gflops=1", content=b"x" * 6000).status_code == 413
    assert client.post("/classify", content=png.getvalue()).status_code == 422  # no budget given
