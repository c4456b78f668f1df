"""Evaluate DAWN renders (metrics table, per-video plots, MLflow run): `dawn evaluate`.

Held-out test split:  python jobs/evaluate.py --shards SHARDS --checkpoints CKPT --out eval/
A manifest:           python jobs/evaluate.py --manifest renders.csv --checkpoints CKPT --out eval/
Rendered mp4s:        python jobs/evaluate.py --videos renders/ [--reference ground_truth/] --out eval/
Paper metrics need weight files: --inception (FID, DR), --i3d (FVD16/32), --syncnet (LSE-C/D), --arcface (CSIM).
"""
import sys

from dawn.cli import main

COMMAND = ["evaluate"]  # `python jobs/evaluate.py ARGS` = `dawn evaluate ARGS`

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
