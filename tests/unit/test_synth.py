"""dawn.data.synth: well-formed mp4 + sidecar files, a mouth that really follows the speech, a head pose that
dawn.face measures back, blinks, and reruns that skip finished videos."""

import json

import numpy as np
import pytest

from dawn import face
from dawn.audio import load_audio, speech_envelope
from dawn.cli import main as dawn_main
from dawn.data import synth
from dawn.data.tts import VOICES
from dawn.video import probe, read_video

SECONDS, SIZE, SEED = 2.5, 128, 3


def correlation(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0, 1])


def sidecar(mp4):
    return json.loads(mp4.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = synth.generate_corpus(out, videos=2, seconds=SECONDS, seed=SEED, size=SIZE, workers=1, progress=False)
    return out, paths


@pytest.fixture(scope="module")
def measured(corpus):
    """dawn.face's analysis of the decoded frames of each video (what the preprocessing job sees)."""
    return [face.analyze_video_frames(read_video(mp4)[0]) for mp4 in corpus[1]]


def test_files_streams_and_sidecar_lengths(corpus):
    out, paths = corpus
    assert [p.relative_to(out).as_posix() for p in paths] == ["astronaut/synth_00000.mp4",
                                                             "grace_hopper/synth_00001.mp4"]
    for mp4 in paths:
        info, meta = probe(mp4), sidecar(mp4)
        assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
        assert info["fps"] == 25 and info["width"] == info["height"] == SIZE
        assert info["frames"] == round(meta["duration"] * 25) == meta["num_frames"]
        assert abs(info["audio_duration"] - meta["duration"]) < 0.1
        assert SECONDS - 0.5 <= meta["duration"] <= SECONDS + 1.5
        assert meta["identity"] == mp4.parent.name and meta["voice"] in VOICES and meta["text"]
        frames = meta["frames"]
        for name, width in [("speech_envelope", None), ("mouth_drive", None), ("eye_closure", None),
                            ("mouth_opening", None), ("eye_ratios", 2), ("pose", 6), ("pose_applied", 6),
                            ("face_box", 6)]:
            values = np.asarray(frames[name])
            assert values.shape == ((meta["num_frames"],) if width is None else (meta["num_frames"], width)), name
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [{"path": p.relative_to(out).as_posix(), "identity": p.parent.name} for p in paths]


def test_mouth_follows_the_speech(corpus, measured):
    for mp4, analysis in zip(corpus[1], measured):
        meta = sidecar(mp4)
        truth = np.asarray(meta["frames"]["mouth_opening"])
        envelope = speech_envelope(load_audio(mp4), meta["num_frames"])  # from the decoded AAC track
        assert correlation(truth, envelope) > 0.8
        assert truth.max() - truth.min() > 0.2  # clearly opens and closes
        assert analysis["found"].all()
        assert correlation(analysis["mouth_opening"], truth) > 0.9


def test_blinks_close_the_eyes(corpus, measured):
    for mp4, analysis in zip(corpus[1], measured):
        frames = sidecar(mp4)["frames"]
        closure, ratios = np.asarray(frames["eye_closure"]), np.asarray(frames["eye_ratios"])
        assert closure.max() > 0.5  # a blink at ~0.3/s within 2.5 s (fixed seed)
        closed, open_ = closure > 0.5, closure == 0
        assert (ratios[closed] < 0.6 * ratios[open_].mean(0)).all()  # ground truth: lids (nearly) shut
        # mediapipe (tracking mode, 128 px) sees the eyes close, if less than fully
        assert analysis["eye_ratios"][closed].mean() < 0.8 * analysis["eye_ratios"][open_].mean()


def test_head_pose_is_rendered_as_recorded():
    """A pose sweep rendered by the rig: the ground truth equals the applied angles (relative to the portrait),
    and dawn.face measures yaw, pitch and roll back from the frames."""
    rig = synth.build_rig(synth.load_portrait(synth.IDENTITIES[0]), SIZE)
    seconds = np.arange(50) / 25
    pose = np.zeros((50, 6), dtype=np.float32)
    pose[:, 0] = 10 * np.sin(2 * np.pi * 0.5 * seconds)
    pose[:, 1] = 5 * np.sin(2 * np.pi * 0.7 * seconds + 2)
    pose[:, 2] = 6 * np.sin(2 * np.pi * 0.35 * seconds + 1)
    pose[:, 3] = 1
    opening = (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * seconds)).astype(np.float32)
    closure = np.zeros(50, dtype=np.float32)
    frames = synth.render_frames(rig, opening, closure, pose)
    assert frames.shape == (50, SIZE, SIZE, 3) and frames.dtype == np.uint8
    truth = face.head_pose_batch(synth.ground_truth_landmarks(rig, opening, closure, pose))
    rest = face.head_pose(synth.ground_truth_landmarks(rig, [0.0], [0.0], [[0, 0, 0, 1, 0, 0]])[0])
    np.testing.assert_allclose(truth[:, :3] - rest[:3], pose[:, :3], atol=0.5)
    analysis = face.analyze_video_frames(frames)
    for angle in range(3):
        assert correlation(analysis["pose"][:, angle], truth[:, angle]) > 0.9, angle


def test_rerun_skips_finished_videos_and_is_deterministic(corpus, tmp_path):
    out, paths = corpus
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl")
    before = {p: p.stat().st_mtime_ns for p in files}
    again = synth.generate_corpus(out, videos=2, seconds=SECONDS, seed=SEED, size=SIZE, workers=2, progress=False)
    assert again == paths
    assert sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl") == files
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # The same (seed, index) gives the same bytes.
    copy = synth.generate_video(tmp_path, 1, SEED, SECONDS, SIZE)
    assert copy.read_bytes() == paths[1].read_bytes()
    assert copy.with_suffix(".json").read_text() == paths[1].with_suffix(".json").read_text()


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert dawn_main(["synth-corpus", "--out", str(tmp_path), "--videos", "0", "--seconds", "2"]) == 2
    assert "--videos" in capsys.readouterr().err
    assert dawn_main(["synth-corpus", "--out", str(tmp_path), "--videos", "1", "--seconds", "2",
                      "--size", "130"]) == 2
