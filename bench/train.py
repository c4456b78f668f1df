"""Training throughput: samples per second per worker for LFG, PBNet and A2V-FDM, by preset and worker count.

    python bench/train.py [--presets tiny hdtf128] [--models lfg pbnet_pose a2v] [--steps 3] [--threads 1]
                          [--ray-workers 1 2] [--ray-steps 8] [--ray-preset tiny]

Part 1, per worker: the objective's real training step (forward, backward, AdamW) in one process with plain
torch (`dawn.train.objective.TorchEngine`, no Ray, no DeepSpeed), on toy shards (`dawn.train.toy_shards`) at
the preset's resolution, randomly initialised networks, `--threads` torch threads. Reported as samples per
wall second and per CPU second (the process's CPU time; on a shared machine only the latter is stable).
Part 2, the full loop: `run_training` (Ray Train + DeepSpeed ZeRO-2 + MLflow) with 1 and 2 CPU workers on
the `--ray-preset`; per worker, the medians of the logged `samples_per_s_per_worker` and
`samples_per_cpu_s_per_worker` after the first step (which includes start-up). Ray runs its workers at
nice 15: on a machine shared with other work the wall-clock figure mostly measures that contention.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BATCH = {"lfg": 4, "pbnet_pose": 8, "pbnet_blink": 8, "a2v": 2}  # per worker and step


def plain_torch_throughput(model: str, preset: str, shards: Path, lfg_dir: Path | None, steps: int) -> dict:
    from dawn.data.readers import iter_shard_rows
    from dawn.train.config import TrainConfig
    from dawn.train.loop import build_objective
    from dawn.train.objective import torch_engines

    torch.manual_seed(0)
    config = TrainConfig(model=model, data=str(shards), preset=preset, batch_size=BATCH[model],
                         lfg=str(lfg_dir) if model == "a2v" else None)
    objective = build_objective(config, "cpu")
    engines = torch_engines(objective)
    rows = iter_shard_rows(shards, split="train", columns=list(objective.data_columns))
    batch = next(iter(objective.batches(rows, np.random.default_rng(0))))
    objective.train_step(engines, batch, 0)  # warm-up (allocations, first-call costs)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        objective.train_step(engines, batch, step + 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = steps * config.batch_size
    params = sum(p.numel() for m in objective.trainable.values() for p in m.parameters())
    return {"samples_per_s": samples / wall, "samples_per_cpu_s": samples / cpu, "params": params}


def ray_throughput(model: str, preset: str, shards: Path, lfg_dir: Path | None, workers: int, steps: int,
                   storage: Path) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from dawn.train.config import TrainConfig
    from dawn.train.loop import run_training

    config = TrainConfig(model=model, data=str(shards), preset=preset, batch_size=BATCH[model], steps=steps,
                         num_workers=workers, storage_path=str(storage), run_name=f"{model}-{preset}-{workers}w",
                         checkpoint_every=steps, log_every=1, sample_every=0, max_failures=0,
                         samples_per_row=BATCH[model],  # each worker holds one toy video: a batch per row
                         lfg=str(lfg_dir) if model == "a2v" else None)
    summary = run_training(config)
    client = MlflowClient(summary["mlflow_uri"])

    def median(key):
        return statistics.median(m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)
                                 if m.step > 1)

    return median("samples_per_s_per_worker"), median("samples_per_cpu_s_per_worker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "hdtf128"])
    parser.add_argument("--models", nargs="+", default=["lfg", "pbnet_pose", "a2v"])
    parser.add_argument("--steps", type=int, default=3, help="timed plain-torch steps per model and preset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the plain-torch part")
    parser.add_argument("--ray-workers", nargs="*", type=int, default=[1, 2], help="empty: skip the Ray part")
    parser.add_argument("--ray-steps", type=int, default=8)
    parser.add_argument("--ray-preset", default="tiny")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from dawn.checkpoint import save_model
    from dawn.models.lfg import LFG, LFGConfig
    from dawn.train.toy_shards import write_toy_shards

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dawn-bench-train-") as work:
        work = Path(work)
        resolution = {"tiny": 64, "hdtf128": 128, "hdtf256": 256}
        shards, lfg_dirs = {}, {}
        for preset in set(args.presets) | ({args.ray_preset} if args.ray_workers else set()):
            shards[preset] = write_toy_shards(work / f"shards-{preset}", videos=3, frames=60,
                                              resolution=resolution[preset], test_videos=1)
            save_model(LFG(LFGConfig.preset(preset)), work / f"lfg-{preset}", "lfg")
            lfg_dirs[preset] = work / f"lfg-{preset}"

        print(f"train: plain torch, 1 process, {args.threads} torch thread(s), CPU, fp32, random weights, "
              f"toy shards; {args.steps} timed steps after 1 warm-up")
        print(f"{'model':<11} {'preset':<8} {'params':>11} {'batch':>5} {'samples/s':>10} {'samples/CPU-s':>14}")
        for preset in args.presets:
            for model in args.models:
                r = plain_torch_throughput(model, preset, shards[preset], lfg_dirs[preset], args.steps)
                print(f"{model:<11} {preset:<8} {r['params']:>11,} {BATCH[model]:>5} {r['samples_per_s']:>10.3f} "
                      f"{r['samples_per_cpu_s']:>14.3f}", flush=True)

        if args.ray_workers:
            import ray

            ray.init(address="local", num_cpus=max(args.ray_workers) + 2, include_dashboard=False,
                     log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            print(f"\ntrain: run_training (Ray Train V2 + DeepSpeed ZeRO-2 + MLflow), CPU workers, preset "
                  f"{args.ray_preset}, {args.ray_steps} steps; per worker, median after step 1: "
                  f"samples/s | samples per CPU-s (rank 0)")
            print(f"{'model':<11} " + " ".join(f"{f'{w} worker(s)':>20}" for w in args.ray_workers))
            for model in args.models:
                rates = [ray_throughput(model, args.ray_preset, shards[args.ray_preset], lfg_dirs[args.ray_preset],
                                        workers, args.ray_steps, work / "runs") for workers in args.ray_workers]
                print(f"{model:<11} " + " ".join(f"{f'{wall:.3f} | {cpu:.3f}':>20}" for wall, cpu in rates),
                      flush=True)
            ray.shutdown()


if __name__ == "__main__":
    main()
