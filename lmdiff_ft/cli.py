"""The `lmdiff-ft` command: a thin layer over library functions. User mistakes print one line, exit 2."""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import get_args

from .errors import TrainingStopped, UserError
from .integrations.versions import untested_versions
from .schema.task import AdapterConfig, Dtype, NamedBase, Quantization
from .serve.settings import DEFAULT_LIMITS, QUEUE_SIZE, Limits

QUANTIZATIONS = list(get_args(Quantization))
NAMED_BASES = " or ".join(repr(name) for name in get_args(NamedBase))
ADAPTER_DEFAULTS = AdapterConfig()


def cmd_convert(args: argparse.Namespace) -> None:
    from .model.convert import convert_checkpoint

    report = convert_checkpoint(
        args.src, args.out, drop_unknown=args.drop_unknown, tolerance=args.tolerance, gguf_file=args.gguf_file
    )
    diff = report.max_abs_logit_diff
    print(f"wrote {args.out}: {report.num_parameters:,} parameters, max |Δlogits| vs source {diff:.3g}")
    if report.dropped_tensors:
        print(f"dropped {len(report.dropped_tensors)} non-Llama tensors: {', '.join(report.dropped_tensors)}")


def cmd_tiny_base(args: argparse.Namespace) -> None:
    from .base.tiny import build_tiny_base

    out = build_tiny_base(args.out, seed=args.seed, from_llama=args.from_llama, overwrite=args.overwrite)
    print(f"wrote tiny {'Llama-converted ' if args.from_llama else ''}LM-Diff base to {out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .commands.inspect import inspect_base, print_report
    from .schema.task import parse_layers

    presets = [p for p in args.targets.split(",") if p]
    try:
        layers = parse_layers(args.layers)
    except ValueError as exc:
        raise UserError(f"--layers: {exc}") from None
    print_report(inspect_base(args.base, presets, layers, args.quantization, args.r))


def cmd_merge(args: argparse.Namespace) -> None:
    from .commands.merge import merge_adapter

    diff = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"wrote {args.out}: merged logits vs base+adapter max |Δ| {diff:.3g}")


def cmd_sft(args: argparse.Namespace) -> None:
    from .recipes.sft import run_sft
    from .schema.load import load_task

    run_sft(load_task(args.task, args.overrides), dry_run=args.dry_run, resume=args.resume)


def cmd_dpo(args: argparse.Namespace) -> None:
    from .recipes.dpo import continuation_task, run_dpo
    from .schema.load import load_task

    if is_override(args.task) and not args.task.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.task)  # `lmdiff-ft dpo train.lr=1e-4`: an override, not a task file
        args.task = None
    if args.task:
        task = load_task(args.task, args.overrides)
    else:
        task = continuation_task(args.overrides)
        print(
            f"continuing {task.adapter.init_adapter} (the newest finished SFT run with a preference_task) "
            f"with {task.source_path}"
        )
    run_dpo(task, dry_run=args.dry_run, resume=args.resume)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .commands.sweep import load_sweep, run_sweep
    from .commands.sweep_summary import write_summary

    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 1,2,3") from None
    sweep = load_sweep(args.sweep, args.grid, seeds)
    if args.summary_only:
        print(write_summary(sweep.output_dir, sweep.reference, list(sweep.cells)), end="")
        return 0
    return run_sweep(sweep)


