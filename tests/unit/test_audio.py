"""dawn.audio: decoding every container to the same 16 kHz signal, the frame rule, HuBERT chunking (§7.1)."""

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from dawn import DawnError
from dawn.audio import (HubertFeatureExtractor, hubert_num_frames, load_audio, normalize_utterance, num_frames,
                        resample_features, save_random_hubert, speech_envelope)


def encode(path: Path, waveform: np.ndarray, rate: int, codec: str, codec_rate: int | None = None,
           with_video: bool = False) -> Path:
    """Write `waveform` ((channels, N) float32 at `rate`) with PyAV; optionally add a short video track."""
    with av.open(str(path), "w") as container:
        layout = "mono" if waveform.shape[0] == 1 else "stereo"
        stream = container.add_stream(codec, rate=codec_rate or rate, layout=layout)
        if with_video:
            video = container.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
            for _ in range(int(waveform.shape[1] / rate * 25)):
                container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "rgb24")))
            container.mux(video.encode(None))
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def speech(speech_wav):
    """(waveform at the file's native rate, native rate, the wav decoded by load_audio at 16 kHz)."""
    waveform, rate = soundfile.read(speech_wav, dtype="float32")
    return waveform, rate, load_audio(speech_wav)


@pytest.fixture(scope="module")
def hubert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubert")
    return {"tiny": save_random_hubert(root / "tiny"),
            "local": save_random_hubert(root / "local", num_hidden_layers=0)}


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int = 2000) -> tuple[int, float]:
    """Shift of b against a (samples) with the highest normalised correlation, and that correlation."""
    n = min(len(a), len(b)) - 2 * max_lag
    scores = [(lag, np.corrcoef(a[max_lag:max_lag + n], b[max_lag + lag:max_lag + lag + n])[0, 1])
              for lag in range(-max_lag, max_lag + 1, 1)]
    return max(scores, key=lambda s: s[1])


def test_wav_decodes_to_16k_mono(speech):
    waveform, rate, decoded = speech
    assert rate == 22050 and decoded.dtype == np.float32 and decoded.ndim == 1
    assert len(decoded) == round(len(waveform) * 16000 / rate)
    import soxr

    expected = soxr.resample(waveform, rate, 16000, quality="HQ")
    np.testing.assert_allclose(decoded, expected, atol=1e-6)  # PyAV decode == soundfile's samples
    # the band below 8 kHz survives: the 16 kHz signal correlates with soundfile's samples at 22.05 kHz
    times = np.arange(len(decoded)) / 16000
    original = np.interp(times, np.arange(len(waveform)) / rate, waveform)
    assert np.corrcoef(original, decoded)[0, 1] > 0.95


@pytest.mark.parametrize("suffix,codec,codec_rate,video", [
    ("flac", "flac", None, False), ("mp3", "libmp3lame", None, False), ("m4a", "aac", None, False),
    ("ogg", "libopus", 48000, False), ("mp4", "aac", None, True), ("mov", "aac", None, True),
    ("mkv", "libopus", 48000, True)])
def test_every_container_decodes_to_the_same_signal(tmp_path, speech, suffix, codec, codec_rate, video):
    waveform, rate, reference = speech
    path = encode(tmp_path / f"speech.{suffix}", waveform[None], rate, codec, codec_rate, video)
    decoded = load_audio(path)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - len(reference)) <= 0.07 * 16000  # codec padding at most a few frames
    if codec == "flac":  # lossless: identical samples
        np.testing.assert_allclose(decoded, reference, atol=1e-4)
    else:  # lossy: same signal, time-aligned (encoder delay removed) and highly correlated
        lag, correlation = best_lag(reference, decoded, max_lag=200)
        assert abs(lag) <= 2 and correlation > 0.9, (lag, correlation)


