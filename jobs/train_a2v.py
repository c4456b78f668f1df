"""Train A2V-FDM (paper §3.3, two-stage curriculum §3.5) with Ray Train + DeepSpeed, tracked in MLflow.

On a cluster:  ray job submit --working-dir . -- python jobs/train_a2v.py --stage 1 --data SHARDS \
                   --preset hdtf128 --lfg ckpt/ --num-workers 8 --use-gpu --export-dir ckpt-s1/
               ray job submit --working-dir . -- python jobs/train_a2v.py --stage 2 --data SHARDS \
                   --preset hdtf128 --lfg ckpt/ --init-from ckpt-s1/ --num-workers 8 --use-gpu --export-dir ckpt/
Locally:       python jobs/train_a2v.py --stage 1 --data shards/ --preset tiny --lfg ckpt/ --steps 200
(RAY_ADDRESS set: join that cluster; otherwise a local Ray starts). --lfg is the frozen, trained LFG that
makes the targets; the export also gets a copy of it when the export folder has none. Rerun with the same
--storage-path and --run-name to resume from the last checkpoint.
"""

import argparse
import json
import sys

from dawn import DawnError
from dawn.train.config import add_arguments, from_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, model_flags=("stage", "lfg"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from dawn.train.loop import run_training

        summary = run_training(from_arguments(args, "a2v"), address=args.address, num_cpus=args.num_cpus)
    except DawnError as error:
        print(f"train_a2v: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
