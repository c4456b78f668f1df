"""Train the Latent Flow Generator (paper §3.2) with Ray Train + DeepSpeed, tracked in MLflow.

On a cluster:  ray job submit --working-dir . -- python jobs/train_lfg.py --data SHARDS --preset hdtf128 \
                   --num-workers 8 --use-gpu --vgg19 vgg19.pth --export-dir ckpt/
Locally:       python jobs/train_lfg.py --data shards/ --preset tiny --steps 200 --num-workers 2
(RAY_ADDRESS set: join that cluster; otherwise a local Ray starts). Rerun with the same --storage-path and
--run-name to resume from the last checkpoint.
"""

import argparse
import json
import sys

from dawn import DawnError
from dawn.train.config import add_arguments, from_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, model_flags=("vgg19",))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from dawn.train.loop import run_training

        summary = run_training(from_arguments(args, "lfg"), address=args.address, num_cpus=args.num_cpus)
    except DawnError as error:
        print(f"train_lfg: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
