"""The preprocessing job end to end on a local Ray: 6 synthetic talking-head videos and 3 broken files in,
shards + failures table + index out; a rerun does nothing; measured pose and mouth track the generator's
ground truth."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dawn.data.preprocess import assign_split, list_videos
from dawn.data.readers import a2v_clips, decode_rows, iter_shard_rows, read_index

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SETTINGS = dict(resolution=128, segment_frames=40, test_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 generated videos (3 s, 128 px) under synth/, 3 broken files under broken/, a random HuBERT."""
    from dawn.audio import save_random_hubert
    from dawn.data.synth import generate_corpus
    from dawn.video import read_video, write_mp4

    root = tmp_path_factory.mktemp("preprocess")
    videos = generate_corpus(root / "corpus" / "synth", videos=6, seconds=3.0, seed=0, size=128, workers=2,
                             progress=False)
    broken = root / "corpus" / "broken"
    broken.mkdir()
    data = videos[0].read_bytes()
    (broken / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (broken / "notes.mp4").write_text("this is not a video\n")
    frames, _ = read_video(videos[0])
    write_mp4(broken / "silent.mp4", frames, audio=None)
    return {"root": root, "input": root / "corpus", "videos": videos, "hubert": save_random_hubert(root / "hubert")}


@pytest.fixture(scope="module")
def first_run(corpus):
    import ray

    from dawn.data.preprocess_job import PreprocessSettings, run_preprocess

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        output = corpus["root"] / "shards"
        summary = run_preprocess(corpus["input"], output, corpus["hubert"], PreprocessSettings(**SETTINGS))
        rows = list(decode_rows(ray.data.read_parquet(str(output / "shards")).iter_rows()))
    finally:
        ray.shutdown()
    return {"output": output, "summary": summary, "ray_rows": rows}


def test_shards_for_good_videos_and_failures_for_broken_ones(corpus, first_run):
    output, summary = first_run["output"], first_run["summary"]
    assert (summary.videos, summary.processed, summary.succeeded, summary.failed) == (9, 9, 6, 3)
    listed = {Path(v.path).name: v for v in list_videos(corpus["input"])}
    good = [listed[p.name] for p in corpus["videos"]]
    assert sorted(p.stem for p in (output / "shards").iterdir()) == sorted(v.video_id for v in good)

    failures = {Path(r["path"]).name: r for r in pq.read_table(output / "failures.parquet").to_pylist()}
    assert {name: r["stage"] for name, r in failures.items()} == {
        "truncated.mp4": "decode", "notes.mp4": "decode", "silent.mp4": "audio"}
    assert "no audio" in failures["silent.mp4"]["reason"]
    assert all(name in r["reason"] for name, r in failures.items())

    index = read_index(output)
    assert set(index["videos"]) == {v.video_id for v in good} and index["failed"] == 3
    assert index["settings"]["resolution"] == 128
    for video in good:
        entry = index["videos"][video.video_id]
        sidecar = json.loads(Path(video.path).with_suffix(".json").read_text())
        assert entry["identity"] == video.identity == sidecar["identity"]
        assert entry["split"] == assign_split(video.identity, SETTINGS["test_fraction"], SETTINGS["seed"])
        assert abs(entry["frames"] - sidecar["num_frames"]) <= 1
        assert entry["segments"] == math.ceil(entry["frames"] / SETTINGS["segment_frames"]) >= 2
    assert sorted(index["splits"]["train"] + index["splits"]["test"]) == sorted(index["videos"])


def test_rows_have_the_schema_shapes(first_run):
    rows = list(iter_shard_rows(first_run["output"]))
    segments = sum(v["segments"] for v in read_index(first_run["output"])["videos"].values())
    assert len(rows) == len(first_run["ray_rows"]) == segments
    for row in rows:
        t = row["num_frames"]
        assert row["frames"].shape == (t, 128, 128, 3) and row["audio"].shape == (t * 640,)
        assert row["hubert"].shape == (t, 1024) and np.isfinite(row["hubert"]).all()
        assert row["pose"].shape == (t, 6) and row["eyes"].shape == (t, 2) and row["mouth"].shape == (t,)
        assert row["found"].mean() > 0.9 and row["frames"].std() > 10
        assert (row["face_box"][:, 4:] == 128).all() and (row["face_box"][:, 0] < row["face_box"][:, 1]).all()
    # consecutive segments of a video tile its frames
    by_video = {}
    for row in rows:
        by_video.setdefault(row["video_id"], []).append((row["start_frame"], row["num_frames"]))
    for segments in by_video.values():
        starts, lengths = np.array(sorted(segments)).T
        assert starts[0] == 0 and (starts[1:] == starts[:-1] + lengths[:-1]).all()
        assert lengths.max() <= SETTINGS["segment_frames"] and lengths.max() - lengths.min() <= 1
    batch = next(a2v_clips(rows, batch_size=4, stage=1, rng=np.random.default_rng(0)))
    assert batch["frames"].shape == (4, 3, 20, 128, 128)


def test_measures_track_the_ground_truth(corpus, first_run):
    """Within-video correlation with the sidecar: 1 frame of misalignment drops the mouth's below 0.7."""
    rows = sorted(iter_shard_rows(first_run["output"]), key=lambda r: (r["video_id"], r["segment"]))
    measured, truth = {"yaw": [], "mouth": []}, {"yaw": [], "mouth": []}
    by_id = {v.video_id: v for v in list_videos(corpus["input"])}
    for video_id in sorted({r["video_id"] for r in rows}):
        mine = [r for r in rows if r["video_id"] == video_id]
        yaw, mouth = np.concatenate([r["pose"][:, 0] for r in mine]), np.concatenate([r["mouth"] for r in mine])
        sidecar = json.loads(Path(by_id[video_id].path).with_suffix(".json").read_text())["frames"]
        true_yaw, true_mouth = np.array(sidecar["pose"])[:len(yaw), 0], np.array(sidecar["mouth_opening"])[:len(yaw)]
        for name, a, b in (("yaw", yaw, true_yaw), ("mouth", mouth, true_mouth)):
            measured[name].append(a - a.mean())
            truth[name].append(b - b.mean())
    for name in ("yaw", "mouth"):
        r = np.corrcoef(np.concatenate(measured[name]), np.concatenate(truth[name]))[0, 1]
        assert r >= 0.9, f"{name}: correlation {r:.3f} with the generator's ground truth"


def test_rerun_does_no_new_work(corpus, first_run):
    output = first_run["output"]
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    result = subprocess.run(
        [sys.executable, "jobs/preprocess.py", "--input", str(corpus["input"]), "--output", str(output),
         "--hubert", str(corpus["hubert"]), "--resolution", "128", "--segment-frames", "40",
         "--test-fraction", "0.5", "--num-cpus", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "9 already done, 0 processed" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before
    changed = subprocess.run(
        [sys.executable, "jobs/preprocess.py", "--input", str(corpus["input"]), "--output", str(output),
         "--hubert", str(corpus["hubert"]), "--resolution", "256"], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert changed.returncode == 2 and "resolution 128 -> 256" in changed.stderr
