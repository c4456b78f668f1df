"""Render every row of a manifest (id, portrait, audio[, pose_video][, seed]) to an mp4 with Ray Data.

On a cluster:  ray job submit --working-dir . -- python jobs/batch_render.py --manifest /shared/batch.csv \
                   --checkpoints /shared/checkpoints/hdtf256 --output /shared/renders/batch --use-gpu --a2v-actors 4
Locally:       python jobs/batch_render.py --manifest batch.csv --checkpoints ckpt --output out --num-cpus 2
               (or: dawn batch-render --manifest batch.csv --checkpoints ckpt --output out)
Writes <output>/<id>.mp4 and results.csv / results.parquet (id, status, seconds, error, output). Rerunning
skips rows whose mp4 exists. Exit status 1 when any row failed.
"""

import argparse
import sys

from dawn import DawnError
from dawn.batch_render import add_arguments, run_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except DawnError as e:
        print(f"batch_render: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
