"""Bulk rendering: a manifest of (portrait, speech) pairs -> one mp4 per row + a results table.

The manifest is CSV (with a header) or JSON Lines, one render per row:

    id, portrait, audio, pose_video (optional), and any render option as a column (optional):
    seed, steps, eta, sampler, crop, decode_batch, cond_scale, paste_back, max_side, motion_smoothing

A row's options replace the job's (`--steps`, `--eta`, ...); a bad value fails that row with the same
one-line reason `dawn render` and the HTTP API give. Relative paths are relative to the manifest's folder.

Each row is a `dawn.pipeline.RenderState` that flows through a Ray Data pipeline with one actor pool per
group of the pipeline's stages (the states cross actors as `RenderState.to_bytes()`):

    inputs + features (media, face analysis, HuBERT)  ->  motion (PBNet, or the pose video's track)
      ->  frames (A2V-FDM, rows of one length sampled together, + LFG decode)  ->  writer (mp4)

Output: `<output>/<id>.mp4` (atomic), and `results.csv` + `results.parquet` with columns id, status
(done | skipped | failed), seconds, error, output. A rerun skips rows whose mp4 exists (status skipped) and
retries failed ones. A bad row (missing file, no face, unreadable audio, bad id or option) is recorded as
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
from dawn.pipeline import SAMPLERS, OptionError, RenderOptions, RenderPipeline, RenderState, write_video

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("id", "status", "seconds", "error", "output")
ROW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The actor pools of the job and the pipeline stages each runs.
STAGE_GROUPS = {"features": ("inputs", "features"), "motion": ("motion",), "frames": ("frames",)}


# ----------------------------------------------------------------------------------------------------
# Manifest

def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a CSV or JSONL manifest as dicts with id, portrait, audio, pose_video (None when absent)
    and the option columns present (raw values; checked per row). Paths are resolved against the
    manifest's folder."""
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
             **{name: row[name] for name in RenderOptions.FIELDS if name in row}} for row in rows]


def check_row(row: dict, seen: set[str], options: RenderOptions | None = None) -> str | None:
    """The problem with a manifest row that makes it unrenderable before any work, or None. On success the
    row's `options` are the job's `options` with the row's option columns applied."""
    if not ROW_ID.match(row["id"]):
        return f"bad id {row['id']!r}: use 1-128 letters, digits, '.', '_' or '-' (it names the mp4)"
    if row["id"] in seen:
        return f"duplicate id {row['id']!r}"
    if row["portrait"] is None or row["audio"] is None:
        return "portrait and audio are both required"
    try:
        row["options"] = RenderOptions.from_fields(row, base=options)
    except OptionError as e:
        return str(e)
    for key in ("portrait", "audio", "pose_video"):
        if row.get(key) and not Path(row[key]).is_file():
            return f"{key} file not found: {row[key]}"
    return None


# ----------------------------------------------------------------------------------------------------
# Stages: Ray Data callable classes over rows whose `state` column holds RenderState bytes

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


class _Rows:
    """Rows that failed earlier pass through untouched; a row's failure is recorded in its `error`; the
    time spent is added to its `seconds`."""

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
        raise NotImplementedError


class StageActor(_Rows):
    """Runs pipeline stages (`STAGE_GROUPS[group]`) on a batch of rows, holding only their networks."""

    def __init__(self, group: str, checkpoints: str, hubert: str | None = None, device: str = "cpu",
                 dtype: str = "fp32"):
        self.stages = STAGE_GROUPS[group]
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, hubert_dir=hubert, stages=self.stages,
                                                        device=device, dtype=dtype)

    def process(self, rows: list[dict]) -> None:
        pending = [(row, RenderState.from_bytes(row["state"])) for row in rows]
        for stage in self.stages:
            results = self.pipeline.run_stage(stage, [state for _, state in pending])
            kept = []
            for (row, _), result in zip(pending, results):
                if isinstance(result, BaseException):
                    row["error"], row["state"] = _failure(result), b""
                else:
                    kept.append((row, result))
            pending = kept
        for row, state in pending:
            row["state"] = state.to_bytes()