def test_stereo_keeps_channel_zero(tmp_path, speech):
    waveform, rate, reference = speech
    noise = np.random.default_rng(0).normal(0, 0.3, len(waveform)).astype(np.float32)
    soundfile.write(tmp_path / "stereo.wav", np.stack([waveform, noise], 1), rate, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav"), reference, atol=1e-6)


def test_resampling_keeps_a_tone(tmp_path):
    tone = np.sin(2 * np.pi * 1000 * np.arange(44100) / 44100).astype(np.float32)
    soundfile.write(tmp_path / "tone.wav", tone, 44100, subtype="FLOAT")
    decoded = load_audio(tmp_path / "tone.wav")
    assert len(decoded) == 16000
    spectrum = np.abs(np.fft.rfft(decoded))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over one second
    np.testing.assert_allclose(np.sqrt(np.mean(decoded[1000:-1000] ** 2)), np.sqrt(0.5), rtol=0.01)


def test_bad_audio_raises_dawn_error(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not audio at all\n" * 50)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    soundfile.write(tmp_path / "short.wav", np.zeros(600, np.float32), 16000)  # < one 40 ms frame
    encode(tmp_path / "silent_video.mp4", np.zeros((1, 16000), np.float32), 16000, "aac", with_video=True)
    with av.open(str(tmp_path / "video_only.mp4"), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "rgb24")))
        container.mux(video.encode(None))
    cases = {"missing.wav": "not found", "notes.txt": "cannot decode|no audio stream", "empty.wav": "no audio samples",
             "short.wav": "too short", "video_only.mp4": "no audio stream"}
    for name, problem in cases.items():
        with pytest.raises(DawnError, match=problem) as error:
            load_audio(tmp_path / name)
        assert name in str(error.value)
    assert len(load_audio(tmp_path / "silent_video.mp4")) >= 16000  # silence is still valid audio


def test_a_wav_holding_less_than_its_header_claims_is_truncated(tmp_path):
    """A cut-off WAV (header: 2 GB of samples, file: 0.1 s) is refused; a streamed WAV of unknown size is read."""
    import struct

    path = tmp_path / "cut.wav"
    soundfile.write(str(path), np.zeros(1600, np.float32), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 2_000_000_000)
    path.write_bytes(bytes(data))
    with pytest.raises(DawnError, match=r"cut.wav is truncated: its header declares 2000000000 bytes of audio but the file holds 3200"):
        load_audio(path)
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)  # what a streaming writer leaves
    path.write_bytes(bytes(data))
    assert len(load_audio(path)) == 1600


def test_frame_count_rule():
    assert num_frames(16000) == 25
    assert num_frames(319) == 0 and num_frames(320) == 1 and num_frames(640) == 1
    assert num_frames(38780) == 61  # round(60.59); the reference truncates to 60
    assert num_frames(16000 * 600) == 15000


def test_speech_envelope(speech):
    _, _, decoded = speech
    frames = num_frames(len(decoded))
    envelope = speech_envelope(decoded, frames)
    assert envelope.shape == (frames,) and envelope.dtype == np.float32
    assert envelope.max() > 10 * np.percentile(envelope, 5)  # speech and pauses differ
    tone = 0.5 * np.sin(2 * np.pi * 100 * np.arange(16000) / 16000).astype(np.float32)
    padded = speech_envelope(tone, 30)  # 5 frames past the end count as silence
    np.testing.assert_allclose(padded[:25], 0.5 / np.sqrt(2), rtol=1e-3)
    assert np.all(padded[25:] == 0)


def test_resampling_equals_scipy_interp1d():
    scipy_interpolate = pytest.importorskip("scipy.interpolate")
    features = np.random.default_rng(0).normal(size=(97, 8)).astype(np.float32)
    for count in (1, 2, 48, 97, 200):
        expected = scipy_interpolate.interp1d(np.arange(97), features, axis=0, kind="linear")(
            np.linspace(0, 96, count)).astype(np.float32)
        np.testing.assert_array_equal(resample_features(features, count, block=7), expected)
    out = resample_features(features, 48)
    np.testing.assert_allclose(out[[0, -1]], features[[0, -1]], rtol=1e-6)  # first and last aligned


