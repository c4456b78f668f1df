"""Shard schema round trip and the training readers (LFG pairs, PBNet windows, A2V curriculum clips) on
hand-made segments whose frame t is filled with the value t, so every sampled index can be read back."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dawn.data import readers
from dawn.data.schema import SCHEMA, array_shape, decode_row, encode_segment, rows_to_table

S = 8


def make_segment(num_frames: int, video: int = 0, split: str = "train", segment: int = 0) -> dict:
    """Segment with frames[t] = t (channel 1 = video number), pose[t] = t * (1..6), eyes[t] = (t, -t)."""
    t = np.arange(num_frames, dtype=np.float32)
    frames = np.zeros((num_frames, S, S, 3), np.uint8)
    frames[..., 0] = t[:, None, None]
    frames[..., 1] = video
    return {
        "video_id": f"v{video}", "identity": f"id{video}", "split": split, "source_path": f"/x/v{video}.mp4",
        "segment": segment, "start_frame": 0, "num_frames": num_frames, "resolution": S,
        "frames": frames,
        "audio": np.sin(np.arange(num_frames * 640, dtype=np.float32)),
        "hubert": np.tile(t[:, None], (1, 1024)) / 8,
        "pose": t[:, None] * np.arange(1, 7, dtype=np.float32),
        "eyes": np.stack([t, -t], 1),
        "mouth": t / 100,
        "face_box": np.tile(t[:, None], (1, 6)),
        "lip_box": np.tile(t[:, None] + 0.5, (1, 6)),
        "eye_box": np.tile(t[:, None] + 0.25, (1, 6)),
        "found": np.ones(num_frames, np.uint8),
    }


def decoded(num_frames: int, **kw) -> dict:
    return decode_row(encode_segment(make_segment(num_frames, **kw)))


def frame_index(images: torch.Tensor) -> torch.Tensor:
    """Recover t from images made by make_segment: (B,3,S,S) -> (B,), (B,3,K,S,S) -> (B,K)."""
    return torch.round(images[:, 0, ..., 0, 0] * 255).long()


def test_schema_round_trip_and_checks():
    seg = make_segment(30)
    row = encode_segment(seg)
    assert set(row) == set(SCHEMA.names)
    back = decode_row(row)
    for name in ("frames", "audio", "pose", "eyes", "mouth", "face_box", "lip_box", "eye_box", "found"):
        np.testing.assert_array_equal(back[name], seg[name])
        assert back[name].shape == array_shape(name, 30, S)
    assert back["hubert"].dtype == np.float16
    np.testing.assert_allclose(back["hubert"], seg["hubert"], rtol=1e-3)
    assert back["num_frames"] == 30 and back["video_id"] == "v0"
    # through a Parquet table and back
    table = rows_to_table([row])
    assert table.schema.equals(SCHEMA)
    np.testing.assert_array_equal(decode_row(table.to_pylist()[0])["pose"], seg["pose"])
    bad = dict(seg, pose=seg["pose"][:, :5])
    with pytest.raises(ValueError, match="pose"):
        encode_segment(bad)


def test_iter_shard_rows_filters_split_and_columns(tmp_path):
    (tmp_path / "shards").mkdir()
    for video, split in [(0, "train"), (1, "test"), (2, "train")]:
        rows = [encode_segment(make_segment(12, video=video, split=split, segment=i)) for i in range(2)]
        pq.write_table(rows_to_table(rows), tmp_path / "shards" / f"v{video}.parquet")
    train = list(readers.iter_shard_rows(tmp_path, split="train"))
    assert [(r["video_id"], r["segment"]) for r in train] == [("v0", 0), ("v0", 1), ("v2", 0), ("v2", 1)]
    test = list(readers.iter_shard_rows(tmp_path, split="test", columns=["pose"]))
    assert [r["video_id"] for r in test] == ["v1", "v1"]
    assert "frames" not in test[0] and test[0]["pose"].shape == (12, 6)
    shuffled = {r["video_id"] for r in readers.iter_shard_rows(tmp_path, rng=np.random.default_rng(0))}
    assert shuffled == {"v0", "v1", "v2"}


def test_lfg_pairs_come_from_one_segment():
    rows = [decoded(50, video=v) for v in range(5)]
    batches = list(readers.lfg_pairs(rows, batch_size=4, rng=np.random.default_rng(0), per_row=4))
    assert len(batches) == 5
    for batch in batches:
        assert batch["source"].shape == batch["driving"].shape == (4, 3, S, S)
        assert batch["source"].dtype == torch.float32
        assert 0 <= batch["source"].min() and batch["source"].max() <= 1
        # channel 1 holds the video number: source and driving come from the same video
        torch.testing.assert_close(batch["source"][:, 1], batch["driving"][:, 1])
    indices = torch.cat([frame_index(b["driving"]) for b in batches])
    assert indices.min() >= 0 and indices.max() < 50 and len(indices.unique()) > 5
    without = [{k: v for k, v in row.items() if k != "lip_box"} for row in rows]
    assert "driving_lip_box" not in next(readers.lfg_pairs(without, 4, np.random.default_rng(0)))


def test_lfg_pairs_carry_the_driving_frames_lip_and_eye_boxes():
    rows = [decoded(50, video=v) for v in range(2)]
    for row in rows:
        row["lip_box"] = np.arange(50, dtype=np.float32)[:, None].repeat(6, 1)  # the frame number
        row["eye_box"] = row["lip_box"] + 100
    batch = next(readers.lfg_pairs(rows, batch_size=4, rng=np.random.default_rng(0), per_row=4))
    assert batch["driving_lip_box"].shape == (4, 6) and batch["driving_lip_box"].dtype == torch.float32
    torch.testing.assert_close(batch["driving_lip_box"][:, 0], frame_index(batch["driving"]).float())
    torch.testing.assert_close(batch["driving_eye_box"][:, 0], frame_index(batch["driving"]).float() + 100)


def test_pbnet_windows_crop_long_and_pad_short_segments():
    rng = np.random.default_rng(1)
    batch = next(readers.pbnet_windows([decoded(260), decoded(150)], batch_size=2, rng=rng, window=200))
    assert batch["pose"].shape == (2, 200, 6) and batch["eyes"].shape == (2, 200, 2)
    assert batch["hubert"].shape == (2, 200, 1024) and batch["hubert"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool
    # long segment: 200 consecutive frames, all valid
    start = batch["pose"][0, 0, 0]
    torch.testing.assert_close(batch["pose"][0, :, 0], start + torch.arange(200.0))
    assert 0 <= start <= 60 and batch["mask"][0].all()
    # short segment: its 150 frames then zero padding, masked out
    assert batch["mask"][1, :150].all() and not batch["mask"][1, 150:].any()
    torch.testing.assert_close(batch["pose"][1, :150, 0], torch.arange(150.0))
    assert (batch["pose"][1, 150:] == 0).all() and (batch["hubert"][1, 150:] == 0).all()


def test_a2v_stage1_clips_start_at_the_source_frame():
    rows = [decoded(60, video=v) for v in range(8)]
    batches = list(readers.a2v_clips(rows, batch_size=4, stage=1, rng=np.random.default_rng(2)))
    assert len(batches) == 2
    for batch in batches:
        assert batch["num_frames"] == 20
        assert batch["frames"].shape == (4, 3, 20, S, S) and batch["source"].shape == (4, 3, S, S)
        assert batch["hubert"].shape == (4, 20, 1024) and batch["lip_box"].shape == (4, 20, 6)
        torch.testing.assert_close(batch["source"], batch["frames"][:, :, 0])
        assert (batch["source_index"] == batch["clip_start"]).all()
        assert (batch["pose_delta"][:, 0] == 0).all() and (batch["eye_delta"][:, 0] == 0).all()
        # consecutive frames in the clip
        torch.testing.assert_close(frame_index(batch["frames"]), batch["clip_start"][:, None] + torch.arange(20))


def test_a2v_stage2_lengths_sources_and_deltas():
    rng = np.random.default_rng(3)
    rows = (decoded(100, video=v % 7) for v in range(400))
    lengths, outside = set(), 0
    for batch in readers.a2v_clips(rows, batch_size=2, stage=2, rng=rng):
        k = batch["num_frames"]
        lengths.add(k)
        assert batch["frames"].shape == (2, 3, k, S, S) and batch["pose_delta"].shape == (2, k, 6)
        src, start = batch["source_index"], batch["clip_start"]
        assert ((0 <= src) & (src < 100)).all()
        torch.testing.assert_close(frame_index(batch["source"]), src)
        frame_t = frame_index(batch["frames"])
        torch.testing.assert_close(frame_t, start[:, None] + torch.arange(k))
        # deltas relative to the source frame: pose[t] = t * (1..6), eyes[t] = (t, -t)
        dt = (frame_t - src[:, None]).float()
        torch.testing.assert_close(batch["pose_delta"], dt[..., None] * torch.arange(1.0, 7.0))
        torch.testing.assert_close(batch["eye_delta"], torch.stack([dt, -dt], -1))
        torch.testing.assert_close(batch["source_face_box"], src[:, None].float().expand(2, 6))
        outside += int(((src < start) | (src >= start + k)).sum())
    assert lengths <= set(range(30, 41)) and {30, 40} <= lengths
    assert outside > 0


def test_a2v_skips_segments_shorter_than_the_clip():
    rows = [decoded(25), decoded(45), decoded(10), decoded(45)]
    batches = list(readers.a2v_clips(rows, batch_size=2, stage=1, rng=np.random.default_rng(4)))
    assert len(batches) == 1 and batches[0]["frames"].shape[0] == 2
    batches = list(readers.a2v_clips([decoded(10)], batch_size=2, stage=2, rng=np.random.default_rng(4),
                                     drop_last=False))
    assert batches == []
