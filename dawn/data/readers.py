"""Training samples from preprocessed shards (docs/data_schema.md), for the three models.

Every reader takes an iterable of decoded rows (`dawn.data.schema.decode_row` dicts, one segment each:
`iter_shard_rows` locally, `decode_rows(dataset_shard.iter_rows())` under Ray Train), a batch size and a
seeded `numpy.random.Generator`, and yields dicts of torch tensors. Images are float in [0, 1], (B, 3, S, S);
clips (B, 3, K, S, S); per-frame conditions (B, T, D). Rows are consumed as a stream: a segment yields
`per_row` samples, mixing across videos is up to the row order (shuffle the dataset upstream).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dawn.data.schema import SCALAR_COLUMNS, decode_row

A2V_STAGE1_FRAMES = 20  # K' (paper §3.5, stage 1)
A2V_STAGE2_FRAMES = (30, 40)  # [K_min, K_max] (paper §3.5, stage 2; max training clip 40, appendix A.5)
PBNET_WINDOW = 200  # PBNet trains on 200-frame pose/blink sequences (paper §4)


def iter_shard_rows(shards_dir: str | Path, split: str | None = None, columns: list[str] | None = None,
                    rng: np.random.Generator | None = None) -> Iterator[dict]:
    """Decoded rows of the Parquet shards under `shards_dir`/shards, one segment at a time (no Ray).

    split: "train" / "test" / None (all). columns: array columns to read (default all; e.g. PBNet needs only
    ["pose", "eyes", "hubert"]), the scalar columns are always read. rng: shuffle the order of the videos.
    """
    files = shard_files(shards_dir, split)
    if rng is not None:
        files = [files[i] for i in rng.permutation(len(files))]
    read_columns = None if columns is None else list(SCALAR_COLUMNS) + [c for c in columns if c not in SCALAR_COLUMNS]
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1, columns=read_columns):
            for row in batch.to_pylist():
                if split is None or row["split"] == split:
                    yield decode_row(row)


def shard_files(shards_dir: str | Path, split: str | None = None) -> list[Path]:
    """The shard files of `split` ("train" / "test" / None = all), sorted; each file holds one video.

    The split of each video comes from index.json (or, without one, from the file's `split` column).
    """
    files = sorted((Path(shards_dir) / "shards").glob("*.parquet"))
    if split is None:
        return files
    index = Path(shards_dir) / "index.json"
    if index.is_file():
        videos = json.loads(index.read_text())["videos"]
        return [f for f in files if f.stem in videos and videos[f.stem]["split"] == split]
    return [f for f in files if split in pq.read_table(f, columns=["split"]).column("split").to_pylist()]


def decode_rows(rows: Iterable[Mapping]) -> Iterator[dict]:
    """Raw shard rows (e.g. `ray.train.get_dataset_shard("train").iter_rows()`) -> decoded rows."""
    for row in rows:
        yield decode_row(row)


def read_index(shards_dir: str | Path) -> dict:
    """The shards directory's index.json (videos, frame counts, identities, splits, settings)."""
    return json.loads((Path(shards_dir) / "index.json").read_text())


def lfg_pairs(rows: Iterable[dict], batch_size: int, rng: np.random.Generator, per_row: int = 4,
              drop_last: bool = True) -> Iterator[dict]:
    """LFG training pairs: source and driving frames drawn uniformly from the same segment.

    Yields {"source": (B,3,S,S), "driving": (B,3,S,S)} float32 in [0, 1], and "driving_lip_box" /
    "driving_eye_box" (B,6) float32 (the driving frame's boxes, pixels) when the rows have those columns.
    """
    boxes = ("lip_box", "eye_box")

    def samples():
        for row in rows:
            for _ in range(per_row):
                source, driving = rng.integers(0, row["num_frames"], size=2)
                yield (row["frames"][source], row["frames"][driving],
                       *(row[name][driving] if name in row else None for name in boxes))

    def collate(batch):
        sources, drivings, *per_box = zip(*batch)
        pairs = {"source": _images(np.stack(sources)), "driving": _images(np.stack(drivings))}
        for name, values in zip(boxes, per_box):
            if all(box is not None for box in values):
                pairs[f"driving_{name}"] = torch.from_numpy(np.stack(values).astype(np.float32))
        return pairs

    yield from _batches(samples(), batch_size, collate, drop_last)


def pbnet_windows(rows: Iterable[dict], batch_size: int, rng: np.random.Generator, window: int = PBNET_WINDOW,
                  per_row: int = 1, drop_last: bool = True) -> Iterator[dict]:
    """PBNet windows of `window` frames at a random start; shorter segments are zero-padded at the end.

    Yields {"pose": (B,W,6), "eyes": (B,W,2), "hubert": (B,W,1024) float32, "mask": (B,W) bool (False on
    padding)}.
    """
    def samples():
        for row in rows:
            num_frames = row["num_frames"]
            for _ in range(per_row):
                start = int(rng.integers(0, num_frames - window + 1)) if num_frames >= window else 0
                length = min(window, num_frames)
                sample = {name: _pad(row[name][start:start + length], window) for name in ("pose", "eyes", "hubert")}
                sample["mask"] = np.arange(window) < length
                yield sample

    def collate(batch):
        return {name: torch.from_numpy(np.stack([s[name] for s in batch]).astype(np.float32 if name != "mask" else bool))
                for name in ("pose", "eyes", "hubert", "mask")}

    yield from _batches(samples(), batch_size, collate, drop_last)


def a2v_clips(rows: Iterable[dict], batch_size: int, stage: int, rng: np.random.Generator, per_row: int = 1,
              stage1_frames: int = A2V_STAGE1_FRAMES, stage2_frames: tuple[int, int] = A2V_STAGE2_FRAMES,
              drop_last: bool = True) -> Iterator[dict]:
    """A2V-FDM clips for the two curriculum stages (paper §3.5).

    stage 1: K = stage1_frames (K' = 20) and the source frame is the clip's first frame.
    stage 2: K uniform in [K_min, K_max] (inclusive), drawn once per batch, and the source frame is any frame
    of the segment (inside or outside the clip). Segments shorter than K are skipped.

    Yields {"frames": (B,3,K,S,S), "source": (B,3,S,S) float in [0,1]; "hubert": (B,K,1024);
    "pose_delta": (B,K,6) and "eye_delta": (B,K,2), each frame minus the source frame (§3.3);
    "source_face_box": (B,6); "lip_box" and (when the rows have it) "eye_box": (B,K,6); "clip_start", "source_index": (B,) int64 frame indices in the
    segment; "num_frames": K (int)}.
    """
    if stage not in (1, 2):
        raise ValueError(f"A2V curriculum stage must be 1 or 2, got {stage}")
    k_min, k_max = stage2_frames

    def draw_length():
        return stage1_frames if stage == 1 else int(rng.integers(k_min, k_max + 1))

    batch, clip_frames = [], draw_length()
    for row in rows:
        num_frames = row["num_frames"]
        for _ in range(per_row):
            if num_frames < clip_frames:
                break
            start = int(rng.integers(0, num_frames - clip_frames + 1))
            source = start if stage == 1 else int(rng.integers(0, num_frames))
            batch.append(_a2v_sample(row, start, clip_frames, source))
            if len(batch) == batch_size:
                yield _a2v_collate(batch, clip_frames)
                batch, clip_frames = [], draw_length()
    if batch and not drop_last:
        yield _a2v_collate(batch, clip_frames)


def _a2v_sample(row: dict, start: int, length: int, source: int) -> dict:
    clip = slice(start, start + length)
    return {"frames": row["frames"][clip], "source": row["frames"][source], "hubert": row["hubert"][clip],
            "pose_delta": row["pose"][clip] - row["pose"][source], "eye_delta": row["eyes"][clip] - row["eyes"][source],
            "source_face_box": row["face_box"][source], "lip_box": row["lip_box"][clip],
            **({"eye_box": row["eye_box"][clip]} if "eye_box" in row else {}),
            "clip_start": start, "source_index": source}


def _a2v_collate(batch: list[dict], clip_frames: int) -> dict:
    stacked = {name: np.stack([s[name] for s in batch]) for name in batch[0]}
    out = {"frames": _images(stacked["frames"]), "source": _images(stacked["source"]), "num_frames": clip_frames}
    for name in ("hubert", "pose_delta", "eye_delta", "source_face_box", "lip_box", "eye_box"):
        if name in stacked:
            out[name] = torch.from_numpy(stacked[name].astype(np.float32))
    for name in ("clip_start", "source_index"):
        out[name] = torch.from_numpy(stacked[name].astype(np.int64))
    return out


def _images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S); uint8 (B, K, S, S, 3) -> float (B, 3, K, S, S); in [0, 1]."""
    channels_first = (0, 3, 1, 2) if pixels.ndim == 4 else (0, 4, 1, 2, 3)
    return torch.from_numpy(pixels).permute(*channels_first).float().div_(255.0)


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad the first (time) axis to `length`."""
    padding = [(0, length - len(values))] + [(0, 0)] * (values.ndim - 1)
    return np.pad(values, padding)


def _batches(samples: Iterable, batch_size: int, collate: Callable, drop_last: bool) -> Iterator[dict]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_last:
        yield collate(batch)
