"""Train a PBNet pose or blink model (paper §3.4, A.2) with Ray Train + DeepSpeed, tracked in MLflow.

On a cluster:  ray job submit --working-dir . -- python jobs/train_pbnet.py --kind pose --data SHARDS \
                   --preset hdtf128 --num-workers 4 --use-gpu --export-dir ckpt/
Locally:       python jobs/train_pbnet.py --kind blink --data shards/ --preset tiny --steps 200
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
    parser.add_argument("--kind", required=True, choices=("pose", "blink"), help="which PBNet to train")
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from dawn.train.loop import run_training

        summary = run_training(from_arguments(args, f"pbnet_{args.kind}"), address=args.address,
                               num_cpus=args.num_cpus)
    except DawnError as error:
        print(f"train_pbnet: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
