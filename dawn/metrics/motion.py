"""Motion metrics (paper §4.1): beat align score (BAS), blinks per second, degradation rate (DR_n), pose /
blink statistics against the ground truth, and jitter (temporal smoothness). Tracks are per frame at 25 fps: pose (T, 6) = (yaw, pitch, roll in
degrees, scale, tx, ty), eye ratios (T, 2) or (T,), waveforms 16 kHz mono.
"""

from __future__ import annotations

import numpy as np
import torch

from dawn.config import FPS, SAMPLE_RATE
from dawn.metrics.frechet import frechet_distance_features

POSE_NAMES = ("yaw", "pitch", "roll", "scale", "tx", "ty")


# ----------------------------------------------------------------------------------------------------
# Beat align score (Siyao et al. 2022, "Bailando"): how close the head's motion beats are to audio beats

def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(x, sigma, mode="nearest")


def motion_beats(pose: np.ndarray, smooth_sigma: float = 2.0, components: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Frames where the head pauses or turns: local minima of the Gaussian-smoothed speed of the chosen pose
    components (default yaw, pitch, roll, in degrees per frame), as Bailando's kinematic beats. (K,) int."""
    pose = np.asarray(pose, np.float64)[:, list(components)]
    speed = _gaussian_smooth(np.linalg.norm(np.diff(pose, axis=0), axis=1), smooth_sigma)
    inner = (speed[1:-1] < speed[:-2]) & (speed[1:-1] < speed[2:])
    return np.flatnonzero(inner) + 1


def onset_strength(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, hop: int = 160,
                   n_fft: int = 512) -> np.ndarray:
    """Spectral flux: the sum over frequencies of the positive change of the log-magnitude spectrum, one value
    per `hop` samples (100 Hz at 16 kHz). (num_hops,) float64, value i belongs to time i * hop / sample_rate."""
    x = torch.as_tensor(np.asarray(waveform, np.float32))
    spectrum = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=True,
                          return_complex=True).abs()
    log_magnitude = torch.log1p(1000.0 * spectrum)
    flux = torch.relu(log_magnitude[:, 1:] - log_magnitude[:, :-1]).sum(0)
    return torch.cat([torch.zeros(1), flux]).double().numpy()


def audio_onsets(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, fps: int = FPS, hop: int = 160,
                 threshold: float = 1.0, min_gap_s: float = 0.1) -> np.ndarray:
    """Audio beats: peaks of the spectral flux above mean + threshold x std, at least `min_gap_s` apart (the
    stronger kept). Returns onset times in video frames (K,) float64."""
    flux = _gaussian_smooth(onset_strength(waveform, sample_rate, hop), 1.0)
    if len(flux) < 3:
        return np.zeros(0)
    peak = (flux[1:-1] >= flux[:-2]) & (flux[1:-1] > flux[2:]) & (flux[1:-1] > flux.mean() + threshold * flux.std())
    candidates = np.flatnonzero(peak) + 1
    kept: list[int] = []
    gap = min_gap_s * sample_rate / hop
    for index in candidates[np.argsort(-flux[candidates])]:  # strongest first (a handful of peaks per second)
        if all(abs(index - k) >= gap for k in kept):
            kept.append(int(index))
    return np.sort(np.array(kept, np.float64)) * hop / sample_rate * fps


def beat_align_score(motion: np.ndarray, audio: np.ndarray, sigma: float = 3.0, per: str = "motion") -> float:
    """BAS = mean over beats b of exp(-min_a |b - a|^2 / (2 sigma^2)), in frames (sigma 3 as Bailando).

    per="motion" averages over the motion beats, matched to the nearest audio beat, as the paper defines it;
    per="audio" averages over the audio beats, as Bailando's released code does. 0 when either set is empty.
    """
    if per not in ("motion", "audio"):
        raise ValueError(f"per must be 'motion' or 'audio', got {per!r}")
    motion, audio = np.asarray(motion, np.float64), np.asarray(audio, np.float64)
    if len(motion) == 0 or len(audio) == 0:
        return 0.0
    queries, targets = (motion, audio) if per == "motion" else (audio, motion)
    nearest = np.min((queries[:, None] - targets[None, :]) ** 2, axis=1)
    return float(np.mean(np.exp(-nearest / (2 * sigma ** 2))))


def head_motion_bas(pose: np.ndarray, waveform: np.ndarray, sigma: float = 3.0, per: str = "motion") -> float:
    """BAS of a head-pose track (T, 6) against the onsets of its 16 kHz audio."""
    return beat_align_score(motion_beats(pose), audio_onsets(waveform), sigma=sigma, per=per)


