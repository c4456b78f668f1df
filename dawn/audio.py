"""Audio in: decoding to 16 kHz mono, the frame-count rule, HuBERT features at 25 fps, a speech envelope.

Waveforms are float32 (N,) at 16 kHz. HuBERT features follow ARCHITECTURE.md §7.1: the last hidden
state (50 Hz, 1024-d) of facebook/hubert-large-ls960-ft, computed in chunks, then linearly resampled to
the video frame rate (25 fps) with the first and last frames aligned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dawn import DawnError
from dawn.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

HUBERT_DIM = 1024  # the A2V condition size is fixed at 1024 (ARCHITECTURE.md §3)
HUBERT_HOP = 320  # conv feature encoder: total stride 320 samples (50 Hz) ...
HUBERT_RECEPTIVE_FIELD = 400  # ... and receptive field 400 samples
HUBERT_CHUNK = HUBERT_HOP * 1000  # §7.1: 1000 HuBERT frames per chunk to bound memory


# ----------------------------------------------------------------------------------------------------
# Decoding

def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any audio file, or the audio track of a video, to float32 mono (N,) at `sample_rate`.

    PyAV decodes every container (wav, flac, mp3, m4a/aac, ogg, mp4/mov/mkv); multi-channel audio keeps
    channel 0 only, as the reference does (§7.1); libsoxr (the `soxr` package, high quality) changes the rate.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise DawnError(f"audio file not found: {path}")
    _check_complete(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DawnError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            # Planar float keeps one row per channel whatever the codec's native sample format.
            to_float = av.AudioResampler(format="fltp")
            chunks, source_rate = [], stream.codec_context.sample_rate
            for frame in container.decode(stream):
                for converted in to_float.resample(frame):
                    chunks.append(converted.to_ndarray()[0])
                    source_rate = converted.sample_rate
            chunks.extend(converted.to_ndarray()[0] for converted in to_float.resample(None))
    except DawnError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise DawnError(f"cannot decode audio from {path}: {error}") from error
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise DawnError(f"{path} contains no audio samples")
    waveform = np.concatenate(chunks).astype(np.float32)
    if source_rate != sample_rate:
        import soxr

        waveform = soxr.resample(waveform, source_rate, sample_rate, quality="HQ")
    min_samples = sample_rate // FPS
    if len(waveform) < min_samples:
        raise DawnError(f"{path} is too short: {len(waveform) / sample_rate * 1000:.1f} ms of audio, "
                        f"at least one video frame ({1000 // FPS} ms) is needed")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _check_complete(path: Path) -> None:
    """DawnError for a RIFF WAV whose header declares more audio data than the file holds (a cut-off
    download or upload); decoders read what is there silently."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        wav_seconds(head, path.stat().st_size, str(path))


def wav_seconds(head: bytes, size: int, name: str) -> float:
    """The length in seconds a RIFF WAV's header declares, from its first bytes `head` (the fmt and data
    chunk headers; 64 KiB is plenty) and the file's `size`. DawnError naming `name` for a WAV without fmt/data
    chunks, or whose data chunk claims more than the file holds. Sizes 0 and 0xFFFFFFFF mean "unknown"
    (streamed WAVs): the bytes held count."""
    import struct

    offset, byte_rate = 12, None
    while offset + 8 <= len(head):
        chunk, length = head[offset:offset + 4], struct.unpack("<I", head[offset + 4:offset + 8])[0]
        if chunk == b"fmt " and length >= 16 and offset + 20 <= len(head):
            byte_rate = struct.unpack("<I", head[offset + 16:offset + 20])[0] or None
        elif chunk == b"data" and byte_rate:
            held = size - (offset + 8)
            if length in (0, 0xFFFFFFFF):
                length = held
            if length > held + 4096:
                raise DawnError(f"{name} is truncated: its header declares {length} bytes of audio but the file "
                                f"holds {max(0, held)}")
            return length / byte_rate
        offset += 8 + length + (length & 1)  # chunks are padded to an even size
    raise DawnError(f"{name} is not a readable WAV file (no fmt and data chunks)")


