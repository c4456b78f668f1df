"""Preprocessing of one video into shard rows (docs/data_schema.md), with no Ray in sight.

`preprocess_video` decodes a video once, resamples it to 25 fps, fixes one face crop for the whole video,
measures pose / eyes / mouth / boxes per frame with mediapipe on the crops, computes HuBERT features of the
audio track, and cuts the result into segments. A video that cannot be used raises `PreprocessError` with the
`stage` that rejected it; `dawn.data.preprocess_job` maps this function over a corpus with Ray Data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dawn import DawnError
from dawn.checkpoint import atomic_write_bytes
from dawn.config import FPS
from dawn.data.schema import SAMPLES_PER_FRAME, encode_segment, rows_to_table

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".flv")
MIN_SECONDS = 1.0  # shorter videos are rejected (stage "duration")
FPS_RANGE = (10.0, 120.0)  # source frame rates outside are rejected (stage "fps")
MIN_SIDE = 64  # source videos with a smaller side are rejected (stage "size")
MAX_MISSING_FACE = 0.2  # reject when no face is found in more than this fraction of frames (stage "face")
SEGMENT_FRAMES = 500  # frames per shard row (20 s)
CROP_SAMPLE_FRAMES = 16  # frames analysed at full resolution to fix the video's face crop
DECODE_CHUNK = 32  # source frames decoded at a time (only the resized crops of the whole video are kept)
ANALYSIS_SIZE = 256  # faces are measured on crops of max(S, 256) px (mediapipe's mesh looks at 192 px)
ANALYSIS_CHUNK = 250  # frames per face-tracking run; bounds the memory held by the analysis crops

FAILURE_STAGES = ("decode", "audio", "face", "duration", "size", "fps")


class PreprocessError(DawnError):
    """A video that cannot be used. `stage` is one of FAILURE_STAGES; the message says why."""

    def __init__(self, stage: str, message: str):
        if stage not in FAILURE_STAGES:
            raise ValueError(f"unknown preprocessing stage {stage!r}")
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class VideoItem:
    """One input video: its file, speaker identity and stable id (file stem + short hash of its path)."""

    path: str
    identity: str
    video_id: str


# ----------------------------------------------------------------------------------------------------
# Listing the corpus and splitting it

def list_videos(source: str | Path) -> list[VideoItem]:
    """Videos of a directory (searched recursively for .mp4 .mov .mkv .avi .flv) or of a manifest.

    A manifest is a .csv (header with a `path` column and optionally `identity`) or a .jsonl (one object per
    line with "path" and optionally "identity"); relative paths are relative to the manifest's folder.
    Without an identity, a video's identity is its parent folder's name, or its file stem when it sits at the
    top of the corpus. The list is sorted by path and has no duplicates.
    """
    source = Path(source)
    if source.is_dir():
        root = source
        entries = [(p.relative_to(root).as_posix(), None) for p in sorted(source.rglob("*"))
                   if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        root = source.parent
        entries = _read_manifest(source)
    elif source.exists():
        raise DawnError(f"{source}: expected a directory of videos or a .csv / .jsonl manifest")
    else:
        raise DawnError(f"input not found: {source}")
    items = {}
    for name, identity in entries:
        path = Path(name) if Path(name).is_absolute() else root / name
        relative = Path(name)
        if not identity:
            identity = relative.parent.name if len(relative.parts) > 1 else relative.stem
        video_id = make_video_id(name)
        items.setdefault(video_id, VideoItem(path=str(path), identity=str(identity), video_id=video_id))
    return sorted(items.values(), key=lambda item: item.path)


def make_video_id(name: str) -> str:
    """Stable id of a video listed as `name` (its path relative to the corpus): file stem + 8 hex digits."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)
    return f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _read_manifest(path: Path) -> list[tuple[str, str | None]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            records = list(csv.DictReader(f))
    else:
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DawnError(f"{path}:{number}: not a JSON object ({error})") from error
    entries = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not record.get("path"):
            raise DawnError(f"{path}: entry {number} has no 'path'")
        entries.append((str(record["path"]), record.get("identity") or None))
    return entries


def assign_split(identity: str, test_fraction: float, seed: int = 0) -> str:
    """"train" or "test" for a speaker identity: a hash of (seed, identity) compared with test_fraction.

    Deterministic across runs and machines; all videos of one identity land in the same split.
    """
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    uniform = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if uniform < test_fraction else "train"


# ----------------------------------------------------------------------------------------------------
# Frame-level helpers

def resample_indices(num_source_frames: int, source_fps: float, fps: int = FPS) -> np.ndarray:
    """Source frame index shown at each `fps` frame time: nearest source frame to i / fps, (N,) int64."""
    count = int(num_source_frames * fps / source_fps)
    indices = np.floor(np.arange(count) * (source_fps / fps) + 0.5).astype(np.int64)
    return np.minimum(indices, num_source_frames - 1)


def interpolate_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fill frames where found is False by linear interpolation over time (held constant at the ends).

    values: (T, ...) float; found: (T,) bool with at least one True. Returns a float32 copy.
    """
    values = np.asarray(values, dtype=np.float32)
    if found.all():
        return values.copy()
    flat = values.reshape(len(values), -1)
    known, times = np.flatnonzero(found), np.arange(len(values))
    filled = np.stack([np.interp(times, known, column[known]) for column in flat.T], axis=1)
    return filled.astype(np.float32).reshape(values.shape)


def segment_bounds(num_frames: int, segment_frames: int) -> list[tuple[int, int]]:
    """Split num_frames into ceil(T / segment_frames) near-equal consecutive segments [(start, end), ...]."""
    count = max(1, math.ceil(num_frames / segment_frames))
    edges = np.linspace(0, num_frames, count + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def write_shard(rows: list[dict], path: str | Path) -> Path:
    """Write encoded rows to a Parquet file atomically (temporary file + os.replace); one row group per row."""
    table = rows_to_table(rows)

    def write(tmp):
        pq.write_table(table, tmp, compression="zstd", row_group_size=1)
        os.chmod(tmp, 0o644)  # readable by the training workers (mkstemp creates 0600)

    atomic_write_bytes(Path(path), write)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# One video -> shard rows

def preprocess_video(path: str | Path, resolution: int, hubert_extractor, *, video_id: str | None = None,
                     identity: str | None = None, split: str = "train", segment_frames: int = SEGMENT_FRAMES,
                     max_missing_face: float = MAX_MISSING_FACE, timings: dict | None = None) -> list[dict]:
    """Decode, crop, analyse and featurise one video; return its encoded shard rows (one per segment).

    hubert_extractor: `dawn.audio.HubertFeatureExtractor` (or any callable waveform16k (N,) -> (N/640, 1024)).
    video_id / identity default to make_video_id(path) / the parent folder's name. timings: if given, CPU
    seconds per stage ("decode", "audio" = load + HuBERT, "face", "write" = row encoding) are added to it.
    Raises PreprocessError(stage, message).
    """
    path = Path(path)
    video_id = video_id or make_video_id(str(path))
    identity = identity or path.parent.name
    with cpu_timer(timings, "decode"):
        reader, source_fps = _open_video(path)
        indices = resample_indices(len(reader), source_fps)
    with cpu_timer(timings, "audio"):
        waveform = _load_audio(path)
    with cpu_timer(timings, "face"):
        box = _fixed_crop_box(reader, path)
    with cpu_timer(timings, "audio"):
        hubert = _hubert_features(hubert_extractor, waveform, path)
    num_frames = min(len(indices), len(hubert))
    if num_frames < MIN_SECONDS * FPS:
        raise PreprocessError("duration", f"{path}: only {num_frames / FPS:.2f} s with both video and audio "
                                          f"(at least {MIN_SECONDS:g} s needed)")
    frames, measures = _crop_and_measure(reader, indices[:num_frames], box, resolution, path, timings)
    measures = _fill_missing_faces(measures, max_missing_face, path)
    with cpu_timer(timings, "write"):
        return [encode_segment({
            "video_id": video_id, "identity": identity, "split": split, "source_path": str(path),
            "segment": segment, "start_frame": start, "num_frames": end - start, "resolution": resolution,
            "frames": frames[start:end], "audio": waveform[start * SAMPLES_PER_FRAME:end * SAMPLES_PER_FRAME],
            "hubert": hubert[start:end], **{name: values[start:end] for name, values in measures.items()}})
            for segment, (start, end) in enumerate(segment_bounds(num_frames, segment_frames))]


@contextmanager
def cpu_timer(timings: dict | None, stage: str):
    """Add the process CPU seconds spent inside the block to timings[stage] (no-op when timings is None)."""
    started = time.process_time()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.process_time() - started


def _open_video(path: Path):
    """decord VideoReader + its frame rate, after the fps / size / duration checks."""
    import decord

    if not path.is_file():
        raise PreprocessError("decode", f"{path}: file not found")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        source_fps = float(reader.get_avg_fps())
        height, width = reader[0].shape[:2]
    except (decord.DECORDError, RuntimeError) as error:
        raise PreprocessError("decode", f"{path}: cannot decode the video (corrupt, truncated or not a video): "
                                        f"{_decord_message(error)}") from error
    if not FPS_RANGE[0] <= source_fps <= FPS_RANGE[1]:
        raise PreprocessError("fps", f"{path}: frame rate {source_fps:.2f} fps is outside "
                                     f"[{FPS_RANGE[0]:g}, {FPS_RANGE[1]:g}]")
    if min(height, width) < MIN_SIDE:
        raise PreprocessError("size", f"{path}: {width}x{height} pixels, the smaller side must be at least {MIN_SIDE}")
    seconds = len(reader) / source_fps
    if seconds < MIN_SECONDS:
        raise PreprocessError("duration", f"{path}: {seconds:.2f} s of video (at least {MIN_SECONDS:g} s needed)")
    return reader, source_fps


def _get_frames(reader, indices, path: Path) -> np.ndarray:
    import decord

    try:
        return reader.get_batch(list(indices)).asnumpy()
    except (decord.DECORDError, RuntimeError) as error:
        raise PreprocessError("decode", f"{path}: decoding failed at frames {indices[0]}-{indices[-1]} "
                                        f"(truncated or corrupt): {_decord_message(error)}") from error


def _decord_message(error: Exception) -> str:
    """decord's first error line without its "[time] source.cc:line: " prefix."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(error).strip().splitlines()[0])


def _fixed_crop_box(reader, path: Path) -> tuple[int, int, int, int]:
    """One square crop for the whole video: the median of per-frame crop boxes over sampled frames."""
    from dawn.face import crop_box, detect_face_landmarks

    samples = np.unique(np.linspace(0, len(reader) - 1, CROP_SAMPLE_FRAMES).round().astype(int))
    boxes = []
    for image in _get_frames(reader, samples, path):  # a few full-size frames, one detection each
        found = detect_face_landmarks(image)
        if found is not None:
            boxes.append(crop_box(found.points, image.shape))
    if len(boxes) < len(samples) / 2:
        raise PreprocessError("face", f"{path}: a face was found in only {len(boxes)} of {len(samples)} "
                                      f"sampled frames")
    x0, y0, x1, y1 = np.median(np.array(boxes, dtype=np.float64), axis=0)
    side = int(round(max(x1 - x0, y1 - y0)))
    left, top = int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2))
    return left, top, left + side, top + side


