"""The `lmdiff-ft` command: a thin layer over library functions. User mistakes print one line, exit 2."""

import argparse
import sys

from .errors import UserError


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    report = convert_checkpoint(args.src, args.out, drop_unknown=args.drop_unknown, tolerance=args.tolerance)
    diff = report.max_abs_logit_diff
    print(f"wrote {args.out}: {report.num_parameters:,} parameters, max |Δlogits| vs source {diff:.3g}")
    if report.dropped_tensors:
        print(f"dropped {len(report.dropped_tensors)} non-Llama tensors: {', '.join(report.dropped_tensors)}")


def cmd_tiny_base(args: argparse.Namespace) -> None:
    from .tiny import build_tiny_base

    out = build_tiny_base(args.out, seed=args.seed, from_llama=args.from_llama, overwrite=args.overwrite)
    print(f"wrote tiny {'Llama-converted ' if args.from_llama else ''}LM-Diff base to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdiff-ft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a Llama checkpoint to LM-Diff (function-preserving)")
    convert.add_argument("src", help="Llama checkpoint directory, or a Hub id where there is network")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as exc:
        print(f"lmdiff-ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmdiff-ft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
