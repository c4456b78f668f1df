"""Preprocess a video corpus into Parquet shards (docs/data_schema.md) with Ray Data: `dawn preprocess`.

On a cluster:  ray job submit --working-dir . -- python jobs/preprocess.py --input DIR_OR_MANIFEST \
                   --output SHARDS --resolution 128 --hubert HUBERT_DIR
Locally:       python jobs/preprocess.py --input corpus/ --output shards/ --hubert ckpt/hubert --num-cpus 2
Under `ray job submit` the script runs in a copy of the working dir: give absolute paths that every node
sees (shared filesystem), or the shards land in that temporary copy.
"""
import sys

from dawn.cli import main

COMMAND = ["preprocess"]  # `python jobs/preprocess.py ARGS` = `dawn preprocess ARGS`

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
