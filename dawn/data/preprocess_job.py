"""The Ray side of the data: the preprocessing job (Ray Data over a corpus) and reading its shards back.

    videos ─ from_items ─▶ map_batches(VideoPreprocessor actor pool: HuBERT loaded once per actor,
                            preprocess_video + write_shard per video) ─▶ small result records ─▶ driver:
                            failures.parquet, index.json, summary

Actors write the shards themselves (atomic), so only a few bytes per video travel back to the driver. On a
multi-node cluster the output directory must be a filesystem every node can write (NFS, a mounted bucket).
A rerun skips videos that already have a shard or are listed in failures.parquet, so it does no new work.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dawn import RAY_CLUSTER_HELP, DawnError
from dawn.checkpoint import atomic_write_bytes
from dawn.config import FPS, SAMPLE_RATE
from dawn.data.preprocess import (MAX_MISSING_FACE, SEGMENT_FRAMES, PreprocessError, VideoItem, assign_split,
                                  list_videos, preprocess_video, write_shard)

FAILURES_SCHEMA = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("stage", pa.string()),
                             ("reason", pa.string())])
RESULT_FIELDS = ("video_id", "status", "frames", "stage", "reason", "seconds")
WORKER_CRASH_RETRIES = 1  # a video whose worker process dies is tried again this many times, then recorded


@dataclass
class PreprocessSettings:
    """What shapes the shards; a rerun into the same output must use the same values (saved in index.json)."""

    resolution: int = 128
    segment_frames: int = SEGMENT_FRAMES
    test_fraction: float = 0.1
    seed: int = 0
    max_missing_face: float = MAX_MISSING_FACE


@dataclass
class PreprocessSummary:
    videos: int  # listed in the input
    skipped: int  # already done (shard) or already failed in an earlier run
    processed: int  # attempted in this run
    succeeded: int
    failed: int
    frames: int  # 25 fps frames in the shards written by this run

    def __str__(self) -> str:
        return (f"{self.videos} videos: {self.skipped} already done, {self.processed} processed "
                f"({self.succeeded} ok, {self.failed} failed), {self.frames} frames "
                f"({self.frames / 25 / 60:.1f} min) written")


def shard_path(output: str | Path, video_id: str) -> Path:
    return Path(output) / "shards" / f"{video_id}.parquet"


class VideoPreprocessor:
    """Ray Data actor: loads HuBERT once, then preprocesses one video per item and writes its shard.

    Input batch columns: video_id, path, identity, split. Output: one result record per video
    (RESULT_FIELDS); failures are recorded, never raised.
    """

    def __init__(self, output: str, hubert_dir: str, settings: dict, device: str = "cpu"):
        from dawn.audio import HubertFeatureExtractor

        self.output, self.settings = Path(output), PreprocessSettings(**settings)
        self.hubert = HubertFeatureExtractor(hubert_dir, device=device)

    def __call__(self, batch: dict) -> dict:
        results = {name: [] for name in RESULT_FIELDS}
        for video_id, path, identity, split in zip(batch["video_id"], batch["path"], batch["identity"],
                                                   batch["split"]):
            result = self.process(str(video_id), str(path), str(identity), str(split))
            for name in RESULT_FIELDS:
                results[name].append(result[name])
        return {name: np.array(values) for name, values in results.items()}

    def process(self, video_id: str, path: str, identity: str, split: str) -> dict:
        started = time.perf_counter()
        result = {"video_id": video_id, "status": "ok", "frames": 0, "stage": "", "reason": ""}
        try:
            rows = preprocess_video(path, self.settings.resolution, self.hubert, video_id=video_id,
                                    identity=identity, split=split, segment_frames=self.settings.segment_frames,
                                    max_missing_face=self.settings.max_missing_face)
            write_shard(rows, shard_path(self.output, video_id))
            result["frames"] = sum(row["num_frames"] for row in rows)
        except PreprocessError as error:
            result.update(status="failed", stage=error.stage, reason=str(error))
        except Exception as error:  # an unexpected bug on one video must not stop the corpus
            result.update(status="failed", stage="error",
                          reason=f"{type(error).__name__}: {error} ({_last_frame(error)})")
        result["seconds"] = time.perf_counter() - started
        return result


def _last_frame(error: Exception) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus)


def run_preprocess(input: str | Path, output: str | Path, hubert_dir: str | Path,
                   settings: PreprocessSettings | None = None, max_actors: int | None = None,
                   address: str | None = None, num_cpus: int | None = None, verbose: bool = True) -> PreprocessSummary:
    """Preprocess every video of `input` (a folder or a manifest, see list_videos) into `output`.

    Connects to / starts Ray only when there is work. Actors: 1 CPU each, up to `max_actors` (default: the
    cluster's CPUs); when the cluster has GPUs the actors share them for HuBERT. Returns the run's summary
    after writing output/failures.parquet and output/index.json (both atomically).
    """
    settings = settings or PreprocessSettings()
    output = Path(output)
    if not Path(hubert_dir).is_dir():
        raise DawnError(f"HuBERT model folder not found: {hubert_dir} (see `dawn.audio.save_random_hubert` or a "
                        f"save_pretrained copy of facebook/hubert-large-ls960-ft)")
    _check_settings(output, settings)
    videos = list_videos(input)
    if not videos:
        raise DawnError(f"no videos found in {input} (extensions: .mp4 .mov .mkv .avi .flv)")
    failures = _read_failures(output)
    done = {v.video_id for v in videos if shard_path(output, v.video_id).is_file() or v.video_id in failures}
    todo = [v for v in videos if v.video_id not in done]
    log = print if verbose else (lambda *a, **k: None)
    log(f"preprocess: {len(videos)} videos in {input}, {len(done)} already done, {len(todo)} to process")
    results = _run_actors(todo, output, Path(hubert_dir), settings, max_actors, address, num_cpus, log) if todo else []
    by_id = {v.video_id: v for v in videos}
    for result in results:
        if result["status"] != "ok":
            failures[result["video_id"]] = {"video_id": result["video_id"], "path": by_id[result["video_id"]].path,
                                            "stage": result["stage"], "reason": result["reason"]}
    if results or not (output / "index.json").is_file():
        _write_failures(output, failures)
        _write_index(output, settings, failures)
    ok = [r for r in results if r["status"] == "ok"]
    summary = PreprocessSummary(videos=len(videos), skipped=len(done), processed=len(results), succeeded=len(ok),
                                failed=len(results) - len(ok), frames=sum(int(r["frames"]) for r in ok))
    log(f"preprocess: {summary}")
    for result in results:
        if result["status"] != "ok":
            log(f"  failed {result['video_id']} [{result['stage']}]: {result['reason']}")
    return summary


def _run_actors(todo: list[VideoItem], output: Path, hubert_dir: Path, settings: PreprocessSettings,
                max_actors: int | None, address: str | None, num_cpus: int | None, log) -> list[dict]:
    import ray

    connect_ray(address, num_cpus)
    resources = ray.cluster_resources()
    max_actors = max(1, min(len(todo), max_actors or int(resources.get("CPU", 1))))
    gpus = resources.get("GPU", 0)
    gpu_share = min(1.0, gpus / max_actors) if gpus else 0
    (output / "shards").mkdir(parents=True, exist_ok=True)
    items = [{"video_id": v.video_id, "path": v.path, "identity": v.identity,
              "split": assign_split(v.identity, settings.test_fraction, settings.seed)} for v in todo]
    context = ray.data.DataContext.get_current()
    tolerated = context.max_errored_blocks
    context.max_errored_blocks = -1  # one block per video: a worker that dies loses that video only
    try:
        with warnings.catch_warnings():
            # the retry count has no named parameter yet, only the deprecated ray_remote_args route
            warnings.filterwarnings("ignore", message=r".*ray_remote_args. is deprecated.*")
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                VideoPreprocessor, batch_size=1, batch_format="numpy", num_cpus=1,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
                num_gpus=gpu_share or None, max_task_retries=WORKER_CRASH_RETRIES,
                fn_constructor_kwargs={"output": str(output.resolve()), "hubert_dir": str(hubert_dir.resolve()),
                                       "settings": asdict(settings), "device": "cuda" if gpu_share else "cpu"})
        results = []
        for row in dataset.iter_rows():
            result = {name: row[name].item() if hasattr(row[name], "item") else row[name] for name in RESULT_FIELDS}
            results.append(result)
            detail = (f"{result['frames']} frames" if result["status"] == "ok"
                      else f"{result['stage']}: {result['reason']}")
            log(f"  [{len(results)}/{len(todo)}] {result['video_id']} {result['status']} ({detail}, "
                f"{result['seconds']:.1f} s)")
    finally:
        context.max_errored_blocks = tolerated
    reported = {r["video_id"] for r in results}
    for item in items:  # the worker process died on these (out of memory, a crash in native code)
        if item["video_id"] not in reported:
            results.append({"video_id": item["video_id"], "status": "failed", "frames": 0, "stage": "error",
                            "reason": f"{item['path']}: the worker process died while preprocessing it "
                                      f"({WORKER_CRASH_RETRIES + 1} attempts; out of memory or a native crash)",
                            "seconds": 0.0})
    return results


def _check_settings(output: Path, settings: PreprocessSettings) -> None:
    index = output / "index.json"
    if index.is_file():
        saved = json.loads(index.read_text()).get("settings", {})
        changed = {k: (saved[k], v) for k, v in asdict(settings).items() if k in saved and saved[k] != v}
        if changed:
            details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise DawnError(f"{output} holds shards made with other settings ({details}); use another --output")


def _read_failures(output: Path) -> dict[str, dict]:
    path = output / "failures.parquet"
    if not path.is_file():
        return {}
    return {row["video_id"]: row for row in pq.read_table(path).to_pylist()}


def _write_failures(output: Path, failures: dict[str, dict]) -> None:
    table = pa.Table.from_pylist(sorted(failures.values(), key=lambda r: r["video_id"]), schema=FAILURES_SCHEMA)
    atomic_write_bytes(output / "failures.parquet", lambda tmp: pq.write_table(table, tmp))


def _write_index(output: Path, settings: PreprocessSettings, failures: dict[str, dict]) -> None:
    """index.json from the shards on disk: per video its identity, split, frames and segments."""
    videos = {}
    for path in sorted((output / "shards").glob("*.parquet")):
        table = pq.read_table(path, columns=["video_id", "identity", "split", "source_path", "num_frames"])
        first = table.slice(0, 1).to_pylist()[0]
        videos[first["video_id"]] = {"identity": first["identity"], "split": first["split"],
                                     "source_path": first["source_path"], "segments": table.num_rows,
                                     "frames": sum(table.column("num_frames").to_pylist())}
    splits = {split: sorted(v for v, info in videos.items() if info["split"] == split) for split in ("train", "test")}
    index = {"settings": {**asdict(settings), "fps": FPS, "sample_rate": SAMPLE_RATE},
             "videos": videos, "splits": splits,
             "identities": sorted({info["identity"] for info in videos.values()}),
             "frames": {split: sum(videos[v]["frames"] for v in ids) for split, ids in splits.items()},
             "failed": len(failures)}
    atomic_write_bytes(output / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))


def read_shards(shards_dir: str | Path, split: str | None = None, columns: list[str] | None = None):
    """A Ray Dataset of the shard rows of `split` (raw rows; decode them with dawn.data.readers.decode_rows).

    columns: array columns to read besides the scalar ones (default all), e.g. ["pose", "eyes", "hubert"].
    """
    import ray

    from dawn.data.readers import shard_files
    from dawn.data.schema import SCALAR_COLUMNS

    paths = [str(p) for p in shard_files(shards_dir, split)]
    if not paths:
        raise DawnError(f"no {split or ''} shards in {Path(shards_dir) / 'shards'}".replace("  ", " "))
    read_columns = None if columns is None else list(SCALAR_COLUMNS) + [c for c in columns if c not in SCALAR_COLUMNS]
    return ray.data.read_parquet(paths, columns=read_columns)


# ---------------------------------------------------------------------------------------------------
# `dawn preprocess` (and jobs/preprocess.py)

def register_cli(subparsers) -> None:
    what = "Preprocess a video corpus into Parquet shards (docs/data_schema.md) with Ray Data."
    where = "On a cluster give paths every node sees (a shared filesystem)."
    parser = subparsers.add_parser("preprocess", help="preprocess a video corpus into Parquet shards with Ray Data",
                                   description=f"{what} {RAY_CLUSTER_HELP} {where}")
    add = parser.add_argument
    add("--input", required=True, help="folder of videos or a .csv/.jsonl manifest (path, identity)")
    add("--output", required=True, help="shards folder (index.json, failures.parquet, shards/)")
    add("--hubert", required=True, help="HuBERT model folder (save_pretrained of facebook/hubert-large-ls960-ft)")
    add("--resolution", type=int, default=128, help="face crop side in pixels (128 or 256)")
    add("--segment-frames", type=int, default=SEGMENT_FRAMES, help="max frames per shard row")
    add("--test-fraction", type=float, default=0.1, help="share of identities in the test split")
    add("--seed", type=int, default=0, help="seed of the identity split")
    add("--max-missing-face", type=float, default=MAX_MISSING_FACE,
        help="reject a video when no face is found in more than this fraction of its frames")
    add("--max-actors", type=int, default=None, help="preprocessing actors (default: cluster CPUs)")
    add("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    add("--num-cpus", type=int, default=None, help="CPUs of the local Ray (local runs only)")
    parser.set_defaults(func=_preprocess_command)


def _preprocess_command(args) -> int:
    if args.resolution % 4 or args.resolution < 16:
        raise DawnError(f"--resolution must be a multiple of 4 and at least 16 (128 or 256), got {args.resolution}")
    settings = PreprocessSettings(resolution=args.resolution, segment_frames=args.segment_frames,
                                  test_fraction=args.test_fraction, seed=args.seed,
                                  max_missing_face=args.max_missing_face)
    run_preprocess(args.input, args.output, args.hubert, settings, max_actors=args.max_actors,
                   address=args.address, num_cpus=args.num_cpus)
    return 0
