"""Bulk rendering: a manifest of (portrait, speech) pairs -> one mp4 per row + a results table.

The manifest is CSV (with a header) or JSON Lines, one render per row:

    id, portrait, audio, pose_video (optional), seed (optional, default 0)

Relative paths are relative to the manifest's folder. The rows flow through a Ray Data pipeline with one
actor pool per stage; each stage calls the `RenderPipeline` stage methods of dawn.pipeline:

    features (image + face analysis, audio + HuBERT, pose video)  ->  motion (PBNet, or the pose video)
      ->  frames (A2V-FDM sampling, batched over rows of equal length, + LFG decode)  ->  writer (mp4)

Output: `<output>/<id>.mp4` (atomic), and `results.csv` + `results.parquet` with columns id, status
(done | skipped | failed), seconds, error, output. A rerun skips rows whose mp4 exists (status skipped) and
retries failed ones. A bad row (missing file, no face, unreadable audio, bad id or seed) is recorded as
failed and the job goes on.

Command line: `dawn batch-render` and `python jobs/batch_render.py` (for `ray job submit`) take the same flags
(`add_arguments`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from dawn import DawnError
from dawn.pipeline import SAMPLERS, Motion, Portrait, RenderOptions, RenderPipeline
from dawn.serving import FramesRequest, render_frames_batched

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("id", "status", "seconds", "error", "output")
ROW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ----------------------------------------------------------------------------------------------------
# Manifest

def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a CSV or JSONL manifest as dicts with id, portrait, audio, pose_video (None when absent)
    and seed (the raw value; checked per row). Paths are resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DawnError(f"manifest not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DawnError(f"{path} line {number} is not JSON: {e}") from None
            if not isinstance(row, dict):
                raise DawnError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise DawnError(f"manifest {path} has no rows")
    missing = {"id", "portrait", "audio"} - set().union(*(row.keys() for row in rows))
    if missing:
        raise DawnError(f"manifest {path} lacks the column(s) {sorted(missing)} (needs id, portrait, audio)")

    def resolve(value) -> str | None:
        if value is None or str(value).strip() == "":
            return None
        p = Path(str(value).strip())
        return str(p if p.is_absolute() else path.parent / p)

    return [{"id": str(row.get("id") or "").strip(), "portrait": resolve(row.get("portrait")),
             "audio": resolve(row.get("audio")), "pose_video": resolve(row.get("pose_video")),
             "seed": row.get("seed")} for row in rows]


def check_row(row: dict, seen: set[str]) -> str | None:
    """The problem with a manifest row that makes it unrenderable before any work, or None."""
    if not ROW_ID.match(row["id"]):
        return f"bad id {row['id']!r}: use 1-128 letters, digits, '.', '_' or '-' (it names the mp4)"
    if row["id"] in seen:
        return f"duplicate id {row['id']!r}"
    if row["portrait"] is None or row["audio"] is None:
        return "portrait and audio are both required"
    try:
        seed = int(row["seed"]) if row["seed"] not in (None, "") else 0
    except (TypeError, ValueError):
        return f"seed must be an integer, got {row['seed']!r}"
    if seed < 0:
        return f"seed must be non-negative, got {seed}"
    for key in ("portrait", "audio", "pose_video"):
        if row.get(key) and not Path(row[key]).is_file():
            return f"{key} file not found: {row[key]}"
    row["seed"] = seed
    return None


# ----------------------------------------------------------------------------------------------------
# Row state between stages: arrays packed as .npz bytes (plain columns for Ray Data, no pickles)

def pack(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        return {k: loaded[k] for k in loaded.files}


def _portrait(state: dict) -> Portrait:
    return Portrait(image=state["image"], pose=state["pose"], eyes=state["eyes"], face_box=state["face_box"])


def _failure(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, DawnError):
        return str(cause)
    log.exception("batch render row failed", exc_info=cause)
    return f"internal error ({type(cause).__name__}): {cause}"


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    keys = list(batch)
    values = {k: batch[k].tolist() for k in keys}  # numpy scalars -> Python values
    return [{k: values[k][i] for k in keys} for i in range(len(values[keys[0]]))]


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([row[k] for row in rows], dtype=object) for k in rows[0]}


class _Stage:
    """Ray Data callable class over row dicts: rows that failed earlier pass through untouched; a row's
    failure is recorded in its `error`; the time spent is added to its `seconds`."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _rows(batch)
        todo = [row for row in rows if not row["error"]]
        start = time.perf_counter()
        if todo:
            self.process(todo)
        share = (time.perf_counter() - start) / max(1, len(todo))
        for row in todo:
            row["seconds"] = float(row["seconds"]) + share
        return _columns(rows)

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            try:
                row["state"] = self.process_row(row)
            except Exception as e:  # noqa: BLE001 - a bad row is reported, the job goes on
                row["error"], row["state"] = _failure(e), b""

    def process_row(self, row: dict) -> bytes:
        raise NotImplementedError


