import json
import math

import pytest
import torch
from helpers import SHAPES, image_folder, save_tiny

from esta.analysis import GradAngleConfig, grad_angles, pairwise_angles
from esta.errors import EstaError


def test_pairwise_angles_use_only_shared_parameters():
    grads = {0: {"w": torch.tensor([1.0, 0.0]), "only0": torch.tensor([5.0])},
             1: {"w": torch.tensor([0.0, 2.0]), "only1": torch.tensor([1.0])},
             2: {"w": torch.tensor([-1.0, 1.0])}}
    a01, a02, a12 = pairwise_angles(grads)
    assert a01 == pytest.approx(90.0) and a02 == pytest.approx(135.0) and a12 == pytest.approx(45.0)


def test_grad_angles_writes_summary_and_histogram(tmp_path):
    family = [save_tiny(tmp_path / f"a{i}", "vit", w, h, num_labels=2, seed=i) for i, (w, h) in enumerate(SHAPES)]
    data = image_folder(tmp_path / "data", per_class=8)
    r = grad_angles(GradAngleConfig(anchors=family, source=str(data), target=str(data), stitches=6, batch=16,
                                    out_dir=str(tmp_path / "out"), progress=False))
    for role in ("source", "target"):
        t = r["tasks"][role]
        assert t["pairs"] == len(t["angles"]) > 0 and all(0 <= a <= 180 for a in t["angles"])
        assert len(t["stitches"]) == 6 and 0 <= t["fraction_over_90"] <= 1 and not math.isnan(t["mean_deg"])
    assert json.loads((tmp_path / "out" / "grad_angles.json").read_text())["tasks"]["target"]["pairs"] > 0
    assert (tmp_path / "out" / "grad_angles.png").stat().st_size > 5_000


def test_source_task_must_match_the_pretrained_classifiers(tmp_path):
    family = [save_tiny(tmp_path / f"a{i}", "vit", w, h, num_labels=3, seed=i) for i, (w, h) in enumerate(SHAPES[:2])]
    data = image_folder(tmp_path / "data")
    with pytest.raises(EstaError, match="3 classes"):
        grad_angles(GradAngleConfig(anchors=family, source=str(data), target=str(data), stitches=3, batch=4,
                                    out_dir=str(tmp_path / "out"), progress=False))
