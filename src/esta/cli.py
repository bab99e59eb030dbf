"""``esta`` command line: each sub-command is a recipe over the library's components. The training commands'
flags are made from the config dataclasses (``esta.flags``): their defaults and help live there."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import EstaError
from .flags import int_list

# -- training: one command for every Task (lm-train: the same, for the language Task and its built-in sources) --
#: what each training command changes in its config's defaults (shown in its help)
COMMANDS = {"demo": {"out_dir": "runs/demo"}, "train": {"out_dir": "runs/train"}, "lm-train": {}}


def _training_flags():
    from .flags import config_flags
    from .tasks import AdaptConfig, LMAdaptConfig

    return config_flags(AdaptConfig, LMAdaptConfig)


def training_config(args: argparse.Namespace):
    """The run's config: its Task's config class with its defaults, the command's own, and the flags given."""
    from .flags import given_settings
    from .tasks import LMAdaptConfig, config_for

    config = config_for(given_settings(args, _training_flags()), _training_flags(), COMMANDS[args.command],
                        LMAdaptConfig if args.command == "lm-train" else None)
    return config.with_builtin_sources(args.pairs, args.per_task) if args.command == "lm-train" else config


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .recipe import compare_alone, run
    from .tasks import config_from_file, task_class

    if args.config:  # the file's settings; beside it only these flags
        beside = {"out_dir": args.out, "progress": args.progress, "resume": bool(args.resume),
                  "overwrite": bool(args.overwrite)}
        config = replace(config_from_file(args.config), **{k: v for k, v in beside.items() if v is not None})
    else:
        config = training_config(args)
    results = run(config)
    if not results:  # another process of a multi-process run: the main one reports
        return 0
    compare = [m for m in (args.compare or "").split(",") if m.strip()]
    if compare and results.get("method") not in compare:
        compare_alone(results, config, compare)
    print(task_class(config).summary(results, config.out_dir))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from .budget import AXES
    from .runs import redeploy, save_run_palette

    if args.palette:
        folder = save_run_palette(args.run, args.out)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"wrote the whole palette to {folder} ({size:.1f} MB): load it with esta.serving.load_palette")
    for d in [] if args.palette else redeploy(args.run, args.budgets or None, args.out, args.allow_unfinished):
        axis = next(a for key, a in AXES.items() if key in d)
        print(f"budget {axis.show(d['budget'])} -> {d['name']} ({axis.show(d[axis.key])}): {d['path']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runs import evaluate_deployed

    print(json.dumps(evaluate_deployed(args.model, args.data, seed=args.seed, examples=args.examples,
                                       max_length=args.max_length, progress=not args.no_progress)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, export_transformers

    print(json.dumps(export_transformers(args.model) if args.format == "transformers" else
                     export_onnx(args.model, args.out, tolerance=args.tolerance)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .runs import rebuild_report

    print(f"wrote {rebuild_report(args.run)}")
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    from .sources import report_sources

    print(report_sources(online=not args.offline, as_json=args.json))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import profile_palette, summary_line

    table = profile_palette(args.palette, batch_size=args.batch_size, threads=args.threads, warmup=args.warmup,
                            repeats=args.repeats, progress=not args.no_progress, prompt_tokens=args.prompt_tokens)
    print(summary_line(table, args.palette))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.palette, host=args.host, port=args.port) or 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import SHIPPED, PretrainConfig, pretrain

    names = args.models.split(",") if args.models else list(SHIPPED)
    epochs = dict(zip(names, args.epochs)) if args.epochs else None
    for info in pretrain(args.out, names, PretrainConfig(epochs=epochs, seed=args.seed), not args.no_progress):
        print(f"{info['name']}: Fashion-MNIST test accuracy {100 * info['fashion_mnist_test_accuracy']:.2f}% "
              f"({info['params']:,} parameters, {info['epochs']} epochs, {info['seconds']:.0f} s)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import GradAngleConfig, grad_angles
    from .flags import config_flags, given_settings

    cfg = GradAngleConfig(**given_settings(args, config_flags(GradAngleConfig)))
    r = grad_angles(cfg)
    for role, t in r["tasks"].items():
        print(f"{role} ({t['task']}): {t['pairs']} stitch pairs, mean angle {t['mean_deg']:.1f}°, median "
              f"{t['median_deg']:.1f}°, {100 * t['fraction_over_90']:.1f}% over 90°")
    print(f"wrote {cfg.out_dir}/grad_angles.json and {cfg.out_dir}/grad_angles.png")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import chat
    from .runs import deployed_lm

    model, tok, folder = deployed_lm(args.model, args.run, args.budget)
    if args.command == "chat":
        print(f"chatting with {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); "
              "an empty line or Ctrl-D ends")
    chat(model, tok, args.max_new_tokens, args.temperature, **({} if args.command == "chat" else {
        "read": iter([args.prompt]).__next__, "prompt": False}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench
    from .flags import config_flags, given_settings

    kw = given_settings(args, config_flags(BenchConfig))
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    bench = run_bench(cfg)
    print((Path(cfg.out_dir) / "bench.md").read_text())
    print(f"bench took {bench['seconds']:.0f} s; wrote {cfg.out_dir}/bench.json, bench.md, pareto-<task>.png")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from .flags import build_config, given_settings
    from .routes import describe_routes, peer_space
    from .space import build_space, depths_of
    from .tasks import AdaptConfig

    depths = depths_of(args.anchors) if args.anchors else args.depths
    if not depths:
        raise EstaError("give --depths (e.g. 12,12,12) or --anchors")
    cfg = build_config(AdaptConfig(), given_settings(args, _space_flags()), _space_flags())  # what train builds
    if args.peers:  # a peer's whole space, counted route by route (esta trains the two-segment routes)
        print(describe_routes(peer_space(args.peers, depths, cfg.kernel, cfg.stride)))
        return 0
    space = build_space(depths, kernel=cfg.kernel, stride=cfg.stride, pairing=cfg.pairing, two_way=cfg.two_way,
                        stitch_layers=cfg.stitch_layers)
    print(space.to_json(indent=1) if args.json else space.describe())
    return 0


# -- argument parsing --------------------------------------------------------------------------------------------
def _space_flags():
    """The training flags that shape the stitch space (``esta space`` shows the space ``esta train`` builds)."""
    return [f for f in _training_flags() if f.path in ("kernel", "stride", "pairing", "two_way", "stitch_layers")]


def _training_parser(sub, name: str, helptext: str, compare: str = "") -> None:
    p = sub.add_parser(name, help=helptext)
    p.set_defaults(func=cmd_train)
    if not sub.wanted(name):
        return
    from dataclasses import replace

    from .flags import add_config_flags
    from .tasks import AdaptConfig, LMAdaptConfig

    defaults = {c: replace(c(), **COMMANDS[name]) for c in (AdaptConfig, LMAdaptConfig)}
    add_config_flags(p, _training_flags(), defaults, {AdaptConfig: "images", LMAdaptConfig: "language models"})
    p.add_argument("--compare", default=compare, help="also tune the anchors alone: anchors-lora, linear-probe "
                   f"(default {compare or 'none'}; '' for none)")
    p.add_argument("--config", default=None, help="every setting from a run.json or a JSON/YAML config (only --out, "
                   "--resume, --overwrite and --no-progress apply beside it)")
    if name == "lm-train":
        p.add_argument("--pairs", type=int, default=20000, help="built-in sharegpt data: turns sampled")
        p.add_argument("--per-task", type=int, default=200, help="built-in natural-instructions: examples per task")


def _config_parser(sub, name: str, helptext: str, config: str, func) -> argparse.ArgumentParser:
    """A command whose flags are one config dataclass's fields (``esta.flags``); ``config``: "module.Class"."""
    import importlib

    from .flags import add_config_flags, config_flags

    p = sub.add_parser(name, help=helptext)
    if sub.wanted(name):
        module, cls = config.split(".")
        cls = getattr(importlib.import_module(f".{module}", __package__), cls)
        add_config_flags(p, config_flags(cls), {cls: cls()})
    p.set_defaults(func=func)
    return p


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """``only``: build the flags of that command alone (the others are listed, flagless)."""
    from .flags import Commands, add_config_flags

    parser = argparse.ArgumentParser(prog="esta", description="Efficient Stitchable Task Adaptation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = Commands(parser.add_subparsers(dest="command", required=True), only)
    _training_parser(sub, "demo", "adapt the shipped mini DeiT family to animal-shapes, deploy per budget, report",
                     compare="anchors-lora")
    _training_parser(sub, "train", "adapt a family to a task with ESTA (images, or a causal-LM family), deploy per "
                     "budget, report")
    _training_parser(sub, "lm-train", "esta train for a causal-LM family, fetching what is not given: the "
                     "Qwen2.5-Coder 0.5B/1.5B pair, ShareGPT turns, the multiple-choice sets")

    p = _config_parser(sub, "bench", "every method on every task: bench.json, table, plots", "bench.BenchConfig",
                       cmd_bench)
    p.add_argument("--quick", action="store_true", help="smoke run (<= 10 min): BenchConfig.quick's settings")
    p = _config_parser(sub, "analyze", "analyses of a family: grad-angles (Fig. 2)", "analysis.GradAngleConfig",
                       cmd_analyze)
    p.add_argument("analysis", choices=["grad-angles"])

    for name, helptext in (("generate", "generate a reply to --prompt with a deployed LLM stitch"),
                           ("chat", "chat with a deployed LLM stitch (streams tokens)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default=None, help="a deployed stitch folder")
        p.add_argument("--run", default=None, help="an lm-train run folder (with --budget)")
        p.add_argument("--budget", default=None, help="the costliest stitch of --run within this (300M, 1.2B)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.set_defaults(func=cmd_generate)

    p = sub.add_parser("deploy", help="deploy again from a finished run (image or language), e.g. for other budgets")
    p.add_argument("--run", required=True, help="the run folder (with run.json and checkpoint/)")
    if sub.wanted("deploy"):  # the budgets flag of training, with the image Task's default
        flags = [f for f in _training_flags() if f.path == "budgets"]
        add_config_flags(p, flags, {flags[0].owners[0]: flags[0].owners[0]()})
    p.add_argument("--out", default=None, help="where to write (default RUN/deployed, replaced whole)")
    p.add_argument("--allow-unfinished", action="store_true", help="deploy a checkpoint short of its last step")
    p.add_argument("--palette", action="store_true", help="the whole palette as one artifact (OUT: RUN/palette)")
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
    p.add_argument("--prompt-tokens", type=int, default=None, help="language: prompt tokens before timing (64)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="a deployed stitch to ONNX (checked against onnxruntime)")
    p.add_argument("--model", required=True, help="a deployed stitch folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "transformers"], help="transformers: config.json")
    p.add_argument("--out", default=None, help="output file (default MODEL/model.onnx)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |onnxruntime - torch|")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="a deployed stitch's accuracy on a task, or perplexity on records")
    p.add_argument("--model", required=True, help="a deployed stitch folder")
    p.add_argument("--data", required=True, help="an image task, or Alpaca/ShareGPT .json/.jsonl records")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's train/test split")
    p.add_argument("--examples", type=int, default=0, help="language: the first N records (default all)")
    p.add_argument("--max-length", type=int, default=256, help="language: tokens per record (default 256)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("space", help="list the stitches of a family")
    p.add_argument("--depths", type=int_list, default=None, help="comma-separated anchor depths, e.g. 12,12,12")
    p.add_argument("--anchors", nargs="*", default=None, help="read depths from these models instead")
    if sub.wanted("space"):
        flags = _space_flags()
        add_config_flags(p, flags, {flags[0].owners[0]: flags[0].owners[0]()})
    p.add_argument("--peers", choices=["snnet", "snnet-all", "snnetv2"], help="count a peer's whole space instead")
    p.add_argument("--json", action="store_true", help="print the space as JSON")
    p.set_defaults(func=cmd_space)

    p = sub.add_parser("report", help="write a run's report.html again (hover any stitch of the palette)")
    p.add_argument("run", help="a finished run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sources", help="every built-in model and data source: pinned, cached here, still on its index?")
    p.add_argument("--offline", action="store_true", help="only what is cached here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sources)

    p = sub.add_parser("pretrain", help="pretrain esta's mini DeiT family on Fashion-MNIST")
    p.add_argument("--out", default="runs/pretrained", help="where to write the checkpoints")
    p.add_argument("--models", default="", help="comma-separated models of mini-deit-nano,mini-deit-ti,mini-deit-s,"
                   "mini-deit-b (default: the shipped three, ti,s,b)")
    p.add_argument("--epochs", type=int_list, default=None, help="comma-separated epochs per model (default 4,4,7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), "")).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    from ._register import quiet_libraries

    quiet_libraries()
    try:
        return args.func(args)
    except EstaError as e:
        print(f"esta: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``esta space ... | head``): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- Python flushes stdout once more at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