def num_frames(num_samples: int) -> int:
    """Video frames (25 fps) for `num_samples` of 16 kHz audio: round(samples / 16000 * 25).

    The reference truncates (int(), §0, §7.1); rounding keeps the video within half a frame of the audio
    it is muxed with, so an mp4 of a d-second clip has round(25 d) frames.
    """
    return int(num_samples / SAMPLE_RATE * FPS + 0.5)


def speech_envelope(waveform: np.ndarray, num_frames: int) -> np.ndarray:
    """RMS energy of each 40 ms video frame (640 samples at 16 kHz): (num_frames,) float32.

    Frame i covers samples [640 i, 640 (i + 1)); samples missing at the end count as silence.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    total = num_frames * SAMPLES_PER_FRAME
    padded = np.zeros(total, dtype=np.float32)
    padded[:min(total, len(waveform))] = waveform[:total]
    frames = padded.reshape(num_frames, SAMPLES_PER_FRAME)
    return np.sqrt(np.mean(frames * frames, axis=1, dtype=np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# HuBERT features (§7.1)

def hubert_num_frames(num_samples: int) -> int:
    """HuBERT output frames for one pass over `num_samples`: floor((N - 80) / 320) (= T_h in §7.1)."""
    return max(0, (num_samples - (HUBERT_RECEPTIVE_FIELD - HUBERT_HOP)) // HUBERT_HOP)


def resample_features(features: np.ndarray, num_output: int, block: int = 4096) -> np.ndarray:
    """Linear resampling of (T_h, D) features to (num_output, D) float32, first and last frames aligned.

    Equals scipy's interp1d(arange(T_h), features, axis=0, kind="linear")(linspace(0, T_h - 1, num_output))
    cast to float32 (same bracketing and the same float64 slope formula), in row blocks to bound memory.
    """
    source_len = len(features)
    if source_len == 0:
        raise ValueError("cannot resample an empty feature sequence")
    out = np.empty((num_output, features.shape[1]), dtype=np.float32)
    if source_len == 1:
        out[:] = features[0]
        return out
    source_pos = np.arange(source_len, dtype=np.float64)
    target_pos = np.linspace(0, source_len - 1, num_output)
    hi = np.clip(np.searchsorted(source_pos, target_pos), 1, source_len - 1)
    lo = hi - 1
    for start in range(0, num_output, block):
        rows = slice(start, start + block)
        y_lo, y_hi = features[lo[rows]], features[hi[rows]]
        slope = (y_hi - y_lo) / (source_pos[hi[rows]] - source_pos[lo[rows]])[:, None]
        out[rows] = slope * (target_pos[rows] - source_pos[lo[rows]])[:, None] + y_lo
    return out


def normalize_utterance(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance (Wav2Vec2FeatureExtractor, do_normalize=True)."""
    waveform = np.asarray(waveform, dtype=np.float32)
    return (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)


_HUBERT_FILES_HELP = ("a transformers HubertModel saved with save_pretrained: config.json and model.safetensors "
                      "(or pytorch_model.bin), plus optionally preprocessor_config.json "
                      "(the released models use facebook/hubert-large-ls960-ft)")


