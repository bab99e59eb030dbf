"""``esta pretrain``: the reproducible recipe behind esta's shipped mini DeiT family.

Three DeiT-shaped ViTs (12 blocks; widths 48/96/192 with 3/6/12 heads, as DeiT-Ti/S/B's 1:2:4; patch 4 on 28x28
grey images) trained from scratch on Fashion-MNIST, saved as ordinary transformers ``ViTForImageClassification``
checkpoints (safetensors + config + preprocessor config) so the same loader takes them as any hub model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

from .data import load_image_task
from .errors import EstaError
from .evaluate import accuracy
from .provenance import environment
from .train import warmup_cosine

log = logging.getLogger("esta.pretrain")

#: name -> (width, heads). ``mini-deit-nano`` (half of Ti) is not part of the shipped family: with it, the step from one
#: anchor to the next pays more on the source task than Ti -> S does, which a test of stitching needs
MINI_SHAPES = {"mini-deit-nano": (24, 3), "mini-deit-ti": (48, 3), "mini-deit-s": (96, 6), "mini-deit-b": (192, 12)}
#: what ``esta pretrain`` makes by default: the family shipped in ``esta/pretrained``
SHIPPED = ("mini-deit-ti", "mini-deit-s", "mini-deit-b")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


#: epochs of the shipped family: a larger anchor never gets fewer than a smaller one. At 4 epochs each, B (83.80 %)
#: was only 0.55 points above S (83.25 %), the least converged of the three; 7 epochs give it its lead.
DEFAULT_EPOCHS = {"mini-deit-nano": 4, "mini-deit-ti": 4, "mini-deit-s": 4, "mini-deit-b": 7}


@dataclass
class PretrainConfig:
    """The recipe. Measured on our 2-core CPU (AMD EPYC, avx512_bf16, no AMX), B model, one training step per image:
    batch 64 12.9 ms, 128 12.4 ms, 256 16.9 ms in float32; bf16 autocast 12.9 / 12.3 / 13.0 ms, so no gain at the
    batch sizes that learn well; SDPA attention 12.4 ms against eager 13.3 ms (batch 128). An earlier session found
    ``torch.compile`` gained nothing and the fused AdamW a few per cent, and that batch 64 learned more per epoch
    than 128 (Ti, 3 epochs: 80.2 % vs 78.6 %) at about the same cost per image. So: float32, batch 64, SDPA (the
    transformers default), fused AdamW. A whole epoch costs ~75 s (Ti), ~210 s (S) and ~700 s (B) here."""

    epochs: dict[str, int] | None = None  # per model; default DEFAULT_EPOCHS
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int | None = None  # torch threads (default: torch's choice, all cores)

    def epochs_for(self, name: str) -> int:
        return (self.epochs or {}).get(name, DEFAULT_EPOCHS[name])


def mini_config(width: int, heads: int, classes: list[str]) -> ViTConfig:
    return ViTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=width, num_hidden_layers=12,
        num_attention_heads=heads, intermediate_size=4 * width, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
    )


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts (pad + crop) and horizontal flips, on a uint8 batch."""
    n, _, h, w = images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (n,), generator=generator)
    dx = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, images.shape[1], h, w + 4)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, images.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - FASHION_MEAN) / FASHION_STD


def pretrain_one(name: str, out_dir: Path, config: PretrainConfig, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    task = load_image_task("fashion-mnist", image_size=28, num_channels=1)
    width, heads = MINI_SHAPES[name]
    torch.manual_seed(config.seed)
    model = ViTForImageClassification(mini_config(width, heads, task.classes))
    images, labels = task.train.images, task.train.labels
    epochs = config.epochs_for(name)
    steps_per_epoch = len(labels) // config.batch_size
    total = epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    gen = torch.Generator().manual_seed(config.seed)
    resume_dir = out_dir / f".{name}.resume"  # end-of-epoch state: a crash loses at most the running epoch
    first_epoch, spent = _load_resume(resume_dir, model, opt, sched, gen)
    start = time.perf_counter() - spent
    model.train()
    bar = tqdm(total=total, initial=first_epoch * steps_per_epoch, desc=f"pretraining {name}",
               disable=not progress)
    for epoch in range(first_epoch, epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * config.batch_size:(k + 1) * config.batch_size]
            logits = model(pixel_values=normalise(augment(images[idx], gen))).logits
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=config.label_smoothing)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        _save_resume(resume_dir, model, opt, sched, gen, epoch + 1, time.perf_counter() - start)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    test_acc = accuracy(lambda x: model(pixel_values=normalise(x)).logits, task.test, progress=progress,
                        desc=f"testing {name}")
    folder = out_dir / name
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 28, "width": 28},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [FASHION_MEAN], "image_std": [FASHION_STD],
    }, indent=1))
    info = {"name": name, "width": width, "heads": heads, "depth": 12, "epochs": epochs,
            "fashion_mnist_test_accuracy": test_acc, "seconds": round(seconds, 1),
            "params": sum(p.numel() for p in model.parameters()), "recipe": asdict(config),
            "command": "esta pretrain", "environment": environment()}
    (folder / "pretraining.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(resume_dir, ignore_errors=True)
    log.info("%s: Fashion-MNIST test accuracy %.4f (%d epochs, %.0f s)", name, test_acc, epochs, seconds)
    return info


def _save_resume(folder: Path, model, opt, sched, gen: torch.Generator, epoch: int, seconds: float) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(), "epoch": epoch,
                "seconds": seconds}, tmp / "state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # the old state is replaced only once the new one is whole


def _load_resume(folder: Path, model, opt, sched, gen: torch.Generator) -> tuple[int, float]:
    if not (folder / "state.pt").is_file():
        return 0, 0.0
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / "state.pt", weights_only=True)  # tensors and plain containers only
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    log.info("resuming pretraining from %s after epoch %d", folder, state["epoch"])
    return int(state["epoch"]), float(state["seconds"])


def pretrain(out_dir: str | Path, names: list[str] | None = None, config: PretrainConfig | None = None,
             progress: bool = True) -> list[dict]:
    out_dir = Path(out_dir)
    config = config or PretrainConfig()
    unknown = [n for n in names or [] if n not in MINI_SHAPES]
    if unknown:
        raise EstaError(f"unknown model(s) {unknown}; choose from {list(MINI_SHAPES)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    return [pretrain_one(n, out_dir, config, progress) for n in (names or list(SHIPPED))]