class FeaturesStage(_Stage):
    """Image -> analysed portrait; audio -> 16 kHz waveform + HuBERT; pose video -> motion (CPU)."""

    def __init__(self, checkpoints: str, hubert: str | None, resolution: int, device: str = "cpu"):
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, hubert_dir=hubert, stages=("features",),
                                                        device=device)
        self.resolution = resolution

    def process_row(self, row: dict) -> bytes:
        from dawn.audio import load_audio
        from dawn.face import load_image
        from dawn.pipeline import load_pose_frames

        portrait = self.pipeline.analyze_portrait(load_image(row["portrait"]), resolution=self.resolution,
                                                  name=row["portrait"])
        waveform = load_audio(row["audio"])
        hubert = self.pipeline.audio_features(waveform)
        state = dict(image=portrait.image, pose=portrait.pose, eyes=portrait.eyes, face_box=portrait.face_box,
                     waveform=waveform, hubert=hubert)
        if row["pose_video"]:
            motion = self.pipeline.motion_from_video(load_pose_frames(row["pose_video"]), hubert.shape[0])
            state.update(motion_pose=motion.pose, motion_eyes=motion.eyes)
        return pack(**state)


class MotionStage(_Stage):
    """PBNet pose + blink for rows without a pose video."""

    def __init__(self, checkpoints: str, device: str = "cpu"):
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, stages=("pbnet",), device=device)

    def process_row(self, row: dict) -> bytes:
        state = unpack(row["state"])
        if "motion_pose" not in state:
            motion = self.pipeline.sample_motion(_portrait(state), state["hubert"], seed=int(row["seed"]))
            state.update(motion_pose=motion.pose, motion_eyes=motion.eyes)
        return pack(**state)


class FramesStage(_Stage):
    """A2V-FDM flows (rows of one length sampled together) + LFG decode -> frames."""

    def __init__(self, checkpoints: str, steps: int, device: str = "cpu", dtype: str = "fp32", eta: float = 1.0,
                 sampler: str = "ddim"):
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, stages=("a2v",), device=device, dtype=dtype)
        self.steps, self.eta, self.sampler = steps, eta, sampler

    def process(self, rows: list[dict]) -> None:
        states = [unpack(row["state"]) for row in rows]
        requests = [FramesRequest(_portrait(s), s["hubert"], Motion(pose=s["motion_pose"], eyes=s["motion_eyes"]),
                                  RenderOptions(steps=self.steps, seed=int(row["seed"]), eta=self.eta,
                                                sampler=self.sampler))
                    for row, s in zip(rows, states)]
        for row, state, frames in zip(rows, states, render_frames_batched(self.pipeline, requests)):
            if isinstance(frames, BaseException):
                row["error"], row["state"] = _failure(frames), b""
            else:
                row["state"] = pack(frames=frames, waveform=state["waveform"])


