"""Preprocessing throughput by stage: seconds of video processed per CPU-second, on synthetic videos.

    python bench/preprocess.py [--videos 3] [--seconds 8] [--size 256] [--resolution 128] [--hubert-preset large]

One process, one torch thread (like a 1-CPU actor of the preprocessing job). CPU time is the process's
(all threads, time.process_time). Stages: decode (decord + crop/resize), face (crop-box detection +
mediapipe tracking and measures), audio (PyAV decode + HuBERT; a randomly initialised model of the chosen
architecture, so the cost is real), write (row encoding + zstd Parquet).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic source videos")
    parser.add_argument("--resolution", type=int, default=128, help="crop side stored in the shards")
    parser.add_argument("--hubert-preset", default="large", choices=["large", "tiny"])
    args = parser.parse_args()

    from dawn.audio import HubertFeatureExtractor, save_random_hubert
    from dawn.data.preprocess import cpu_timer, preprocess_video, write_shard
    from dawn.data.synth import generate_corpus

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dawn-bench-preprocess-") as work:
        work = Path(work)
        videos = generate_corpus(work / "corpus", args.videos, args.seconds, seed=0, size=args.size, workers=2,
                                 progress=False)
        hubert = HubertFeatureExtractor(save_random_hubert(work / "hubert", preset=args.hubert_preset))
        timings, video_seconds, wall = {}, 0.0, 0.0
        for path in videos:
            started = time.perf_counter()
            rows = preprocess_video(path, args.resolution, hubert, timings=timings)
            with cpu_timer(timings, "write"):
                write_shard(rows, work / "shards" / f"{path.stem}.parquet")
            wall += time.perf_counter() - started
            video_seconds += sum(row["num_frames"] for row in rows) / 25

    print(f"preprocess: {len(videos)} synthetic videos, {video_seconds:.1f} s of video at {args.size} px -> "
          f"{args.resolution} px crops, HuBERT {args.hubert_preset} (random weights), 1 torch thread")
    print(f"{'stage':<8} {'CPU s':>8} {'video s / CPU s':>16} {'share':>7}")
    total = sum(timings.values())
    for stage in ("decode", "face", "audio", "write"):
        print(f"{stage:<8} {timings[stage]:8.2f} {video_seconds / timings[stage]:16.2f} {timings[stage] / total:7.1%}")
    print(f"{'total':<8} {total:8.2f} {video_seconds / total:16.2f} {1:7.1%}")
    print(f"wall {wall:.2f} s ({video_seconds / wall:.2f} video s / s; depends on the load of the machine)")


if __name__ == "__main__":
    main()