# ----------------------------------------------------------------------------------------------------
# Blinks

def blink_events(eye_ratio: np.ndarray, close_fraction: float = 0.6, reopen_fraction: float = 0.8) -> int:
    """Completed blinks in an eye-ratio track (T,) or (T, 2) (both eyes averaged).

    A blink starts when the ratio drops below close_fraction x the open level (the track's median: eyes are
    open most of the time) and ends when it comes back above reopen_fraction x that level (hysteresis, so
    noise around one threshold does not count twice). A closure still open at the end is not counted.
    """
    ratio = np.asarray(eye_ratio, np.float64)
    ratio = ratio.mean(1) if ratio.ndim == 2 else ratio
    if len(ratio) < 2:
        return 0
    level = np.median(ratio)
    closed, opened = ratio < close_fraction * level, ratio > reopen_fraction * level
    # state per frame = the last decisive observation (closed -> 1, opened -> 0), open before the first one
    marks = np.where(closed, 1, np.where(opened, 0, -1))
    last = np.maximum.accumulate(np.where(marks >= 0, np.arange(len(ratio)), -1))
    state = np.where(last >= 0, marks[np.maximum(last, 0)], 0)
    return int(np.sum((state[:-1] == 1) & (state[1:] == 0)))


def blinks_per_second(eye_ratio: np.ndarray, fps: int = FPS, **thresholds) -> float:
    """blink/s (paper §4.1): completed blinks / duration (T / fps seconds)."""
    return blink_events(eye_ratio, **thresholds) / (len(eye_ratio) / fps)


# ----------------------------------------------------------------------------------------------------
# Degradation rate (paper §4.1): error accumulation from the start to the end of long videos

def degradation_rate(generated_features: list[np.ndarray], real_features: list[np.ndarray], n: int) -> float:
    """DR_n = mean FID_ed / mean FID_st - 1 over videos.

    Per video, FID_st compares the features (e.g. InceptionV3 pool3, (T, 2048)) of its first n generated
    frames with its first n real frames, FID_ed its last n generated with its last n real frames; the FIDs
    are averaged over the videos (the overlines of the paper's formula). Videos shorter than n frames are
    skipped; n = 25 and 50 give DR_25 and DR_50.
    """
    start, end = [], []
    for generated, real in zip(generated_features, real_features):
        length = min(len(generated), len(real))
        if length < n:
            continue
        start.append(frechet_distance_features(generated[:n], real[:n]))
        end.append(frechet_distance_features(generated[length - n:length], real[length - n:length]))
    if not start:
        raise ValueError(f"DR_{n} needs videos of at least {n} frames")
    return float(np.mean(end) / np.mean(start) - 1)


# ----------------------------------------------------------------------------------------------------
# Tracks vs the ground truth

def track_statistics(generated: np.ndarray, ground_truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-component comparison of (T, D) tracks (cut to the shorter): {"mae": mean |g - t|, "std_ratio":
    std(g) / std(t) (1 = as lively as the truth), "correlation": Pearson r (nan for a constant track)}."""
    g, t = np.asarray(generated, np.float64), np.asarray(ground_truth, np.float64)
    g, t = (g[:, None] if g.ndim == 1 else g), (t[:, None] if t.ndim == 1 else t)
    length = min(len(g), len(t))
    g, t = g[:length], t[:length]
    gc, tc = g - g.mean(0), t - t.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (gc * tc).sum(0) / np.sqrt((gc ** 2).sum(0) * (tc ** 2).sum(0))
        std_ratio = g.std(0) / t.std(0)
    return {"mae": np.abs(g - t).mean(0), "std_ratio": std_ratio, "correlation": correlation}


def jitter(track: np.ndarray, fps: int = FPS) -> np.ndarray:
    """Temporal smoothness of a (T, D) or (T,) track: the mean absolute frame-to-frame acceleration per
    component, J = mean_t |x[t+1] - 2 x[t] + x[t-1]| * fps^2, in the track's units per second^2 (degrees/s^2
    for the pose angles). A smooth motion has a small J; frame-to-frame jumps raise it. (D,) float64; nan
    for tracks shorter than 3 frames. For x = A sin(2 pi f t) sampled at fps >> f, J -> A (2 pi f)^2 * 2 / pi.
    """
    x = np.asarray(track, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    if len(x) < 3:
        return np.full(x.shape[1], np.nan)
    return np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean(0) * fps ** 2
