"""Evaluate DAWN renders: metrics table (JSON + markdown), per-video plots, MLflow run.

Held-out test split:  python jobs/evaluate.py --shards SHARDS --checkpoints CKPT --out eval/
A manifest:           python jobs/evaluate.py --manifest renders.csv --checkpoints CKPT --out eval/
Rendered mp4s:        python jobs/evaluate.py --videos renders/ [--reference ground_truth/] --out eval/
Paper metrics need weight files: --inception (FID, DR), --i3d (FVD16/32), --syncnet (LSE-C/D), --arcface (CSIM).
See dawn/evaluation.py for what is measured.
"""

import argparse
import sys

from dawn import DawnError
from dawn.evaluation import add_arguments, run_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except DawnError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
