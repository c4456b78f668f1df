"""Offline lip-sync proxy (needs no SyncNet weights): how well the mouth opening follows the speech.

The mouth opening (inner-lip gap / mouth width, dawn.face) is measured with mediapipe on every generated frame,
the speech envelope (RMS per 40 ms frame, dawn.audio.speech_envelope) on the audio; the proxy is their Pearson
correlation at the best lag within +-2 frames (80 ms), allowing for the small delay between the articulators
and the sound. Near 0 for a mouth that ignores the speech, higher is better; it stays below 1 even for real
faces (the mouth shape is not a function of loudness alone). It complements LSE-C / LSE-D, which need SyncNet.
"""

from __future__ import annotations

import numpy as np

from dawn.metrics.identity import MIN_DETECTION_SIDE

MAX_LAG = 2  # frames


def analyze_frames(frames: np.ndarray) -> dict[str, np.ndarray]:
    """dawn.face.analyze_video_frames on (T, H, W, 3) uint8 frames, upscaled first (bicubic) when smaller than
    MIN_DETECTION_SIDE (192 px); landmarks (T, 478, 3) and all measures refer to the input's pixels."""
    import torch
    import torch.nn.functional as F

    from dawn.face import analyze_video_frames, eye_ratios_batch, head_pose_batch, mouth_opening_batch

    frames = np.asarray(frames)
    factor = max(1.0, MIN_DETECTION_SIDE / min(frames.shape[1:3]))
    if factor == 1.0:
        return analyze_video_frames(frames)
    size = (round(frames.shape[1] * factor), round(frames.shape[2] * factor))
    big = F.interpolate(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float(), size=size,
                        mode="bicubic", align_corners=False)
    big = big.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    analysis = analyze_video_frames(big)
    landmarks = analysis["landmarks"] / np.float32(factor)
    return dict(landmarks=landmarks, pose=head_pose_batch(landmarks), eye_ratios=eye_ratios_batch(landmarks),
                mouth_opening=mouth_opening_batch(landmarks), found=analysis["found"])


def lag_correlation(signal: np.ndarray, reference: np.ndarray, max_lag: int = MAX_LAG) -> tuple[float, int]:
    """Best Pearson correlation of signal[t + lag] with reference[t] over lag in [-max_lag, max_lag]:
    (correlation, lag). A positive lag means the signal follows the reference. (0.0, 0) when constant."""
    signal, reference = np.asarray(signal, np.float64), np.asarray(reference, np.float64)
    length = min(len(signal), len(reference))
    best = (-np.inf, 0)
    for lag in range(-max_lag, max_lag + 1):
        s = signal[max(lag, 0):length + min(lag, 0)]
        r = reference[max(-lag, 0):length - max(lag, 0)]
        if len(s) < 3 or s.std() == 0 or r.std() == 0:
            continue
        best = max(best, (float(np.corrcoef(s, r)[0, 1]), lag))
    return best if np.isfinite(best[0]) else (0.0, 0)


def lip_sync_proxy(mouth_opening: np.ndarray, waveform: np.ndarray, max_lag: int = MAX_LAG) -> dict:
    """The proxy for a mouth-opening track (T,) and its 16 kHz audio: {"correlation", "lag", "envelope" (T,)}."""
    from dawn.audio import speech_envelope

    envelope = speech_envelope(waveform, len(mouth_opening))
    correlation, lag = lag_correlation(mouth_opening, envelope, max_lag)
    return {"correlation": correlation, "lag": lag, "envelope": envelope}

