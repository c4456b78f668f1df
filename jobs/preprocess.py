"""Preprocess a video corpus into Parquet shards (docs/data_schema.md) with Ray Data.

On a cluster:  ray job submit --working-dir . -- python jobs/preprocess.py --input DIR_OR_MANIFEST \
                   --output SHARDS --resolution 128 --hubert HUBERT_DIR
Locally:       python jobs/preprocess.py --input corpus/ --output shards/ --hubert ckpt/hubert --num-cpus 2
(under `ray job submit` RAY_ADDRESS is set and the job joins that cluster; otherwise a local Ray starts).
Under `ray job submit` the script runs in a copy of the working dir: give absolute paths that every node
sees (shared filesystem), or the shards land in that temporary copy.
"""

import argparse
import sys

from dawn import DawnError
from dawn.data.preprocess import MAX_MISSING_FACE, SEGMENT_FRAMES
from dawn.data.preprocess_job import PreprocessSettings, run_preprocess


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder of videos or a .csv/.jsonl manifest (path, identity)")
    parser.add_argument("--output", required=True, help="shards folder (index.json, failures.parquet, shards/)")
    parser.add_argument("--hubert", required=True,
                        help="HuBERT model folder (save_pretrained of facebook/hubert-large-ls960-ft)")
    parser.add_argument("--resolution", type=int, default=128, help="face crop side in pixels (128 or 256)")
    parser.add_argument("--segment-frames", type=int, default=SEGMENT_FRAMES, help="max frames per shard row")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of identities in the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the identity split")
    parser.add_argument("--max-missing-face", type=float, default=MAX_MISSING_FACE,
                        help="reject a video when no face is found in more than this fraction of its frames")
    parser.add_argument("--max-actors", type=int, default=None, help="preprocessing actors (default: cluster CPUs)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (local runs only)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resolution % 4 or args.resolution < 16:
        parser.error("--resolution must be a multiple of 4 (128 or 256)")
    settings = PreprocessSettings(resolution=args.resolution, segment_frames=args.segment_frames,
                                  test_fraction=args.test_fraction, seed=args.seed,
                                  max_missing_face=args.max_missing_face)
    try:
        run_preprocess(args.input, args.output, args.hubert, settings, max_actors=args.max_actors,
                       address=args.address, num_cpus=args.num_cpus)
    except DawnError as error:
        print(f"preprocess: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