def cmd_app(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    from .serve.app import serve

    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_new_tokens=args.max_new_tokens)
    serve(
        args.runs, args.host, args.port, args.share, args.base, args.quantization, args.data_dir, limits, args.max_queue
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from .commands.eval import evaluate_models
    from .schema.load import load_task

    results = evaluate_models(load_task(args.task, args.overrides), args.adapter)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    table = Table(title=f"evaluation on {args.task}")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key in dict.fromkeys(key for scores in results.values() for key in scores):  # "kept": adapters only
        table.add_row(key, *(f"{r[key]:.4f}" if key in r else "" for r in results.values()))
    Console().print(table)


def cmd_env(args: argparse.Namespace) -> None:
    from .commands.env import print_environment

    print_environment(as_json=args.json)


def add_training_command(commands, name: str, handler, help: str, task_help: str = "task YAML file") -> None:
    parser = commands.add_parser(name, help=help)
    optional = name == "dpo"  # with no task, DPO continues the newest finished SFT run
    parser.add_argument("task", nargs="?" if optional else None, help=task_help)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 adapter.r=32")
    parser.add_argument("--dry-run", action="store_true", help="check everything, preview trained tokens, exit")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the latest checkpoint in the output dir (or the given checkpoint dir)",
    )
    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdiff-ft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    add_training_command(commands, "sft", cmd_sft, "supervised fine-tuning of a LoRA adapter (TRL SFTTrainer)")
    add_training_command(
        commands,
        "dpo",
        cmd_dpo,
        "preference tuning (TRL DPOTrainer), reference = frozen adapter",
        "task YAML file (default: the DPO task of the newest finished SFT run under runs/, continuing it)",
    )

    sweep = commands.add_parser("sweep", help="a grid of task overrides × seeds, each an ordinary run (resumable)")
    sweep.add_argument("sweep", help="sweep YAML (tasks, cells, grid, seeds: docs/sweep.md), or a task YAML")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="add a grid axis (repeatable)")
    sweep.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3 (default: the sweep file's, else 42)")
    sweep.add_argument("--summary-only", action="store_true", help="rebuild the summary from the result files alone")
    sweep.set_defaults(handler=cmd_sweep)

    evaluate = commands.add_parser("eval", help="evaluate the base and adapters on a task's data, side by side")
    evaluate.add_argument("task", help="task YAML file (its data, template and eval settings are used)")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_samples=100")
    evaluate.add_argument("--adapter", action="append", default=[], help="adapter directory (repeatable)")
    evaluate.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    evaluate.set_defaults(handler=cmd_eval)

    convert = commands.add_parser(
        "convert", help="convert a Llama checkpoint (safetensors or GGUF) to LM-Diff (function-preserving)"
    )
    convert.add_argument("src", help="Llama checkpoint directory, a .gguf file, or a Hub id where there is network")
    convert.add_argument("--gguf-file", help="the GGUF file to convert inside SRC (a directory or a Hub id)")
    convert.add_argument("out", help="output directory (must not exist or be empty)")
    convert.add_argument("--drop-unknown", action="store_true", help="convert even if the source has non-Llama tensors")
    convert.add_argument("--tolerance", type=float, default=1e-4, help="max |Δlogits| allowed on the probe batch")
    convert.set_defaults(handler=cmd_convert)

    tiny = commands.add_parser("tiny-base", help="build a small random LM-Diff base + tokenizer locally")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--from-llama", action="store_true", help="build a tiny Llama and convert it")
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(handler=cmd_tiny_base)

    inspect = commands.add_parser("inspect", help="trainable parameters per preset and the base's memory footprint")
    inspect.add_argument("base", help=f"{NAMED_BASES}, an LM-Diff checkpoint directory or a Hub id")
    inspect.add_argument("--targets", default=",".join(ADAPTER_DEFAULTS.presets), help="comma-separated presets")
    inspect.add_argument("--layers", help="layer selection, e.g. 12-21 or 0,2,5-7")
    inspect.add_argument("--quantization", default="auto", choices=QUANTIZATIONS)
    inspect.add_argument("-r", type=int, default=ADAPTER_DEFAULTS.r, help="LoRA rank (alpha = 2 r)")
    inspect.set_defaults(handler=cmd_inspect)

    merge = commands.add_parser("merge", help="merge an adapter into a full-precision copy of its base")
    merge.add_argument("base")
    merge.add_argument("adapter")
    merge.add_argument("out")
    merge.add_argument("--dtype", default="float32", choices=[d for d in get_args(Dtype) if d != "auto"])
    merge.set_defaults(handler=cmd_merge)

    app = commands.add_parser("app", help="compare the base and adapters side by side in the browser (Gradio)")
    app.add_argument("runs", nargs="*", default=["runs"], help="run dirs, or dirs of runs (default: runs)")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    app.add_argument("--base", help="the base to serve (default: the one the first run was trained on)")
    app.add_argument("--quantization", choices=QUANTIZATIONS, help="default: the task's")
    app.add_argument("--data-dir", default="runs/app", help="where votes.jsonl is written (default: runs/app)")
    limits = DEFAULT_LIMITS
    app.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens, help="cap on new tokens per column")
    app.add_argument("--max-prompt-chars", type=int, default=limits.max_prompt_chars, help="cap on the prompt's length")
    app.add_argument(
        "--max-queue", type=int, default=QUEUE_SIZE, help="requests that may wait; more are refused (queue full)"
    )
    app.set_defaults(handler=cmd_app)

    env = commands.add_parser("env", help="versions, devices and whether 4-bit works here (for bug reports)")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(handler=cmd_env)
    return parser


def is_override(value: object) -> bool:
    """`key=value` that names no existing path: an override, wherever it stands (after options too, or where an
    option's optional value or DPO's optional task could go)."""
    return isinstance(value, str) and "=" in value and not value.startswith("-") and not Path(value).exists()


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues a stopped run: the same task and overrides, with --resume (the newest checkpoint)."""
    return shlex.join(["lmdiff-ft", args.command, *([args.task] if args.task else []), *args.overrides, "--resume"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for line in untested_versions():
        print(f"lmdiff-ft: warning: {line}", file=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if is_override(getattr(args, "resume", None)):  # `--resume train.lr=1e-3`: resume the latest, and override
        args.overrides.insert(0, args.resume)
        args.resume = True
    # `key=value` overrides may come after options too (`sft task.yaml --dry-run train.lr=1e-4`)
    if extra and hasattr(args, "overrides") and all(is_override(e) for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.handler(args)
    except UserError as exc:
        print(f"lmdiff-ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # SIGTERM/SIGINT: a checkpoint was written; say how to continue
        from .recipes.common import is_main_process

        if is_main_process():
            print(f"{exc}; continue with `{resume_command(args)}`", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"lmdiff-ft {args.command}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
