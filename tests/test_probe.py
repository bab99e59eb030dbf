"""Linear-probe heads: fitted on frozen features, folded into an ordinary nn.Linear, better than a random head."""

import torch
from helpers import toy_task

from esta.families import load_family
from esta.probe import fit_probe, head_features, probe_head


def accuracy(anchor, data) -> float:
    with torch.no_grad():
        return float((anchor(data.images).argmax(-1) == data.labels).double().mean())


def test_a_probe_head_beats_a_random_head_before_any_step(vit_family):
    train, test = toy_task(n=60, seed=0), toy_task(n=60, seed=1)
    torch.manual_seed(0)
    for anchor in load_family(vit_family, num_labels=3):
        random_acc = accuracy(anchor, test)
        result = probe_head(anchor, train.images, train.labels, classes=3)
        probe_acc = accuracy(anchor, test)
        assert probe_acc >= 0.9 and probe_acc > random_acc + 0.2, (anchor.source, random_acc, probe_acc)
        assert result.l2 > 0 and 0 <= result.cv_accuracy <= 1
        assert not any(p.requires_grad for p in anchor.blocks.parameters())  # the anchor itself stays frozen


def test_standardisation_is_folded_into_the_head():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    # features on wildly different scales and offsets: the fit standardises them, the head must undo it
    feats = torch.randn(90, 5, generator=g) + torch.nn.functional.one_hot(labels, 5).float() * 2
    feats = feats * torch.tensor([1e3, 1e-3, 1.0, 50.0, 0.1]) + torch.tensor([7.0, -3.0, 0.0, 100.0, 2.0])
    w, b, r = fit_probe(feats, labels, 3)
    assert w.shape == (3, 5) and b.shape == (3,)
    assert float(((feats @ w.t() + b).argmax(-1) == labels).double().mean()) == r.train_accuracy
    assert r.train_accuracy > 0.8


def test_head_features_are_what_the_head_sees(vit_family):
    anchor = load_family(vit_family, num_labels=3)[0]
    x = toy_task(n=8).images
    with torch.no_grad():
        torch.testing.assert_close(anchor.classifier(head_features(anchor, x)), anchor(x))


def test_a_cached_probe_is_the_same_head_and_other_data_is_another_entry(vit_family, tmp_path):
    train = toy_task(n=60, seed=0)
    first, again, other = (load_family(vit_family[:2], num_labels=3)[0] for _ in range(3))
    r1 = probe_head(first, train.images, train.labels, classes=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    r2 = probe_head(again, train.images, train.labels, classes=3, cache_dir=tmp_path)
    assert r1 == r2
    torch.testing.assert_close(first.task_head().weight, again.task_head().weight, rtol=0, atol=0)
    probe_head(other, train.images[:30], train.labels[:30], classes=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    for f in tmp_path.glob("*.safetensors"):  # a damaged entry is refitted, not trusted
        f.write_bytes(b"junk")
    r3 = probe_head(load_family(vit_family[:2], num_labels=3)[0], train.images, train.labels, classes=3,
                    cache_dir=tmp_path)
    assert r3 == r1
