"""The `cpm2` console script: one entry point, one sub-command module each.

Each module in `_SUBCOMMAND_MODULES` defines `register(subparsers)`, which adds its
sub-command(s) and sets `func` on the parser defaults. A `UsageError` (or any
`CPM2Error`) raised by a command prints as one clear line and exits with status 2,
never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from cpm2_jax.errors import CPM2Error

# One line per sub-command module; add yours here.
_SUBCOMMAND_MODULES = [
    "cpm2_jax.commands.params",
    "cpm2_jax.commands.infer",
    "cpm2_jax.commands.convert",
    "cpm2_jax.commands.train",
    "cpm2_jax.commands.eval",
    "cpm2_jax.commands.demo",
    "cpm2_jax.commands.offload",
    "cpm2_jax.commands.teacher_topk",
    "cpm2_jax.commands.doctor",
    "cpm2_jax.tasks.commands",
]


class _Parser(argparse.ArgumentParser):
    """argparse with flag errors (a typo, a missing value, a value that does not parse) as one
    line and exit status 2, like every other bad input: no usage block before it (`--help`
    prints that). Subcommand parsers are made of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpm2", description="CPM-2 in JAX/Flax: t5x-style tools for the dense and MoE models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cpm2_jax.tf_import import default_jax_platforms, quiet_tensorflow_on_import

    default_jax_platforms()
    quiet_tensorflow_on_import()
    from cpm2_jax.gin_utils import split_gin_dot_flags

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, dot_bindings = split_gin_dot_flags(argv)
    except CPM2Error as err:
        print(f"cpm2: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if dot_bindings:
        if not hasattr(args, "gin_bindings"):
            print(f"cpm2 {args.command}: error: --gin.NAME=value flags are not accepted here", file=sys.stderr)
            return 2
        args.gin_bindings = list(args.gin_bindings) + dot_bindings
    try:
        result = args.func(args)
    except CPM2Error as err:
        print(f"cpm2 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cpm2 {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