class WriterStage(_Rows):
    """Frames + speech -> `<output>` mp4 (H.264 + AAC, written atomically)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        del out["state"]  # nothing more to carry
        return out

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            try:
                write_video(RenderState.from_bytes(row["state"]), row["output"])
            except Exception as e:  # noqa: BLE001 - a bad row is reported, the job goes on
                row["error"] = _failure(e)


# ----------------------------------------------------------------------------------------------------
# The job

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


def run_batch_render(manifest: str | Path, checkpoints: str | Path, output: str | Path,
                     options: RenderOptions | None = None, hubert: str | Path | None = None,
                     address: str | None = None, num_cpus: int | None = None, features_actors: int = 1,
                     pbnet_actors: int = 1, a2v_actors: int = 1, writer_actors: int = 1, a2v_batch: int = 4,
                     use_gpu: bool = False, dtype: str = "fp32", cpus_per_actor: float | None = None,
                     show_progress: bool = True) -> list[dict]:
    """Render every manifest row to `<output>/<id>.mp4`; returns the results table (one dict per row, in
    manifest order, with RESULT_COLUMNS) and writes it as results.csv + results.parquet.

    `options` are every row's render options (default: the defaults); a row's option columns replace them.
    Uses the Ray cluster this process is connected to, else joins `address`, else starts a local one with
    `num_cpus` (and stops it at the end). cpus_per_actor defaults to what lets every actor start at once
    (at most 1). use_gpu gives each A2V-FDM actor one GPU (the other stages stay on CPU).
    """
    import ray

    checkpoints, output = Path(checkpoints).resolve(), Path(output).resolve()
    if not checkpoints.is_dir():
        raise DawnError(f"checkpoint directory not found: {checkpoints}")
    if not (checkpoints / "lfg.json").is_file():
        raise DawnError(f"checkpoint file missing: {checkpoints / 'lfg.json'}")
    rows = read_manifest(manifest)
    output.mkdir(parents=True, exist_ok=True)

    results: dict[int, dict] = {}
    todo, seen = [], set()
    for index, row in enumerate(rows):
        problem = check_row(row, seen, options)
        seen.add(row["id"])
        out_path = output / f"{row['id']}.mp4"
        record = {"id": row["id"], "status": "failed", "seconds": 0.0, "error": problem, "output": None}
        if problem is None and out_path.is_file():
            record.update(status="skipped", output=str(out_path))
        elif problem is None:
            state = RenderState.from_files(row["portrait"], row["audio"], row["pose_video"], row["options"],
                                           name=row["id"])
            todo.append({"index": index, "id": row["id"], "output": str(out_path), "error": "", "seconds": 0.0,
                         "state": state.to_bytes()})
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
            pools = {"features": features_actors, "motion": pbnet_actors, "frames": a2v_actors,
                     "writer": writer_actors}
            for row in _render_rows(todo, checkpoints, hubert, pools, a2v_batch, use_gpu, dtype, cpus_per_actor,
                                    show_progress):
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


def _render_rows(todo, checkpoints, hubert, pools, a2v_batch, use_gpu, dtype, cpus_per_actor, show_progress):
    """The Ray Data pipeline over the rows to render; yields the finished rows as they complete."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = show_progress
    if cpus_per_actor is None:
        cpus_per_actor = min(1.0, ray.cluster_resources().get("CPU", 1.0) / sum(pools.values()))
    hubert = str(Path(hubert).resolve()) if hubert else None
    common = {"batch_format": "numpy", "num_cpus": cpus_per_actor}
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    for group in STAGE_GROUPS:
        on_gpu = use_gpu and group == "frames"
        ds = ds.map_batches(StageActor, fn_constructor_args=(group, str(checkpoints), hubert,
                                                             "cuda" if on_gpu else "cpu", dtype),
                            batch_size=a2v_batch if group == "frames" else 1,
                            compute=ActorPoolStrategy(size=pools[group]), num_gpus=1 if on_gpu else 0, **common)
    ds = ds.map_batches(WriterStage, batch_size=1, compute=ActorPoolStrategy(size=pools["writer"]), **common)
    yield from ds.iter_rows()


# ----------------------------------------------------------------------------------------------------
# Command line (`dawn batch-render`, jobs/batch_render.py)

def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True,
                        help="CSV or JSONL: id, portrait, audio[, pose_video][, option columns: seed, steps, eta, ...]")
    parser.add_argument("--checkpoints", required=True, help="dawn checkpoint directory")
    parser.add_argument("--output", required=True, help="folder for <id>.mp4 and results.csv/.parquet")
    parser.add_argument("--hubert", help="HuBERT model folder (default: CHECKPOINTS/hubert)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--eta", type=float, default=1.0,
                        help="DDIM eta: 1 (default, the reference's stochastic DDIM) to 0 (deterministic)")
    parser.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (default ddim)")
    parser.add_argument("--crop", default="face", help="face (default: crop around the face) or none")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of rows without a seed column")
    parser.add_argument("--paste-back", action="store_true", help="whole portraits with the rendered head blended in")
    parser.add_argument("--max-side", type=int, default=1920, help="with --paste-back: longer side at most this")
    parser.add_argument("--motion-smoothing", type=float, default=0.0,
                        help="smooth the sampled motion over time, sigma in frames (default 0: as sampled)")
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
    options = RenderOptions.from_fields({"steps": args.steps, "eta": args.eta, "sampler": args.sampler,
                                         "crop": args.crop, "seed": args.seed, "paste_back": args.paste_back,
                                         "max_side": args.max_side, "motion_smoothing": args.motion_smoothing})
    results = run_batch_render(
        args.manifest, args.checkpoints, args.output, options=options, hubert=args.hubert,
        address=args.address, num_cpus=args.num_cpus, features_actors=args.features_actors,
        pbnet_actors=args.pbnet_actors, a2v_actors=args.a2v_actors, writer_actors=args.writer_actors,
        a2v_batch=args.a2v_batch, use_gpu=args.use_gpu, dtype=args.dtype,
        cpus_per_actor=args.cpus_per_actor, show_progress=not args.no_progress)
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    print(f"{counts['done']} rendered, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
          f"results in {Path(args.output) / 'results.csv'}")
    return 1 if counts["failed"] else 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("batch-render", help="render a manifest of portrait + speech pairs with Ray Data")
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
