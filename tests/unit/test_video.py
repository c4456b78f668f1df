"""dawn.video: H.264/AAC mp4 round trip, odd sizes, batches, atomic writes, unreadable files."""

import numpy as np
import pytest

from dawn import DawnError
from dawn.audio import load_audio
from dawn.video import probe, read_video, write_mp4


def gradient_frames(num: int, height: int = 64, width: int = 80) -> np.ndarray:
    """Smooth moving gradients (compress well, so decoded frames stay close to the originals)."""
    ys, xs = np.mgrid[0:height, 0:width]
    t = np.arange(num)[:, None, None]
    red = (xs[None] * 3 + t * 4) % 256
    green = (ys[None] * 3 + t * 2) % 256
    blue = np.broadcast_to(128 + 0 * t, red.shape)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)


def test_round_trip_with_audio(tmp_path):
    frames = gradient_frames(30)
    path = write_mp4(tmp_path / "clip.mp4", frames, audio=tone(1.7))  # longer audio is cut to 1.2 s
    info = probe(path)
    assert info["frames"] == 30 and info["fps"] == 25.0 and (info["width"], info["height"]) == (80, 64)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["has_audio"]
    assert info["duration"] == pytest.approx(1.2)
    assert info["audio_duration"] == pytest.approx(1.2, abs=0.07)
    decoded, fps = read_video(path)
    assert decoded.shape == (30, 64, 80, 3) and decoded.dtype == np.uint8 and fps == 25.0
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    audio = load_audio(path)
    assert len(audio) / 16000 == pytest.approx(1.2, abs=0.07)
    assert np.argmax(np.abs(np.fft.rfft(audio[:16000]))) == 440  # the tone survives AAC


def test_short_audio_is_padded_and_batches_equal_one_array(tmp_path):
    frames = gradient_frames(50, 31, 45)  # odd sides are padded to even ones
    batches = (frames[i:i + 7] for i in range(0, 50, 7))
    info = probe(write_mp4(tmp_path / "batched.mp4", batches, audio=tone(0.5)))
    assert info["frames"] == 50 and (info["width"], info["height"]) == (46, 32)
    assert info["audio_duration"] == pytest.approx(2.0, abs=0.07)
    batched, _ = read_video(tmp_path / "batched.mp4")
    whole, _ = read_video(write_mp4(tmp_path / "whole.mp4", frames, audio=tone(0.5)))
    assert batched.shape == whole.shape == (50, 32, 46, 3)  # x264 output is not bit-reproducible
    for decoded in (batched, whole):
        assert np.abs(decoded[:, :31, :45].astype(int) - frames).mean() < 3
        assert np.abs(decoded[:, 31].astype(int) - decoded[:, 30]).mean() < 3  # replicated bottom row
    assert not probe(write_mp4(tmp_path / "silent.mp4", frames[:5]))["has_audio"]


def test_failed_write_leaves_nothing(tmp_path):
    good = write_mp4(tmp_path / "out.mp4", gradient_frames(10))
    before = good.read_bytes()

    def failing():
        yield gradient_frames(10)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_mp4(tmp_path / "out.mp4", failing(), audio=tone(1.0))
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_mp4(tmp_path / "new.mp4", failing())
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "float.mp4", gradient_frames(3).astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary file, no partial file
    assert good.read_bytes() == before


def test_unreadable_videos_raise_dawn_error(tmp_path):
    data = write_mp4(tmp_path / "clip.mp4", gradient_frames(50, 96, 128), audio=tone(2.0)).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "header_only.mp4").write_bytes(data[:300])
    (tmp_path / "text.mp4").write_text("not a video\n" * 100)
    for name in ("truncated.mp4", "header_only.mp4", "text.mp4", "missing.mp4"):
        with pytest.raises(DawnError, match=name):
            probe(tmp_path / name)
    for name in ("header_only.mp4", "text.mp4", "missing.mp4"):
        with pytest.raises(DawnError, match=name):
            read_video(tmp_path / name)
