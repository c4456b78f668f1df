"""The `dawn` command. Each subcommand lives next to the code it runs: a module listed in COMMAND_MODULES
defines `register_cli(subparsers)` adding its subcommands, each with `func=...` taking the parsed args."""

from __future__ import annotations

import argparse
import importlib
import sys

from dawn import DawnError

COMMAND_MODULES = [
    "dawn.models.summary",  # dawn models
    "dawn.render",  # dawn render, dawn init-checkpoints
    "dawn.batch_render",  # dawn batch-render
    "dawn.data.synth",  # dawn synth-corpus
    "dawn.data.preprocess_job",  # dawn preprocess
    "dawn.train.command",  # dawn train lfg|pbnet|a2v
    "dawn.serve.command",  # dawn serve
    "dawn.evaluation",  # dawn evaluate
    "dawn.demo",  # dawn demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dawn", description="Train and serve DAWN talking-head diffusion: "
                                     "preprocess, train, render, serve, evaluate.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not written yet
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DawnError as e:
        print(f"dawn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
