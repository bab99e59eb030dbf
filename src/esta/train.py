"""The one training loop: sample a stitch -> forward -> loss -> backward -> score -> step, on Accelerate.

Every process samples the same stitch at every step (same seeded generator, and the main process's choice is
broadcast), runs it on its own shard of the batch, and gradients are averaged by DDP, so several processes are a
launch option (``accelerate launch --num_processes N``), not another code path.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .distillation import distillation_term
from .errors import EstaError
from .files import write_json
from .importance import ImportanceSampler, SamplingConfig, budget_groups, snip_score
from .methods import get_method
from .palette import Palette

log = logging.getLogger("esta.train")

LossFn = Callable[[Callable[..., torch.Tensor], Any, int], torch.Tensor]


@dataclass
class TrainConfig:
    epochs: float = 30.0  # passes over the training set (all stitches together)
    steps: int | None = None  # training steps (overrides epochs when given)
    batch_size: int = 64  # examples per step
    # None is resolved by ``esta.run`` (ESTA 2e-3, SN-Net 1e-4: ``methods.py``), so the Python API and ``esta
    # train`` train at the same rate; ``esta.train`` called directly uses ESTA's
    #: learning rate (none: the method's own)
    lr: float | None = None
    weight_decay: float = 1e-4  # on LoRA and head weights; never on biases
    warmup_steps: int = 20  # linear warm-up of the learning rate
    # A head that starts as a linear probe is already good; at the full rate its first Adam steps (about ``lr`` per
    # weight, whatever the gradient's size) undo part of the probe before the trunk has adapted (LP-FT, Kumar et
    # al. 2022, tunes after probing gently)
    #: the new task heads' learning rate as a multiple of the learning rate
    head_lr_scale: float = 1.0
    seed: int = 0  # seeds data order, stitch sampling and new heads
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Off by default (ours): it costs a forward and backward of every stitch (71 for Ti/S/B, ~12 % of the demo's
    # steps), and unscored stitches are already sampled as if they had their group's highest score, so each is
    # tried early anyway
    #: score every stitch's importance on one batch before training (a reading of the paper)
    score_init_batch: bool = False
    # A step then updates K stitches for about the price of one full-batch step (same examples, K smaller
    # forwards), so each anchor gets K times the updates. Measured at 150 steps (docs/method.md): K=4 raised the
    # mean deployed test accuracy by 1.5-4.4 points in 5 of 5 runs on three tasks, for 1.04-1.19x the training time
    #: stitches trained per step, each on its own 1/K of the batch (ours; the paper's is 1)
    stitches_per_step: int = 1
    # a stitch's loss is ``(1 - distill) * task loss + distill * T^2 KL(end anchor || stitch)`` on the same batch,
    # the teacher being the palette's own end anchor (current shared LoRA and head, detached: no extra model). An
    # anchor's loss is its task loss alone
    #: weight of in-place distillation from each stitch's end anchor in its loss, 0-1 (ours)
    distill: float = 0.0
    distill_temperature: float = 1.0  # distillation temperature
    #: compute the SNIP score after every backward; methods that neither sample nor deploy by importance skip it
    track_importance: bool = True
    checkpoint_every: int = 200  # steps between checkpoints (0: only at the end)
    log_every: int = 10  # steps between lines of OUT/loss.jsonl (0: none)
    num_workers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rate(self) -> float:
        """The learning rate this config trains at (ESTA's where no method resolved ``lr``)."""
        return get_method("esta").lr if self.lr is None else self.lr

    def check(self) -> None:
        """Refuse impossible settings before anything is loaded."""
        if self.steps is not None and self.steps < 1:
            raise EstaError(f"steps must be at least 1, got {self.steps}")
        if self.steps is None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise EstaError(f"epochs must be a positive number, got {self.epochs:g}")
        if self.batch_size < 1:
            raise EstaError(f"batch size must be at least 1, got {self.batch_size}")
        for name, v in (("learning rate", self.rate), ("head_lr_scale", self.head_lr_scale)):
            if not (math.isfinite(v) and v > 0):
                raise EstaError(f"{name} must be a positive number, got {v:g}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise EstaError(f"weight decay must be >= 0, got {self.weight_decay:g}")
        if not 0 <= self.distill <= 1:
            raise EstaError(f"distill (the distillation term's weight) must be in [0, 1], got {self.distill:g}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise EstaError(f"distillation temperature must be a positive number, got {self.distill_temperature:g}")
        if not 1 <= self.stitches_per_step <= self.batch_size:
            raise EstaError(f"stitches per step must be between 1 and the batch size ({self.batch_size}), got "
                            f"{self.stitches_per_step}")
        for name, v in (("warmup steps", self.warmup_steps), ("checkpoint_every", self.checkpoint_every),
                        ("log_every", self.log_every), ("num_workers", self.num_workers)):
            if v < 0:
                raise EstaError(f"{name} must be >= 0, got {v}")
        self.sampling.check()


@dataclass
class TrainResult:
    steps: int
    seconds: float
    trainable_params: int
    total_params: int
    peak_rss_mb: float
    #: how far training raised the peak above the memory held when it began (the process's own runtime, the data
    #: and the frozen weights are below that line); the part of the peak that the method is responsible for
    train_rss_increase_mb: float
    final_loss: float
    importance: list[float]
    updates: list[int]
    groups: list[list[int]]
    #: per stitch, the moving average (factor beta) of its training loss; None where it never trained
    train_loss: list[float | None] = field(default_factory=list)


def candidate_groups(costs: list[float], groups: int, candidates: list[int],
                     spacing: str = "linear") -> list[list[int]]:
    """The budget groups of all stitches, restricted to ``candidates`` (empty groups dropped)."""
    keep = set(candidates)
    return [m for g in budget_groups(costs, groups, spacing) if (m := [s for s in g if s in keep])]


def untrained_result(palette: Palette, costs: list[float], groups: int, stitches: list[int] | None,
                     spacing: str = "linear") -> TrainResult:
    """What :func:`train` reports for a method that trains nothing (a linear probe: heads fitted in closed form)."""
    candidates = list(range(len(palette))) if stitches is None else list(stitches)
    n = len(palette)
    heads = {id(p): p for a in palette.anchors if a.task_head() is not None for p in a.task_head().parameters()}
    return TrainResult(steps=0, seconds=0.0, trainable_params=sum(p.numel() for p in heads.values()),
                       total_params=palette.total_parameters(), peak_rss_mb=peak_rss_mb(), train_rss_increase_mb=0.0,
                       final_loss=float("nan"), importance=[0.0] * n, updates=[0] * n,
                       groups=candidate_groups(costs, groups, candidates, spacing), train_loss=[None] * n)


def classification_loss(model: Callable[..., torch.Tensor], batch: Any, stitch: int, teacher: int | None = None,
                        distill: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy; with a ``teacher`` stitch (the end anchor), mixed with distillation towards its logits."""
    images, labels = batch
    if teacher is None or not distill:
        return F.cross_entropy(model(images, stitch=stitch), labels)
    with torch.no_grad():  # first: the forward of the student must be the last to select its stitch
        target = model(images, stitch=teacher)
    logits = model(images, stitch=stitch)
    return (1 - distill) * F.cross_entropy(logits, labels) + distill * distillation_term(logits, target, temperature)


class ResumableBatches(Sampler[list[int]]):
    """Epoch-seeded shuffled batches from ``start_step`` on; this process's share of each global batch.

    Our own order (instead of ``accelerator.prepare(dataloader)``) so that a resumed run sees the same batches
    as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if n < batch_size:
            raise EstaError(f"the training set has {n} examples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for step in range(self.start_step, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            batch = perm[k * self.batch_size:(k + 1) * self.batch_size]
            yield batch[self.rank::self.world].tolist()


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def _param_groups(palette: Palette, weight_decay: float, lr: float, head_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices only; the new task heads at ``head_lr_scale`` times the rate."""
    heads = {id(p) for a in palette.anchors if a.task_head() is not None for p in a.task_head().parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for p in palette.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in heads, p.dim() >= 2), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if matrix else 0.0,
             "lr": lr * (head_lr_scale if head else 1.0)}
            for (head, matrix), ps in sorted(groups.items())]


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def make_accelerator() -> Accelerator:
    """One process, or as many as the launcher (torchrun / accelerate launch) started.

    ``cpu=True`` where there is no GPU: that is what lets Accelerate pick up a torchrun launch on CPUs (gloo).
    """
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # a step runs one stitch
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class _Run:
    """What the loop carries from its set-up to its end (one training run of a palette)."""

    palette: Palette
    config: TrainConfig
    accelerator: Accelerator
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ImportanceSampler
    candidates: list[int]
    groups: list[list[int]]
    path_params: dict[int, list[torch.Tensor]]
    end_anchor: list[int | None]  # each stitch's teacher when distilling (None for an anchor)
    trainable: list[torch.Tensor]
    total_steps: int
    ckpt_dir: Path | None
    start_step: int = 0
    ema: float | None = None
    seconds_before: float = 0.0  # training time before a restart
    start_time: float = field(default_factory=time.perf_counter)
    rss_start: float = field(default_factory=rss_mb)

    def elapsed(self) -> float:  # the whole run's training time, across restarts
        return self.seconds_before + time.perf_counter() - self.start_time


def train(palette: Palette, train_set: Dataset, costs: list[float], config: TrainConfig, *,
          loss_fn: LossFn = classification_loss, out_dir: str | Path | None = None, resume: bool = False,
          accelerator: Accelerator | None = None, collate_fn: Callable | None = None,
          progress: bool = True, stitches: list[int] | None = None) -> TrainResult:
    """Adapt the whole palette to ``train_set`` in one run (PST must already be applied): set up, (score every
    stitch once), then step after step, each checkpointed on schedule.

    ``costs``: one number per stitch (FLOPs, or parameters for LLMs) for the budget groups. ``stitches``: train only
    these (e.g. one anchor alone); default every stitch. Checkpoints go to ``out_dir/checkpoint`` every
    ``config.checkpoint_every`` steps; ``resume=True`` continues from there.
    """
    run = _set_up(palette, len(train_set), costs, config, out_dir, resume, accelerator, stitches)

    def loader(steps: int, start: int, seed: int) -> DataLoader:
        batches = ResumableBatches(len(train_set), config.batch_size, steps, seed, start,
                                   run.accelerator.process_index, run.accelerator.num_processes)
        return DataLoader(train_set, batch_sampler=batches, num_workers=config.num_workers, collate_fn=collate_fn)

    if config.score_init_batch and run.start_step == 0:
        _score_every_stitch(run, next(iter(loader(1, 0, config.seed + 1))), loss_fn, progress)
    main = run.accelerator.is_main_process
    history = LossHistory(Path(out_dir) / "loss.jsonl" if out_dir is not None and config.log_every and main
                          else None, run.start_step)
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="training palette", disable=not progress or not main)
    loss_value = float("nan")
    for step, batch in enumerate(loader(run.total_steps, run.start_step, config.seed), start=run.start_step):
        picked, loss_value = _step(run, batch, step, loss_fn)
        run.ema = loss_value if run.ema is None else 0.95 * run.ema + 0.05 * loss_value
        done = step + 1
        shown = picked[0] if config.stitches_per_step == 1 else picked  # one stitch id, or the step's K
        lr = run.scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{run.ema:.3f}", stitch=shown, lr=f"{lr:.1e}")
        if config.log_every and (done % config.log_every == 0 or done == run.total_steps):
            history.write({"step": done, "stitch": shown, "loss": loss_value, "loss_ema": run.ema, "lr": lr,
                           "seconds": round(run.elapsed(), 3)})
        if done == run.total_steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
            _checkpoint(run, done)
    bar.close()
    history.close()
    run.accelerator.wait_for_everyone()
    return _result(run, palette, loss_value)


def _set_up(palette: Palette, examples: int, costs: list[float], config: TrainConfig, out_dir: str | Path | None,
            resume: bool, accelerator: Accelerator | None, stitches: list[int] | None) -> _Run:
    """The sampler over the budget groups, the optimizer and schedule, and the state of a checkpoint to resume."""
    if palette.pst is None:
        raise EstaError("apply PST (palette.apply_pst) before training")
    config.check()
    start_time, rss_start = time.perf_counter(), rss_mb()
    accelerator = accelerator or make_accelerator()
    set_seed(config.seed)
    candidates = list(range(len(palette))) if stitches is None else list(stitches)
    groups = candidate_groups(costs, config.sampling.groups, candidates, config.sampling.spacing)
    sampler = ImportanceSampler(groups, len(palette), config.sampling, seed=config.seed,
                                anchors=palette.space.anchor_ids())
    steps_per_epoch = max(1, examples // config.batch_size)
    total_steps = config.steps if config.steps is not None else max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(_param_groups(palette, config.weight_decay, config.rate, config.head_lr_scale),
                                  lr=config.rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total_steps))
    # The scheduler stays out of prepare(): Accelerate would step it once per process per step, assuming it had
    # sharded the loader into fewer steps; our loader gives every process the same number of steps.
    model, optimizer = accelerator.prepare(palette, optimizer)
    run = _Run(palette, config, accelerator, model, optimizer, scheduler, sampler, candidates, groups,
               path_params={s: palette.path_parameters(s) for s in candidates}, end_anchor=palette.end_anchor_ids(),
               trainable=[p for p in palette.parameters() if p.requires_grad], total_steps=total_steps,
               ckpt_dir=Path(out_dir) / "checkpoint" if out_dir is not None else None,
               start_time=start_time, rss_start=rss_start)
    if resume:
        if run.ckpt_dir is None:
            raise EstaError("resume needs the run's output folder")
        sampler_state, meta = load_checkpoint(run.ckpt_dir, palette, optimizer, scheduler)
        sampler.load_state_dict(sampler_state)
        run.start_step = int(meta["step"])
        # the whole run's loss average and training time, not only the part after the restart
        run.ema, run.seconds_before = meta.get("loss_ema"), float(meta.get("seconds", 0.0))
        log.info("resumed from %s at step %d", run.ckpt_dir, run.start_step)
    model.train()
    return run


def _score_every_stitch(run: _Run, batch: Any, loss_fn: LossFn, progress: bool) -> None:
    """I(s) of every candidate from one batch, before the first step."""
    batch = _to(batch, run.accelerator.device)
    per_parameter = run.config.sampling.score == "mean"
    scores = {}
    for s in tqdm(run.candidates, desc="scoring stitches", leave=False,
                  disable=not progress or not run.accelerator.is_main_process):
        run.accelerator.backward(loss_fn(run.model, batch, s))
        scores[s] = snip_score(run.path_params[s], per_parameter)
        run.optimizer.zero_grad(set_to_none=True)
    run.sampler.initialise(scores)


def _step(run: _Run, batch: Any, step: int, loss_fn: LossFn) -> tuple[list[int], float]:
    """One step: sample K stitches, each trains on its 1/K of the batch (its score from its own gradient), one
    optimizer step for all. Returns the stitches and the step's mean loss."""
    config, palette, accelerator = run.config, run.palette, run.accelerator
    k = config.stitches_per_step
    per_parameter = config.sampling.score == "mean"
    picked = broadcast(torch.tensor([run.sampler.sample() for _ in range(k)], device=accelerator.device)).tolist()
    loss_value, held = 0.0, {}
    # with several processes each splits its own shard, and since shards interleave (rank r holds examples r,
    # r + world, ...) part j of all processes together is part j of the whole batch
    for stitch, part in zip(picked, _split(_to(batch, accelerator.device), k)):
        if k > 1:  # each stitch's score must see only its own part's gradient: the others wait aside
            _hold_gradients(run.trainable, held)
        teacher = run.end_anchor[stitch]
        loss = loss_fn(run.model, part, stitch) if not config.distill or teacher is None else \
            loss_fn(run.model, part, stitch, teacher, config.distill, config.distill_temperature)
        part_loss = float(loss.detach())
        _check_finite("loss", part_loss, step, stitch, palette, config.rate)
        accelerator.backward(loss / k)  # the step's gradient is the mean over its K parts
        # |theta*grad| is NaN/inf with the gradients; without scores, their norm is the (cheap) check. The score
        # is of the part's own loss (x k undoes the 1/k above: the score is linear in the gradient)
        score = k * snip_score(run.path_params[stitch], per_parameter) if config.track_importance else 0.0
        check = score if config.track_importance else _grad_norm(run.path_params[stitch])
        _check_finite("gradient", check, step, stitch, palette, config.rate)
        run.sampler.update(stitch, score, part_loss)
        loss_value += part_loss / k
    _restore_gradients(held)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # None, not 0: the next step's untouched params are then skipped
    return picked, loss_value


def _checkpoint(run: _Run, done: int) -> None:
    if run.ckpt_dir is not None and run.accelerator.is_main_process:
        save_checkpoint(run.ckpt_dir, run.palette, run.optimizer, run.scheduler, run.sampler.state_dict(),
                        {"step": done, "total_steps": run.total_steps, "loss_ema": run.ema,
                         "seconds": run.elapsed(), "config": run.config.to_dict()})


def _result(run: _Run, palette: Palette, loss_value: float) -> TrainResult:
    sampler = run.sampler
    return TrainResult(
        steps=run.total_steps,
        seconds=run.elapsed(),
        trainable_params=sum(p.numel() for p in {id(p): p for s in run.candidates
                                                 for p in run.path_params[s]}.values()),
        total_params=palette.total_parameters(),
        peak_rss_mb=peak_rss_mb(),
        train_rss_increase_mb=max(0.0, peak_rss_mb() - run.rss_start),
        final_loss=run.ema if run.ema is not None else loss_value,
        importance=[float(v) for v in sampler.importance],
        updates=[int(v) for v in sampler.updates],
        groups=run.groups,
        train_loss=[float(v) if n else None for v, n in zip(sampler.train_loss, sampler.updates)],
    )


class LossHistory:
    """``loss.jsonl``: one JSON line every few steps. A resumed run first drops the lines after its checkpoint,
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path | None, start_step: int) -> None:
        self.file = None
        if path is None:
            return
        kept = []
        if start_step and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a line torn by the crash: nothing after it is kept
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(k + "\n" for k in kept))
        self.file = open(path, "a", buffering=1)  # line-buffered: a crash loses at most the line being written

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _split(batch: Any, k: int) -> list[Any]:
    """``batch`` cut into ``k`` nearly equal parts along its first dimension (tensors inside tuples, lists and
    dicts alike: images and labels, or input ids, masks and labels)."""
    if k == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, k))
    if isinstance(batch, dict):
        parts = {key: _split(v, k) for key, v in batch.items()}
        return [{key: parts[key][i] for key in batch} for i in range(k)]
    if isinstance(batch, (list, tuple)):
        columns = [_split(v, k) for v in batch]
        return [type(batch)(c[i] for c in columns) for i in range(k)]
    return [batch] * k


def _hold_gradients(params: list[torch.nn.Parameter], held: dict) -> None:
    """Move the gradients gathered so far into ``held`` (summed with what it holds), leaving the params bare."""
    for p in params:
        if p.grad is not None:
            held[p] = held[p] + p.grad if p in held else p.grad
            p.grad = None


def _restore_gradients(held: dict) -> None:
    """Put the held gradients back, summed with the last part's."""
    for p, g in held.items():
        p.grad = g if p.grad is None else p.grad + g


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0


def _check_finite(what: str, value: float, step: int, stitch: int, palette: Palette, lr: float) -> None:
    """Stop at the first non-finite loss or gradient, before it reaches the weights: the last checkpoint (written
    only after finite steps) stays good, and nothing is deployed from a broken palette."""
    if not math.isfinite(value):
        raise EstaError(f"non-finite {what} ({value}) at step {step + 1}, stitch {palette.space[stitch].name}: "
                        f"training stopped; the learning rate ({lr:g}) is probably too high")


def write_result(result: TrainResult, path: str | Path) -> None:
    write_json(path, asdict(result))
