"""Corpus listing, identity split, 25 fps frame mapping, interpolation, segmentation and shard writing."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dawn import DawnError
from dawn.data.preprocess import (assign_split, interpolate_missing, list_videos, make_video_id, resample_indices,
                                  segment_bounds, write_shard)
from dawn.data.schema import decode_row, encode_segment


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_videos_from_a_folder(tmp_path):
    for name in ["alice/a1.mp4", "alice/a2.MOV", "bob/clip.mkv", "solo.avi", "x.flv", "notes.txt", "bob/c.wav"]:
        touch(tmp_path / name)
    videos = list_videos(tmp_path)
    assert [(Path(v.path).relative_to(tmp_path).as_posix(), v.identity) for v in videos] == [
        ("alice/a1.mp4", "alice"), ("alice/a2.MOV", "alice"), ("bob/clip.mkv", "bob"), ("solo.avi", "solo"),
        ("x.flv", "x")]
    assert videos[0].video_id == make_video_id("alice/a1.mp4") and videos[0].video_id.startswith("a1-")
    assert len({v.video_id for v in videos}) == 5
    # ids depend on the path inside the corpus, not on where the corpus lies
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    assert [v.video_id for v in list_videos(moved)] == [v.video_id for v in videos]


def test_list_videos_from_manifests(tmp_path):
    touch(tmp_path / "v" / "one.mp4")
    (tmp_path / "m.csv").write_text("path,identity\nv/one.mp4,spk1\n/abs/two.mp4,\nv/one.mp4,spk1\n")
    videos = list_videos(tmp_path / "m.csv")
    assert [(v.path, v.identity) for v in videos] == [("/abs/two.mp4", "abs"), (str(tmp_path / "v/one.mp4"), "spk1")]
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "v/one.mp4"}) + "\n\n" + json.dumps({"path": "three.mov"}))
    assert [(v.identity) for v in list_videos(tmp_path / "m.jsonl")] == ["three", "v"]
    (tmp_path / "bad.jsonl").write_text('{"identity": "x"}\n')
    with pytest.raises(DawnError, match="no 'path'"):
        list_videos(tmp_path / "bad.jsonl")
    with pytest.raises(DawnError, match="not found"):
        list_videos(tmp_path / "missing")


def test_assign_split_is_deterministic_by_identity():
    identities = [f"speaker{i}" for i in range(2000)]
    splits = [assign_split(i, 0.2, seed=0) for i in identities]
    assert splits == [assign_split(i, 0.2, seed=0) for i in identities]
    assert 0.17 < splits.count("test") / len(splits) < 0.23
    assert splits != [assign_split(i, 0.2, seed=1) for i in identities]
    assert {assign_split(i, 0.0) for i in identities} == {"train"}
    assert {assign_split(i, 1.0) for i in identities} == {"test"}


def test_resample_indices_to_25_fps():
    np.testing.assert_array_equal(resample_indices(50, 25.0), np.arange(50))
    thirty = resample_indices(60, 30.0)  # 2 s -> 50 frames, nearest source frame to i / 25 s
    assert len(thirty) == 50 and thirty[0] == 0 and thirty[-1] == 59
    np.testing.assert_array_equal(thirty[:6], [0, 1, 2, 4, 5, 6])
    fifteen = resample_indices(30, 15.0)  # upsampling repeats frames
    assert len(fifteen) == 50 and np.all(np.diff(fifteen) >= 0) and fifteen.max() == 29
    assert len(resample_indices(1001, 29.97)) == int(1001 * 25 / 29.97)


def test_interpolate_missing_and_segments():
    values = np.array([[0, 10], [99, 99], [2, 30], [99, 99], [99, 99]], np.float32)
    found = np.array([True, False, True, False, False])
    np.testing.assert_allclose(interpolate_missing(values, found), [[0, 10], [1, 20], [2, 30], [2, 30], [2, 30]])
    assert segment_bounds(1000, 500) == [(0, 500), (500, 1000)]
    assert segment_bounds(1001, 500) == [(0, 334), (334, 667), (667, 1001)]
    assert segment_bounds(30, 500) == [(0, 30)]


def test_write_shard_is_atomic_and_readable(tmp_path):
    from tests.unit.test_readers import make_segment

    rows = [encode_segment(make_segment(12, segment=i)) for i in range(3)]
    path = write_shard(rows, tmp_path / "shards" / "v0.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["v0.parquet"]  # no temporary file left
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    back = [decode_row(r) for r in pq.read_table(path).to_pylist()]
    assert [r["segment"] for r in back] == [0, 1, 2]
    np.testing.assert_array_equal(back[1]["frames"], make_segment(12)["frames"])
    with pytest.raises(ValueError):
        write_shard([{"video_id": 1}], tmp_path / "shards" / "bad.parquet")
    assert not (tmp_path / "shards" / "bad.parquet").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["v0.parquet"]


@pytest.mark.parametrize("fps, side, frames, stage", [(5, 96, 20, "fps"), (25, 48, 50, "size"),
                                                       (25, 96, 12, "duration")])
def test_preprocess_video_rejects_odd_videos(tmp_path, fps, side, frames, stage):
    from dawn.data.preprocess import PreprocessError, preprocess_video
    from dawn.video import write_mp4

    path = write_mp4(tmp_path / "odd.mp4", np.zeros((frames, side, side, 3), np.uint8), fps=fps,
                     audio=np.zeros(16000 * frames // fps, np.float32))
    with pytest.raises(PreprocessError, match=str(path)) as caught:
        preprocess_video(path, 64, hubert_extractor=None)
    assert caught.value.stage == stage
    with pytest.raises(PreprocessError) as caught:
        preprocess_video(tmp_path / "missing.mp4", 64, hubert_extractor=None)
    assert caught.value.stage == "decode"
