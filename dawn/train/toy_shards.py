"""Toy training shards: a few short moving-pattern clips in the shard schema (docs/data_schema.md).

For smoke tests and throughput benchmarks of the training loop, where preprocessing real (or
`dawn.data.synth`) videos would cost minutes. Not a substitute for training data.

Each video is a smooth random texture (one "identity") moved by a known head motion: yaw/pitch become
small shifts, roll a rotation, scale a zoom, plus a dark "mouth" ellipse whose opening follows a random
speech envelope and two "eyes" that blink. The shard columns carry exactly those values (pose, eye
ratios, mouth opening, face and lip boxes), and HuBERT-like features are a fixed random projection of the
envelope plus noise, so audio features do carry the mouth motion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dawn.config import SAMPLE_RATE
from dawn.data.schema import HUBERT_DIM, SAMPLES_PER_FRAME, encode_segment, rows_to_table


def _smooth(rng: np.random.Generator, n: int, scale: float, width: int = 9) -> np.ndarray:
    """Random walk-free smooth curve: white noise low-passed with a Hann window, unit std * scale."""
    noise = rng.standard_normal(n + width)
    curve = np.convolve(noise, np.hanning(width), mode="same")[:n]
    return (curve / (curve.std() + 1e-8) * scale).astype(np.float32)


def toy_video(rng: np.random.Generator, frames: int, size: int, projection: np.ndarray) -> dict:
    """Arrays of one toy clip: frames (T, S, S, 3) uint8 and its per-frame annotations."""
    texture = F.interpolate(torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32)), size=(size, size),
                            mode="bicubic", align_corners=False).clamp(0, 1)[0]
    yaw, pitch, roll = _smooth(rng, frames, 4.0), _smooth(rng, frames, 3.0), _smooth(rng, frames, 2.0)
    scale = 1 + _smooth(rng, frames, 0.02)
    envelope = np.clip(_smooth(rng, frames, 0.5, width=5) + 0.4, 0, 1)
    blink = np.ones(frames, np.float32)
    for start in rng.integers(0, frames, size=max(1, frames // 40)):
        blink[start:start + 4] = 0.1
    eyes = np.stack([0.3 * blink, 0.3 * blink], 1).astype(np.float32)

    # Pixel grid in [-1, 1]; each frame samples the texture at the inverse head motion.
    coords = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.from_numpy(np.deg2rad(roll))[:, None, None]
    zoom = torch.from_numpy(scale)[:, None, None]
    tx = torch.from_numpy(yaw / 30)[:, None, None]
    ty = torch.from_numpy(pitch / 30)[:, None, None]
    gx = (torch.cos(angle) * x - torch.sin(angle) * y) / zoom - tx
    gy = (torch.sin(angle) * x + torch.cos(angle) * y) / zoom - ty
    image = F.grid_sample(texture.expand(frames, -1, -1, -1), torch.stack([gx, gy], -1), padding_mode="reflection",
                          align_corners=True)
    # Mouth ellipse (opening = envelope) and eyes (closed by blinks), moving with the head shift.
    mouth_x, mouth_y = tx, 0.45 + ty
    opening = torch.from_numpy(0.03 + 0.12 * envelope)[:, None, None]
    mouth = ((x - mouth_x) / 0.3) ** 2 + ((y - mouth_y) / opening) ** 2 < 1
    eye_open = torch.from_numpy(0.02 + 0.08 * blink)[:, None, None]
    eye = torch.zeros_like(mouth)
    for ex in (-0.35, 0.35):
        eye |= ((x - ex - tx) / 0.12) ** 2 + ((y + 0.3 - ty) / eye_open) ** 2 < 1
    image = torch.where((mouth | eye)[:, None], torch.tensor([0.15, 0.03, 0.03])[None, :, None, None], image)
    pixels = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    half = size / 2
    centre_x, centre_y = half * (1 + yaw / 30), half * (1 + pitch / 30)
    face_box = np.stack([centre_x - 0.7 * half, centre_x + 0.7 * half, centre_y - 0.8 * half,
                         centre_y + 0.8 * half, np.full(frames, size), np.full(frames, size)], 1)
    lip_box = np.stack([centre_x - 0.3 * half, centre_x + 0.3 * half, centre_y + 0.3 * half,
                        centre_y + 0.6 * half, np.full(frames, size), np.full(frames, size)], 1)
    eye_box = np.stack([centre_x - 0.5 * half, centre_x + 0.5 * half, centre_y - 0.4 * half,
                        centre_y - 0.2 * half, np.full(frames, size), np.full(frames, size)], 1)
    hubert = envelope[:, None] * projection[None] + 0.3 * rng.standard_normal((frames, HUBERT_DIM))
    t = np.arange(frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
    audio = np.repeat(envelope, SAMPLES_PER_FRAME) * np.sin(2 * np.pi * 220 * t) * 0.3
    return {
        "frames": pixels, "audio": audio.astype(np.float32), "hubert": hubert.astype(np.float32),
        "pose": np.stack([yaw, pitch, roll, 0.5 * scale, size / 2 + 0 * yaw, size / 2 + 0 * yaw], 1),
        "eyes": eyes, "mouth": (0.1 * envelope).astype(np.float32),
        "face_box": face_box.astype(np.float32), "lip_box": lip_box.astype(np.float32),
        "eye_box": eye_box.astype(np.float32), "found": np.ones(frames, np.uint8),
    }


def write_toy_shards(directory: str | Path, videos: int = 4, frames: int = 60, resolution: int = 64,
                     segment_frames: int | None = None, test_videos: int = 1, seed: int = 0) -> Path:
    """Write `videos` toy clips of `frames` frames as SHARDS/shards/<video_id>.parquet + index.json.

    The last `test_videos` go to the "test" split; segments are at most `segment_frames` long (default:
    one segment per video). Returns the shards directory.
    """
    import pyarrow.parquet as pq

    directory = Path(directory)
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal(HUBERT_DIM).astype(np.float32)
    segment_frames = segment_frames or frames
    videos_info = {}
    for v in range(videos):
        video_id, split = f"toy{v:03d}", "test" if v >= videos - test_videos else "train"
        arrays = toy_video(rng, frames, resolution, projection)
        rows = []
        for segment, start in enumerate(range(0, frames, segment_frames)):
            stop = min(frames, start + segment_frames)
            rows.append(encode_segment({
                "video_id": video_id, "identity": f"toy-identity-{v}", "split": split,
                "source_path": f"toy://{video_id}", "segment": segment, "start_frame": start,
                "num_frames": stop - start, "resolution": resolution,
                **{name: values[start * SAMPLES_PER_FRAME:stop * SAMPLES_PER_FRAME] if name == "audio"
                   else values[start:stop] for name, values in arrays.items()},
            }))
        pq.write_table(rows_to_table(rows), directory / "shards" / f"{video_id}.parquet", row_group_size=1)
        videos_info[video_id] = {"identity": f"toy-identity-{v}", "split": split, "source_path": f"toy://{video_id}",
                                 "segments": len(rows), "frames": frames}
    splits = {split: sorted(v for v, info in videos_info.items() if info["split"] == split)
              for split in ("train", "test")}
    index = {"settings": {"resolution": resolution, "segment_frames": segment_frames, "fps": 25,
                          "sample_rate": SAMPLE_RATE, "toy": True},
             "videos": videos_info, "splits": splits,
             "identities": sorted({info["identity"] for info in videos_info.values()}),
             "frames": {split: frames * len(ids) for split, ids in splits.items()}, "failed": 0}
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    return directory