def test_normalisation_matches_the_transformers_processor(speech, hubert_dirs):
    from transformers import Wav2Vec2FeatureExtractor

    processor = Wav2Vec2FeatureExtractor.from_pretrained(hubert_dirs["tiny"])
    _, _, decoded = speech
    expected = processor(decoded, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(normalize_utterance(decoded), expected, atol=1e-6)


def test_hubert_shapes(speech, hubert_dirs):
    _, _, decoded = speech
    extractor = HubertFeatureExtractor(hubert_dirs["tiny"])
    hidden = extractor.hidden_states(decoded)
    assert hidden.shape == (hubert_num_frames(len(decoded)), 1024) == ((len(decoded) - 80) // 320, 1024)
    features = extractor(decoded)
    assert features.shape == (num_frames(len(decoded)), 1024) and features.dtype == np.float32
    np.testing.assert_allclose(features[[0, -1]], hidden[[0, -1]], rtol=1e-5, atol=1e-6)
    assert np.isfinite(features).all() and features.std() > 0.1


def test_hubert_chunking_equals_a_single_pass_away_from_chunk_edges(speech, hubert_dirs):
    """With no transformer layer, a frame sees 400 samples plus the positional conv (16 frames): chunked
    and single-pass features agree except within 8 frames of a chunk edge; lengths are exact."""
    _, _, decoded = speech
    signal = decoded[:320 * 130 + 250]  # 3 chunks of 40 frames + a tail of 10 frames (>= 400 samples)
    single = HubertFeatureExtractor(hubert_dirs["local"]).hidden_states(signal)
    chunked = HubertFeatureExtractor(hubert_dirs["local"], chunk_length=320 * 40).hidden_states(signal)
    assert single.shape == chunked.shape == (130, 1024)
    frame = np.arange(130)
    far_from_edges = np.min(np.abs(frame[:, None] - np.array([0, 40, 80, 120, 130])[None]), axis=1) >= 9
    far_from_edges |= frame < 9  # the signal's own start is an edge in both
    np.testing.assert_allclose(chunked[far_from_edges], single[far_from_edges], atol=2e-4)
    assert not np.allclose(chunked[~far_from_edges], single[~far_from_edges], atol=1e-3)
    # a tail shorter than 400 samples is dropped and the result padded with zero rows to floor((N-80)/320)
    short_tail = decoded[:320 * 80 + 300]
    chunked_tail = HubertFeatureExtractor(hubert_dirs["local"], chunk_length=320 * 40).hidden_states(short_tail)
    assert chunked_tail.shape == (hubert_num_frames(len(short_tail)), 1024) == (80, 1024)


def test_missing_hubert_folder_says_what_to_put_there(tmp_path):
    with pytest.raises(DawnError, match="config.json") as error:
        HubertFeatureExtractor(tmp_path / "nowhere")
    assert "nowhere" in str(error.value)


def test_demo_stand_in_hubert_keeps_loudness(tmp_path):
    """The demo's random group-norm HuBERT carries each frame's loudness (a ridge probe fitted on one sentence
    predicts the speech envelope of another); the large layout's per-frame LayerNorm loses most of it."""
    from dawn.data.tts import synthesize_speech

    sentences = ["The quick brown fox jumps over the lazy dog, and then it runs far away into the woods.",
                 "Seven silver spoons were polished before dinner, while music played softly downstairs."]
    signals = [load_audio(synthesize_speech(text, tmp_path / f"s{i}.wav")) for i, text in enumerate(sentences)]

    def probe(preset: str) -> float:
        extract = HubertFeatureExtractor(save_random_hubert(tmp_path / preset, preset=preset))
        (x_fit, x_test), (y_fit, y_test) = zip(*((f, speech_envelope(s, len(f)))
                                                 for s, f in ((s, extract(s)) for s in signals)))
        mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
        a, b = (x_fit - mean) / std, (x_test - mean) / std
        w = np.linalg.solve(a.T @ a + 100.0 * np.eye(a.shape[1]), a.T @ (y_fit - y_fit.mean()))
        return float(np.corrcoef(b @ w, y_test)[0, 1])

    group, layer = probe("tiny-group-norm"), probe("tiny")
    assert group > 0.75 and group > layer + 0.15, (group, layer)
