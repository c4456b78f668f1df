"""Train A2V-FDM (paper §3.3, curriculum §3.5) with Ray Train + DeepSpeed: `dawn train a2v`.

On a cluster:  ray job submit --working-dir . -- python jobs/train_a2v.py --stage 1 --data SHARDS \
                   --preset hdtf128 --lfg ckpt/ --num-workers 8 --use-gpu --export-dir ckpt-s1/
               ray job submit --working-dir . -- python jobs/train_a2v.py --stage 2 --data SHARDS \
                   --preset hdtf128 --lfg ckpt/ --init-from ckpt-s1/ --num-workers 8 --use-gpu --export-dir ckpt/
Locally:       python jobs/train_a2v.py --stage 1 --data shards/ --preset tiny --lfg ckpt/ --steps 200
--lfg is the frozen, trained LFG that makes the targets; the export also gets a copy of it when the export
folder has none.
"""
import sys

from dawn.cli import main

COMMAND = ["train", "a2v"]  # `python jobs/train_a2v.py ARGS` = `dawn train a2v ARGS`

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
