from pathlib import Path

import torch
from transformers import ViTForImageClassification

from esta.pretrain import _load_resume, _save_resume, mini_config
from esta.train import warmup_cosine


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = ViTForImageClassification(mini_config(8, 2, ["a", "b"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 10))
    return model, opt, sched, torch.Generator().manual_seed(seed)


def step(model, opt, sched, gen):
    x = torch.randn(4, 1, 28, 28, generator=gen)
    model(pixel_values=x).logits.sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_pretraining_resumes_exactly_from_the_last_epoch(tmp_path):
    a = parts()
    step(*a)
    _save_resume(tmp_path / ".m.resume", *a, epoch=1, seconds=12.5)
    step(*a)  # the uninterrupted run goes on...
    b = parts(seed=1)  # ...and a fresh process resumes from disk
    assert _load_resume(tmp_path / ".m.resume", *b) == (1, 12.5)
    step(*b)
    for (n, p), q in zip(a[0].state_dict().items(), b[0].state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)
    assert _load_resume(tmp_path / "absent", *parts()) == (0, 0.0)


def test_the_shipped_family_records_its_pretraining_and_bigger_is_better():
    import json

    from esta.families import mini_family_paths

    infos = [json.loads((Path(p) / "pretraining.json").read_text()) for p in mini_family_paths()]
    acc = [i["fashion_mnist_test_accuracy"] for i in infos]
    assert all(0 < a < 1 for a in acc) and all(i["seconds"] > 0 for i in infos)
    # bigger is better on the source task, by a point or more between neighbours
    assert acc[1] - acc[0] >= 0.01 and acc[2] - acc[1] >= 0.01, acc
    assert infos[0]["epochs"] <= infos[1]["epochs"] <= infos[2]["epochs"]  # never the larger one less trained
    size = sum(f.stat().st_size for p in mini_family_paths() for f in Path(p).iterdir())
    assert size <= 30 * 2**20
    # `esta pretrain` re-creates exactly the shipped three by default, with their recorded shapes; nano is extra
    from esta.pretrain import MINI_SHAPES, SHIPPED

    assert [i["name"] for i in infos] == list(SHIPPED)
    assert [(i["width"], i["heads"]) for i in infos] == [MINI_SHAPES[n] for n in SHIPPED]
    assert MINI_SHAPES["mini-deit-nano"][0] * 2 == MINI_SHAPES["mini-deit-ti"][0]