class HubertFeatureExtractor:
    """HuBERT last hidden state at 25 fps: `extractor(waveform16k (N,)) -> (num_frames(N), 1024) float32`.

    `model_dir` is a local save_pretrained folder (no downloads). Its preprocessor_config.json, if present,
    decides the per-utterance normalisation; without it the hubert-large-ls960-ft default (normalise) holds.
    `chunk_length` (samples, a multiple of 320) bounds memory; §7.1 uses 320 * 1000.
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_length: int = HUBERT_CHUNK):
        from transformers import HubertModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one small model: a "Loading weights" bar is noise

        model_dir = Path(model_dir)
        has_weights = (model_dir / "model.safetensors").is_file() or (model_dir / "pytorch_model.bin").is_file()
        if not (model_dir / "config.json").is_file() or not has_weights:
            raise DawnError(f"no HuBERT model in {model_dir}: the folder must hold {_HUBERT_FILES_HELP}")
        if chunk_length % HUBERT_HOP or chunk_length < HUBERT_RECEPTIVE_FIELD:
            raise ValueError(f"chunk_length must be a multiple of {HUBERT_HOP} and >= {HUBERT_RECEPTIVE_FIELD}")
        try:
            self.model = HubertModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DawnError(f"cannot load the HuBERT model in {model_dir} ({error}); it must hold "
                            f"{_HUBERT_FILES_HELP}") from error
        if self.model.config.hidden_size != HUBERT_DIM:
            raise DawnError(f"the HuBERT model in {model_dir} has hidden size {self.model.config.hidden_size}, "
                            f"DAWN needs {HUBERT_DIM} (hubert-large)")
        self.do_normalize = True
        preprocessor = model_dir / "preprocessor_config.json"
        if preprocessor.is_file():
            self.do_normalize = bool(json.loads(preprocessor.read_text()).get("do_normalize", True))
        self.device, self.dtype, self.chunk_length = torch.device(device), dtype, chunk_length

    @torch.inference_mode()
    def hidden_states(self, waveform: np.ndarray) -> np.ndarray:
        """HuBERT features at 50 Hz, (floor((N - 80) / 320), 1024) float32, computed chunk by chunk (§7.1).

        Chunk i covers samples [i C, i C + C + 80): exactly C / 320 output frames, 80 samples of overlap.
        The tail after the last full chunk is processed when it holds at least 400 samples.
        """
        signal = normalize_utterance(waveform) if self.do_normalize else np.asarray(waveform, dtype=np.float32)
        total = hubert_num_frames(len(signal))
        out = np.zeros((total, HUBERT_DIM), dtype=np.float32)  # zero rows pad a short result (§7.1)
        chunk, overlap = self.chunk_length, HUBERT_RECEPTIVE_FIELD - HUBERT_HOP
        starts = list(range(0, len(signal) // chunk * chunk, chunk))
        if len(signal) - len(starts) * chunk >= HUBERT_RECEPTIVE_FIELD:
            starts.append(len(starts) * chunk)
        filled = 0
        for start in starts:
            piece = torch.from_numpy(signal[start:start + chunk + overlap]).to(self.device, self.dtype)
            hidden = self.model(piece[None]).last_hidden_state[0].float().cpu().numpy()
            rows = min(len(hidden), total - filled)
            out[filled:filled + rows] = hidden[:rows]
            filled += rows
        return out

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """(num_frames(N), 1024) float32 features for a 16 kHz mono waveform (N,)."""
        hidden = self.hidden_states(waveform)
        if len(hidden) == 0:
            raise DawnError(f"audio too short for HuBERT: {len(waveform)} samples, at least "
                            f"{HUBERT_RECEPTIVE_FIELD} needed")
        return resample_features(hidden, num_frames(len(waveform)))


def hubert_config(preset: str = "tiny", **overrides):
    """HubertConfig for `preset`: "large" = facebook/hubert-large-ls960-ft's architecture; "tiny" keeps its
    1024-d output and conv strides (320-sample hop, 400-sample receptive field) with everything else small;
    "tiny-group-norm" is "tiny" with hubert-base's feature encoder normalisation (GroupNorm over time after
    the first conv, post-norm transformer). With random weights only the latter keeps the loudness of each
    frame: large's LayerNorm over the channels of every frame normalises it away (a linear probe of the
    speech envelope reaches r ~ 0.9 against ~0.55), which is why the demo, which cannot download trained
    weights, uses it. Its features are not local in time (the GroupNorm sees the whole clip)."""
    from transformers import HubertConfig

    large = dict(hidden_size=HUBERT_DIM, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                 feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                 num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
    presets = {
        "large": large,
        "tiny": {**large, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                 "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 16},
    }
    presets["tiny-group-norm"] = {**presets["tiny"], "feat_extract_norm": "group", "do_stable_layer_norm": False}
    if preset not in presets:
        raise ValueError(f"unknown HuBERT preset {preset!r}; choose from {sorted(presets)}")
    return HubertConfig(**{**presets[preset], **overrides})


def save_random_hubert(directory: str | Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised HubertModel (+ the ls960-ft preprocessor config) with save_pretrained.

    For offline tests and demos: the folder loads with HubertFeatureExtractor like the real checkpoint.
    `overrides` are HubertConfig fields (e.g. num_hidden_layers=0).
    """
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    directory = Path(directory)
    torch.manual_seed(seed)
    HubertModel(hubert_config(preset, **overrides)).eval().save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(directory)
    return directory