class WriterStage(_Stage):
    """Frames + speech -> `<output>` mp4 (H.264 + AAC, written atomically)."""

    def process_row(self, row: dict) -> bytes:
        from dawn.video import write_mp4

        state = unpack(row["state"])
        write_mp4(row["output"], state["frames"], fps=25, audio=state["waveform"])
        return b""  # nothing more to carry


# ----------------------------------------------------------------------------------------------------
# The job

def _resolution(checkpoints: Path) -> int:
    """The LFG image size, read from the checkpoint's config without loading its weights."""
    meta = checkpoints / "lfg.json"
    if not meta.is_file():
        raise DawnError(f"checkpoint file missing: {meta}")
    return int(json.loads(meta.read_text())["config"]["image_size"])


def write_results(results: list[dict], output: Path) -> None:
    """results.csv and results.parquet in `output`, each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dawn.checkpoint import atomic_write_bytes

    table = pa.table({c: [r[c] for r in results] for c in RESULT_COLUMNS},
                     schema=pa.schema([("id", pa.string()), ("status", pa.string()), ("seconds", pa.float64()),
                                       ("error", pa.string()), ("output", pa.string())]))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows({c: ("" if r[c] is None else r[c]) for c in RESULT_COLUMNS} for r in results)

    atomic_write_bytes(output / "results.csv", write_csv)
    atomic_write_bytes(output / "results.parquet", lambda tmp: pq.write_table(table, tmp))


def run_batch_render(manifest: str | Path, checkpoints: str | Path, output: str | Path, steps: int = 20,
                     hubert: str | Path | None = None, address: str | None = None, num_cpus: int | None = None,
                     features_actors: int = 1, pbnet_actors: int = 1, a2v_actors: int = 1, writer_actors: int = 1,
                     a2v_batch: int = 4, use_gpu: bool = False, dtype: str = "fp32",
                     cpus_per_actor: float | None = None, show_progress: bool = True, eta: float = 1.0,
                     sampler: str = "ddim") -> list[dict]:
    """Render every manifest row to `<output>/<id>.mp4`; returns the results table (one dict per row, in
    manifest order, with RESULT_COLUMNS) and writes it as results.csv + results.parquet.

    Uses the Ray cluster this process is connected to, else joins `address`, else starts a local one with
    `num_cpus` (and stops it at the end). cpus_per_actor defaults to what lets every actor start at once
    (at most 1). use_gpu gives each A2V-FDM actor one GPU (the other stages stay on CPU). eta and sampler:
    the DDIM eta (1, the reference's, to 0, deterministic) and the sampler of every row.
    """
    import ray

    checkpoints, output = Path(checkpoints).resolve(), Path(output).resolve()
    if not checkpoints.is_dir():
        raise DawnError(f"checkpoint directory not found: {checkpoints}")
    if steps < 1:
        raise DawnError(f"--steps must be at least 1, got {steps}")
    if not 0 <= eta <= 1:
        raise DawnError(f"--eta must be between 0 and 1, got {eta}")
    if sampler not in SAMPLERS:
        raise DawnError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    resolution = _resolution(checkpoints)
    rows = read_manifest(manifest)
    output.mkdir(parents=True, exist_ok=True)

    results: dict[int, dict] = {}
    todo, seen = [], set()
    for index, row in enumerate(rows):
        problem = check_row(row, seen)
        seen.add(row["id"])
        out_path = output / f"{row['id']}.mp4"
        record = {"id": row["id"], "status": "failed", "seconds": 0.0, "error": problem, "output": None}
        if problem is None and out_path.is_file():
            record.update(status="skipped", output=str(out_path))
        elif problem is None:
            todo.append({"index": index, "id": row["id"], "portrait": row["portrait"], "audio": row["audio"],
                         "pose_video": row["pose_video"] or "", "seed": row["seed"], "output": str(out_path),
                         "error": "", "seconds": 0.0, "state": b""})
            continue
        results[index] = record
    print(f"batch render: {len(rows)} rows, {len(todo)} to render, "
          f"{sum(r['status'] == 'skipped' for r in results.values())} already done, "
          f"{sum(r['status'] == 'failed' for r in results.values())} invalid", file=sys.stderr, flush=True)

    if todo:
        started_here = not ray.is_initialized()
        if started_here:
            address = address or os.environ.get("RAY_ADDRESS")  # set under `ray job submit`
            ray.init(address=address or "local", num_cpus=None if address else num_cpus)
        try:
            for row in _render_rows(todo, checkpoints, hubert, resolution, steps, features_actors, pbnet_actors,
                                    a2v_actors, writer_actors, a2v_batch, use_gpu, dtype, cpus_per_actor,
                                    show_progress, eta, sampler):
                failed = bool(row["error"])
                results[int(row["index"])] = {
                    "id": row["id"], "status": "failed" if failed else "done", "seconds": round(float(row["seconds"]), 3),
                    "error": row["error"] or None, "output": None if failed else row["output"]}
                word = f"failed: {row['error']}" if failed else f"done in {float(row['seconds']):.1f}s"
                print(f"[{len(results)}/{len(rows)}] {row['id']} {word}", file=sys.stderr, flush=True)
        finally:
            if started_here:
                ray.shutdown()

    table = [results[i] for i in range(len(rows))]
    write_results(table, output)
    return table


def _render_rows(todo, checkpoints, hubert, resolution, steps, features_actors, pbnet_actors, a2v_actors,
                 writer_actors, a2v_batch, use_gpu, dtype, cpus_per_actor, show_progress, eta, sampler):
    """The Ray Data pipeline over the rows to render; yields the finished rows as they complete."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = show_progress
    if cpus_per_actor is None:
        actors = features_actors + pbnet_actors + a2v_actors + writer_actors
        cpus_per_actor = min(1.0, ray.cluster_resources().get("CPU", 1.0) / actors)
    device = "cuda" if use_gpu else "cpu"
    hubert = str(Path(hubert).resolve()) if hubert else None
    common = {"batch_format": "numpy", "num_cpus": cpus_per_actor}
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.map_batches(FeaturesStage, fn_constructor_args=(str(checkpoints), hubert, resolution), batch_size=1,
                        compute=ActorPoolStrategy(size=features_actors), **common)
    ds = ds.map_batches(MotionStage, fn_constructor_args=(str(checkpoints),), batch_size=1,
                        compute=ActorPoolStrategy(size=pbnet_actors), **common)
    ds = ds.map_batches(FramesStage, fn_constructor_args=(str(checkpoints), steps, device, dtype, eta, sampler),
                        batch_size=a2v_batch, compute=ActorPoolStrategy(size=a2v_actors),
                        num_gpus=1 if use_gpu else 0, **common)
    ds = ds.map_batches(WriterStage, batch_size=1, compute=ActorPoolStrategy(size=writer_actors), **common)
    yield from ds.select_columns(["index", "id", "output", "error", "seconds"]).iter_rows()


# ----------------------------------------------------------------------------------------------------
# Command line (`dawn batch-render`, jobs/batch_render.py)

def add_arguments(parser) -> None:
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


def run_from_args(args) -> int:
    """Run the job from parsed `add_arguments` flags, print the counts; exit status 1 when any row failed."""
    results = run_batch_render(
        args.manifest, args.checkpoints, args.output, steps=args.steps, hubert=args.hubert,
        address=args.address, num_cpus=args.num_cpus, features_actors=args.features_actors,
        pbnet_actors=args.pbnet_actors, a2v_actors=args.a2v_actors, writer_actors=args.writer_actors,
        a2v_batch=args.a2v_batch, use_gpu=args.use_gpu, dtype=args.dtype,
        cpus_per_actor=args.cpus_per_actor, show_progress=not args.no_progress, eta=args.eta,
        sampler=args.sampler)
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    print(f"{counts['done']} rendered, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
          f"results in {Path(args.output) / 'results.csv'}")
    return 1 if counts["failed"] else 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("batch-render", help="render a manifest of portrait + speech pairs with Ray Data")
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
