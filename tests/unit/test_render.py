"""`dawn render`: portrait + speech -> mp4, driving-video poses, and clear errors for bad input."""

import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from dawn.cli import main
from dawn.render import init_checkpoints

STEPS = "2"  # sampling steps: the test checks plumbing and file format, not quality


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return init_checkpoints(tmp_path_factory.mktemp("ckpt"), preset="tiny", seed=0)


def render(checkpoints, portrait, audio, out, *extra):
    return main(["render", "--checkpoints", str(checkpoints), "--portrait", str(portrait), "--audio", str(audio),
                 "--out", str(out), "--steps", STEPS, "--quiet", *extra])


def test_render_writes_h264_mp4_with_audio_of_the_same_duration(checkpoints, astronaut_png, speech_wav, tmp_path):
    from dawn.audio import load_audio
    from dawn.video import probe, read_video

    out = tmp_path / "out.mp4"
    assert render(checkpoints, astronaut_png, speech_wav, out, "--seed", "3") == 0
    duration = len(load_audio(speech_wav)) / 16000
    info = probe(out)
    assert info["frames"] == round(25 * duration)
    assert info["fps"] == 25 and info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["width"] == info["height"] == 64  # the tiny preset renders 64 x 64
    assert abs(info["audio_duration"] - info["duration"]) < 0.1
    frames, _ = read_video(out)
    assert frames.shape == (round(25 * duration), 64, 64, 3)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_pose_from_video_feeds_the_measured_pose_and_blinks(checkpoints, astronaut, speech_wav, tmp_path):
    """The pose/blink part of the A2V-FDM condition equals what dawn.face measures on the driving video."""
    from dawn.audio import load_audio
    from dawn.data.synth import generate_corpus
    from dawn.face import analyze_video_frames
    from dawn.pipeline import RenderOptions, RenderPipeline, RenderState, load_pose_frames

    driving = generate_corpus(tmp_path / "corpus", videos=1, seconds=2, seed=1, size=128, progress=False)[0]
    pipeline = RenderPipeline.from_checkpoints(checkpoints)
    seen = []
    denoiser = pipeline.a2v.denoiser
    pipeline.a2v.denoiser = lambda features, cond: seen.append(cond.clone()) or denoiser(features, cond)

    frames = load_pose_frames(driving)
    state = RenderState(options=RenderOptions(steps=1), image=astronaut, waveform=load_audio(speech_wav))
    state.pose_track = pipeline.measure_pose_track(frames)
    state = pipeline.render(state)
    cond = seen[0][0].numpy()
    t = cond.shape[0]
    measured = analyze_video_frames(frames)
    index = np.minimum(np.arange(t), len(frames) - 1)  # a driving video shorter than the speech holds its last frame
    portrait = state.portrait
    np.testing.assert_allclose(cond[:, 1024:1030], measured["pose"][index] - portrait.pose, atol=1e-4)
    np.testing.assert_allclose(cond[:, 1030:1032], measured["eye_ratios"][index] - portrait.eyes, atol=1e-5)


def test_several_faces_use_the_largest_and_say_so(checkpoints, astronaut, tmp_path, capsys):
    from dawn.data.tts import synthesize_speech

    canvas = np.full((512, 912, 3), 255, np.uint8)
    canvas[:, :512] = astronaut
    canvas[56:456, 512:912] = cv2.resize(astronaut, (400, 400))  # the same face, smaller, on the right
    portrait = tmp_path / "two.png"
    Image.fromarray(canvas).save(portrait)
    speech = synthesize_speech("Hi.", tmp_path / "hi.wav")
    assert render(checkpoints, portrait, speech, tmp_path / "out.mp4") == 0
    assert "largest" in capsys.readouterr().err


@pytest.fixture()
def bad_inputs(tmp_path, astronaut_png, speech_wav, checkpoints):
    """name -> (portrait, audio, checkpoints, text the error must contain)."""
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(blank)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    not_audio = tmp_path / "speech.wav"
    not_audio.write_text("this is not audio")
    empty_audio = tmp_path / "empty.wav"
    empty_audio.write_bytes(b"")
    import soundfile

    too_short = tmp_path / "short.wav"
    soundfile.write(too_short, np.zeros(100, np.float32), 16000)
    missing_ckpt = tmp_path / "no_ckpt"
    missing_ckpt.mkdir()
    mismatched = tmp_path / "mismatched"
    shutil.copytree(checkpoints, mismatched)
    meta = json.loads((mismatched / "a2v.json").read_text())
    meta["config"]["image_size"] = 128  # an A2V-FDM for 128 px next to a 64 px LFG
    (mismatched / "a2v.json").write_text(json.dumps(meta))
    return {
        "no face": (blank, speech_wav, checkpoints, "no face"),
        "not an image": (not_image, speech_wav, checkpoints, "notes.png"),
        "unreadable audio": (astronaut_png, not_audio, checkpoints, "speech.wav"),
        "zero-length audio": (astronaut_png, empty_audio, checkpoints, "empty.wav"),
        "shorter than a frame": (astronaut_png, too_short, checkpoints, "short.wav"),
        "missing checkpoints": (astronaut_png, speech_wav, missing_ckpt, "missing"),
        "mismatched checkpoints": (astronaut_png, speech_wav, mismatched, "do not fit"),
        "missing portrait": (tmp_path / "nowhere.png", speech_wav, checkpoints, "nowhere.png"),
    }


def test_bad_inputs_give_one_clear_error_and_no_output(bad_inputs, tmp_path, capsys):
    for name, (portrait, audio, ckpt, expected) in bad_inputs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.mp4"
        code = render(ckpt, portrait, audio, out)
        err = capsys.readouterr().err
        assert code != 0, name
        assert expected in err and "Traceback" not in err, f"{name}: {err}"
        assert err.strip().count("\n") == 0, f"{name}: expected one line, got {err}"
        assert not out.exists(), name


def test_quiet_render_prints_only_the_result(checkpoints, astronaut_png, speech_wav, tmp_path):
    """`dawn render --quiet` in a fresh process: no mediapipe / TensorFlow Lite start-up lines on stderr,
    one line on stdout."""
    import subprocess
    import sys

    out = tmp_path / "out.mp4"
    proc = subprocess.run([sys.executable, "-m", "dawn.cli", "render", "--checkpoints", str(checkpoints),
                           "--portrait", str(astronaut_png), "--audio", str(speech_wav), "--out", str(out),
                           "--steps", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"wrote {out}:") and proc.stdout.count("\n") == 1
