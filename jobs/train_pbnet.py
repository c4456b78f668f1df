"""Train a PBNet pose or blink model (paper §3.4, A.2) with Ray Train + DeepSpeed: `dawn train pbnet`.

On a cluster:  ray job submit --working-dir . -- python jobs/train_pbnet.py --kind pose --data SHARDS \
                   --preset hdtf128 --num-workers 4 --use-gpu --export-dir ckpt/
Locally:       python jobs/train_pbnet.py --kind blink --data shards/ --preset tiny --steps 200
"""
import sys

from dawn.cli import main

COMMAND = ["train", "pbnet"]  # `python jobs/train_pbnet.py ARGS` = `dawn train pbnet ARGS`

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
