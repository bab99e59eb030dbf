"""Worker for test_multiprocess: one rank of a torchrun launch training the tiny palette."""

import json
import sys
from dataclasses import replace
from pathlib import Path

from helpers import build, toy_task
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from esta.importance import SamplingConfig
from esta.train import TrainConfig, classification_loss, make_accelerator, train

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

CONFIG = TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup_steps=2, checkpoint_every=0,
                     sampling=SamplingConfig(groups=3))


def run(paths: list[str], out: Path, accelerator=None, stitches_per_step: int = 1) -> None:
    data = toy_task(n=96)
    palette, flops = build(paths, data)
    seen: list[int] = []

    def loss_fn(model, batch, stitch):
        seen.append(stitch)
        return classification_loss(model, batch, stitch)

    config = replace(CONFIG, stitches_per_step=stitches_per_step)
    result = train(palette, data, flops, config, loss_fn=loss_fn, accelerator=accelerator, progress=False)
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    save_file(palette.adaptation_state(), str(out / f"state{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "seen": seen, "importance": result.importance}))


if __name__ == "__main__":  # args: anchor folders..., K (stitches per step), output folder
    run(sys.argv[1:-2], Path(sys.argv[-1]), make_accelerator(), int(sys.argv[-2]))
