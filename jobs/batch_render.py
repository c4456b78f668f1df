"""Render every row of a manifest (id, portrait, audio[, pose_video][, seed]) to an mp4 with Ray Data.

On a cluster:  ray job submit --working-dir . -- python jobs/batch_render.py --manifest /shared/batch.csv \
                   --checkpoints /shared/checkpoints/hdtf256 --output /shared/renders/batch --use-gpu --a2v-actors 4
Locally:       python jobs/batch_render.py --manifest batch.csv --checkpoints ckpt --output out --num-cpus 2
Writes <output>/<id>.mp4 and results.csv / results.parquet (id, status, seconds, error, output). Rerunning
skips rows whose mp4 exists. Exit status 1 when any row failed.
"""

import argparse
import sys
from pathlib import Path

from dawn import DawnError
from dawn.batch_render import run_batch_render
from dawn.pipeline import SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="CSV or JSONL: id, portrait, audio[, pose_video][, seed]")
    parser.add_argument("--checkpoints", required=True, help="dawn checkpoint directory")
    parser.add_argument("--output", required=True, help="folder for <id>.mp4 and results.csv/.parquet")
    parser.add_argument("--hubert", help="HuBERT model folder (default: CHECKPOINTS/hubert)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--eta", type=float, default=1.0,
                        help="DDIM eta: 1 (default, the reference's stochastic DDIM) to 0 (deterministic)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (local runs only)")
    parser.add_argument("--features-actors", type=int, default=1, help="image/audio/HuBERT actors")
    parser.add_argument("--pbnet-actors", type=int, default=1)
    parser.add_argument("--a2v-actors", type=int, default=1, help="A2V-FDM + LFG decode actors")
    parser.add_argument("--writer-actors", type=int, default=1, help="mp4 encoding actors")
    parser.add_argument("--a2v-batch", type=int, default=4, help="rows per A2V-FDM batch (equal lengths share a pass)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per A2V-FDM actor")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--cpus-per-actor", type=float, help="CPUs reserved per actor (default: fit all actors)")
    parser.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run_batch_render(
            args.manifest, args.checkpoints, args.output, steps=args.steps, hubert=args.hubert,
            address=args.address, num_cpus=args.num_cpus, features_actors=args.features_actors,
            pbnet_actors=args.pbnet_actors, a2v_actors=args.a2v_actors, writer_actors=args.writer_actors,
            a2v_batch=args.a2v_batch, use_gpu=args.use_gpu, dtype=args.dtype,
            cpus_per_actor=args.cpus_per_actor, show_progress=not args.no_progress, eta=args.eta,
            sampler=args.sampler)
    except DawnError as e:
        print(f"batch_render: error: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    print(f"{counts['done']} rendered, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
          f"results in {Path(args.output) / 'results.csv'}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
