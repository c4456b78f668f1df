"""Render every row of a manifest (id, portrait, audio[, pose_video][, seed]) with Ray Data: `dawn batch-render`.

On a cluster:  ray job submit --working-dir . -- python jobs/batch_render.py --manifest /data/batch.csv \
                   --checkpoints /data/checkpoints/hdtf256 --output /data/renders/batch --use-gpu --a2v-actors 4
Locally:       python jobs/batch_render.py --manifest batch.csv --checkpoints ckpt --output out --num-cpus 2
Writes <output>/<id>.mp4 and results.csv / results.parquet (id, status, seconds, error, output). Rerunning
skips rows whose mp4 exists. Exit status 1 when any row failed.
"""
import sys

from dawn.cli import main

COMMAND = ["batch-render"]  # `python jobs/batch_render.py ARGS` = `dawn batch-render ARGS`

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
