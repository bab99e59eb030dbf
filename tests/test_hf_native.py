"""A deployed anchor is a plain transformers model with the task's labels: it loads without esta."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers import build, toy_task

from esta.deploy import DeployedStitch


def test_a_deployed_anchor_loads_with_plain_transformers_and_equals_esta(tmp_path, vit_family):
    data = toy_task()
    palette, _ = build(vit_family[:2], data)
    with torch.no_grad():  # trained-looking adapters: LoRA and biases must be merged into the saved weights
        for p in palette.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    sid = next(s.id for s in palette.space.stitches if s.is_anchor)
    classes = ["dark", "mid", "bright"]
    DeployedStitch.from_palette(palette, sid, meta={"classes": classes}).save_pretrained(tmp_path / "dep")
    images = data.images[:5]
    with torch.no_grad():
        expected = palette(images, stitch=sid)
    # a fresh interpreter that never imports esta
    code = f"""
import torch, json
from transformers import AutoModelForImageClassification, AutoImageProcessor
from PIL import Image
m = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'dep')!r}).eval()
proc = AutoImageProcessor.from_pretrained({str(tmp_path / 'dep')!r})
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
pix = proc([Image.fromarray(i[0].numpy(), mode="L") for i in x], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = m(pixel_values=pix).logits
top = m.config.id2label[int(logits[0].argmax())]
print(json.dumps({{"logits": logits.tolist(), "labels": m.config.id2label, "top": top, "esta": "esta" in __import__("sys").modules}}))
"""
    torch.save(images, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["esta"]
    assert list(r["labels"].values()) == classes and r["top"] in classes
    torch.testing.assert_close(torch.tensor(r["logits"]), expected, atol=1e-4, rtol=1e-4)
    # and esta reads the same folder back as a deployed stitch
    again = DeployedStitch.from_pretrained(tmp_path / "dep")
    with torch.no_grad():
        torch.testing.assert_close(again(images), expected, atol=1e-5, rtol=1e-5)