def _crop_and_measure(reader, indices: np.ndarray, box, resolution: int, path: Path,
                      timings: dict | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode the 25 fps frames `indices`, cut the fixed crop, measure the face in every frame.

    Works ANALYSIS_CHUNK frames at a time (decoding DECODE_CHUNK source frames at a time): crops at the
    analysis size are measured (analyze_video_frames) and kept resized to `resolution`. Returns frames
    (T, S, S, 3) uint8 and measures pose (T, 6), eyes (T, 2), mouth (T,), face_box / lip_box (T, 6) in pixels
    of the S crop, found (T,) bool (values where False are placeholders).
    """
    from dawn.face import crop_and_resize

    analysis_size = max(resolution, ANALYSIS_SIZE)
    frames = np.empty((len(indices), resolution, resolution, 3), dtype=np.uint8)
    parts = []
    for start in range(0, len(indices), ANALYSIS_CHUNK):
        chunk = indices[start:start + ANALYSIS_CHUNK]
        with cpu_timer(timings, "decode"):
            crops = np.concatenate([crop_and_resize(_get_frames(reader, chunk[i:i + DECODE_CHUNK], path), box,
                                                    analysis_size) for i in range(0, len(chunk), DECODE_CHUNK)])
            frames[start:start + len(chunk)] = (crops if analysis_size == resolution else
                                                crop_and_resize(crops, (0, 0, analysis_size, analysis_size), resolution))
        with cpu_timer(timings, "face"):
            parts.append(_measure_faces(crops))
    measures = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    for name in ("face_box", "lip_box", "eye_box"):  # analysis-crop pixels -> S-crop pixels
        measures[name][:, :4] *= resolution / analysis_size
        measures[name][:, 4:] = resolution
    return frames, measures


def _measure_faces(crops: np.ndarray) -> dict[str, np.ndarray]:
    from dawn.face import analyze_video_frames

    num = len(crops)
    try:
        analysis = analyze_video_frames(crops)
    except DawnError:  # no face in any frame of this chunk
        return {"pose": np.zeros((num, 6), np.float32), "eyes": np.zeros((num, 2), np.float32),
                "mouth": np.zeros(num, np.float32), "face_box": np.zeros((num, 6), np.float32),
                "lip_box": np.zeros((num, 6), np.float32), "eye_box": np.zeros((num, 6), np.float32),
                "found": np.zeros(num, bool)}
    return {"pose": analysis["pose"], "eyes": analysis["eye_ratios"], "mouth": analysis["mouth_opening"],
            "face_box": analysis["face_box"], "lip_box": analysis["lip_box"], "eye_box": analysis["eye_box"],
            "found": analysis["found"]}


def _load_audio(path: Path) -> np.ndarray:
    from dawn.audio import load_audio

    try:
        return load_audio(path)
    except DawnError as error:
        raise PreprocessError("audio", str(error)) from error


def _hubert_features(hubert_extractor, waveform: np.ndarray, path: Path) -> np.ndarray:
    try:
        return hubert_extractor(waveform)
    except DawnError as error:
        raise PreprocessError("audio", f"{path}: {error}") from error


def _fill_missing_faces(measures: dict[str, np.ndarray], max_missing_face: float, path: Path) -> dict:
    """Reject a video with too many faceless frames; interpolate the measures over the rest."""
    found = measures["found"]
    missing = 1.0 - found.mean()
    if missing > max_missing_face:
        raise PreprocessError("face", f"{path}: no face in {missing:.0%} of the frames "
                                      f"(at most {max_missing_face:.0%} allowed)")
    filled = {name: interpolate_missing(values, found) for name, values in measures.items() if name != "found"}
    filled["found"] = found.astype(np.uint8)
    return filled
