"""LSE-C / LSE-D (paper §4.1): lip-sync error measured with SyncNet (Chung & Zisserman 2016), computed the way the
Wav2Lip evaluation does it (syncnet_python's `SyncNetInstance.evaluate`):

- the `syncnet_v2.model` network (SyncNet below; weights from a user path);
- video: 5-frame windows of the face crop, 224 x 224, BGR, raw 0-255 values -> (B, 3, 5, 224, 224);
- audio: 13 MFCCs at 100 Hz of the 16 kHz int16-scaled waveform (python_speech_features defaults, written
  here in torch), 20 MFCC frames (= 5 video frames) per window -> (B, 1, 13, 20);
- for every video window i and audio offset d in [-15, 15], the Euclidean distance between the 1024-d
  embeddings of video window i and audio window i + d (audio features zero-padded at the ends); the
  distances are averaged over i for each d:  LSE-D = min_d mean distance,  LSE-C = median_d - min_d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dawn import DawnError
from dawn.config import FPS, SAMPLE_RATE
from dawn.metrics.weights import load_weights

SYNCNET_FILE = ("the SyncNet state dict syncnet_v2.model (joonson/syncnet_python, "
                "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model)")
WINDOW_FRAMES = 5  # video frames per SyncNet window
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps video
MAX_OFFSET = 15  # frames searched on each side (syncnet_python's vshift)
INPUT_SIZE = 224


# ----------------------------------------------------------------------------------------------------
# MFCC (python_speech_features.mfcc defaults: 25 ms rectangular frames every 10 ms, pre-emphasis 0.97,
# 512-point power spectrum, 26 mel filters, log, orthonormal DCT-II, 13 coefficients, lifter 22,
# coefficient 0 replaced by the log frame energy)

def _hz_to_mel(hz):
    return 2595 * np.log10(1 + hz / 700.0)


def _mel_to_hz(mel):
    return 700 * (10 ** (mel / 2595.0) - 1)


def mel_filterbank(num_filters: int = 26, nfft: int = 512, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(num_filters, nfft // 2 + 1) triangular filters on FFT bins, as python_speech_features builds them."""
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_filters + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mel_points) / sample_rate).astype(int)
    bank = np.zeros((num_filters, nfft // 2 + 1))
    for j in range(num_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        bank[j, lo:mid] = (np.arange(lo, mid) - lo) / (mid - lo)
        bank[j, mid:hi] = (hi - np.arange(mid, hi)) / (hi - mid)
    return bank


def _dct_matrix(n: int, keep: int) -> np.ndarray:
    """Orthonormal DCT-II as a (n, keep) matrix: features @ matrix = scipy.fft.dct(features, norm='ortho')[:keep]."""
    k, i = np.arange(keep)[None, :], np.arange(n)[:, None]
    matrix = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * np.sqrt(2.0 / n)
    matrix[:, 0] /= np.sqrt(2.0)
    return matrix


def mfcc(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, num_ceps: int = 13) -> np.ndarray:
    """MFCCs (num_frames, 13) float64 of a mono waveform (in the scale it is given; SyncNet expects int16 scale).

    num_frames = 1 + ceil((N - 400) / 160) at 16 kHz (the last frame zero-padded).
    """
    signal = torch.as_tensor(np.asarray(waveform, dtype=np.float64))
    frame_len, step, nfft = round(0.025 * sample_rate), round(0.01 * sample_rate), 512
    signal = torch.cat([signal[:1], signal[1:] - 0.97 * signal[:-1]])
    count = 1 if len(signal) <= frame_len else 1 + math.ceil((len(signal) - frame_len) / step)
    signal = F.pad(signal, (0, (count - 1) * step + frame_len - len(signal)))
    frames = signal.unfold(0, frame_len, step)
    power = torch.fft.rfft(frames, n=nfft).abs() ** 2 / nfft
    eps = np.finfo(float).eps
    energy = power.sum(1)
    energy = torch.where(energy == 0, eps, energy)
    bank = torch.as_tensor(mel_filterbank(26, nfft, sample_rate))
    filtered = power @ bank.T
    filtered = torch.where(filtered == 0, eps, filtered)
    ceps = torch.log(filtered) @ torch.as_tensor(_dct_matrix(26, num_ceps))
    lifter = 1 + 11 * torch.sin(math.pi * torch.arange(num_ceps, dtype=torch.float64) / 22)
    ceps = ceps * lifter
    ceps[:, 0] = torch.log(energy)
    return ceps.numpy()


# ----------------------------------------------------------------------------------------------------
# The network (syncnet_python's SyncNetModel.S; module indices follow its nn.Sequential layout)

def _conv_bn_relu(conv: nn.Module, channels: int, bn=nn.BatchNorm2d) -> list[nn.Module]:
    return [conv, bn(channels), nn.ReLU()]


class SyncNet(nn.Module):
    """Audio (B, 1, 13, 20) MFCC windows and video (B, 3, 5, 224, 224) BGR 0-255 windows -> (B, 1024) each."""

    def __init__(self, embedding_dim: int = 1024):
        super().__init__()
        c2 = nn.Conv2d
        self.netcnnaud = nn.Sequential(
            *_conv_bn_relu(c2(1, 64, 3, padding=1), 64), nn.MaxPool2d(1, 1),
            *_conv_bn_relu(c2(64, 192, 3, padding=1), 192), nn.MaxPool2d(3, (1, 2)),
            *_conv_bn_relu(c2(192, 384, 3, padding=1), 384),
            *_conv_bn_relu(c2(384, 256, 3, padding=1), 256),
            *_conv_bn_relu(c2(256, 256, 3, padding=1), 256), nn.MaxPool2d(3, 2),
            *_conv_bn_relu(c2(256, 512, (5, 4)), 512),
        )
        c3, b3 = nn.Conv3d, nn.BatchNorm3d
        self.netcnnlip = nn.Sequential(
            *_conv_bn_relu(c3(3, 96, (5, 7, 7), stride=(1, 2, 2)), 96, b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_bn_relu(c3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), 256, b3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            *_conv_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
            *_conv_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
            *_conv_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_bn_relu(c3(256, 512, (1, 6, 6)), 512, b3),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                      nn.Linear(512, embedding_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                      nn.Linear(512, embedding_dim))

    def forward_aud(self, mfcc_windows: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc_windows).flatten(1))

    def forward_lip(self, video_windows: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(video_windows).flatten(1))


# ----------------------------------------------------------------------------------------------------
# Scores

@dataclass
class SyncScores:
    lse_c: float  # confidence: median - min of the offset-averaged distances (higher = better synced)
    lse_d: float  # distance at the best offset (lower = better)
    offset: int  # syncnet_python's AV offset in frames: positive when the best audio window precedes the video
    distances: np.ndarray  # (2 * max_offset + 1,) mean distance for audio shifted by -max_offset .. +max_offset


def offset_distances(video_embeddings: torch.Tensor, audio_embeddings: torch.Tensor,
                     max_offset: int = MAX_OFFSET) -> torch.Tensor:
    """(N, D), (N, D) -> (N, 2 * max_offset + 1): distance between video window i and audio window
    i + k - max_offset (zero vectors past the ends, as syncnet_python's calc_pdist)."""
    padded = F.pad(audio_embeddings, (0, 0, max_offset, max_offset))
    windows = padded.unfold(0, 2 * max_offset + 1, 1).transpose(1, 2)  # (N, 2 * max_offset + 1, D)
    return torch.linalg.vector_norm(video_embeddings[:, None] - windows + 1e-6, dim=-1)  # + eps: pairwise_distance


def sync_scores(distances: torch.Tensor, max_offset: int = MAX_OFFSET) -> SyncScores:
    """LSE-C / LSE-D from the (N, 2 * max_offset + 1) distances of `offset_distances`."""
    mean = distances.mean(0)
    minimum, index = torch.min(mean, 0)
    return SyncScores(lse_c=float(torch.median(mean) - minimum), lse_d=float(minimum),
                      offset=max_offset - int(index), distances=mean.numpy())


class SyncNetScorer:
    """LSE-C / LSE-D of a video: `scorer(frames (T, H, W, 3) uint8 RGB face crops, waveform16k (N,)) -> SyncScores`."""

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 20,
                 model: SyncNet | None = None):
        if model is None:
            if weights is None:
                raise DawnError(f"LSE-C / LSE-D need {SYNCNET_FILE}")
            model = load_weights(SyncNet, weights, SYNCNET_FILE)
        self.model, self.batch_size = model.to(device).eval(), batch_size

    def windows(self, frames: np.ndarray, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """SyncNet inputs: video (N, 3, 5, 224, 224), audio (N, 1, 13, 20) for N = min(T, samples / 640) - 5."""
        coefficients = torch.as_tensor(mfcc(np.asarray(waveform, np.float64) * 32768.0)).float().T  # int16 scale
        count = min(len(frames), len(waveform) // (SAMPLE_RATE // FPS)) - WINDOW_FRAMES
        if count < 1:
            raise DawnError(f"LSE needs more than {WINDOW_FRAMES} frames of video and audio, got {len(frames)} "
                            f"frames and {len(waveform) / SAMPLE_RATE:.2f} s")
        video = torch.as_tensor(np.asarray(frames[:count + WINDOW_FRAMES - 1])).permute(0, 3, 1, 2).float()
        video = F.interpolate(video, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        video = video.flip(1).unfold(0, WINDOW_FRAMES, 1).permute(0, 1, 4, 2, 3)  # RGB -> BGR; (N, 3, 5, S, S)
        span = WINDOW_FRAMES * MFCC_PER_FRAME
        audio = coefficients[:, :(count - 1) * MFCC_PER_FRAME + span].unfold(1, span, MFCC_PER_FRAME)
        return video, audio.permute(1, 0, 2)[:, None]  # (N, 1, 13, 20)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, waveform: np.ndarray, max_offset: int = MAX_OFFSET) -> SyncScores:
        video, audio = self.windows(frames, waveform)
        device = next(self.model.parameters()).device
        lip, aud = [], []
        for i in range(0, len(video), self.batch_size):
            lip.append(self.model.forward_lip(video[i:i + self.batch_size].to(device)).cpu())
            aud.append(self.model.forward_aud(audio[i:i + self.batch_size].to(device)).cpu())
        return sync_scores(offset_distances(torch.cat(lip), torch.cat(aud), max_offset), max_offset)
