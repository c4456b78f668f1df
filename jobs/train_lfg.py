"""Train the Latent Flow Generator (paper §3.2) with Ray Train + DeepSpeed, tracked in MLflow: `dawn train lfg`.

On a cluster:  ray job submit --working-dir . -- python jobs/train_lfg.py --data SHARDS --preset hdtf128 \
                   --num-workers 8 --use-gpu --vgg19 vgg19.pth --export-dir ckpt/
Locally:       python jobs/train_lfg.py --data shards/ --preset tiny --steps 200 --num-workers 2
"""
import sys

from dawn.cli import main

COMMAND = ["train", "lfg"]  # `python jobs/train_lfg.py ARGS` = `dawn train lfg ARGS`

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
