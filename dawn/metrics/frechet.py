"""Fréchet distances (paper §4.1): FID over InceptionV3 pool3 features, FVD16 / FVD32 over I3D features.

    FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))        (Heusel et al.)

The networks are written here so the weights everyone reports with load strictly:
- FIDInceptionV3 = pytorch-fid's InceptionV3 with the TF-FID blocks; weights `pt_inception-2015-12-05-6726825d.pth`
  (github.com/mseitzer/pytorch-fid releases). Input: images in [0, 1], resized to 299 x 299 bilinearly, scaled
  to [-1, 1]; feature: the 2048-d global average pool ("pool3").
- InceptionI3d = the Kinetics-400 I3D of piergiaj/pytorch-i3d as used by VideoGPT / StyleGAN-V for FVD; weights
  `i3d_pretrained_400.pt`. Input: clips (B, 3, T, 224, 224) in [-1, 1]; feature: the 400 logits averaged over
  time (what FVD uses) or the 1024-d pooled features before them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dawn import DawnError
from dawn.metrics.weights import load_weights

INCEPTION_FILE = ("pytorch-fid's FID InceptionV3 state dict pt_inception-2015-12-05-6726825d.pth "
                  "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/)")
I3D_FILE = ("the Kinetics-400 I3D state dict i3d_pretrained_400.pt (piergiaj/pytorch-i3d rgb_imagenet converted, "
            "as distributed with VideoGPT / StyleGAN-V FVD code)")
FVD_CLIP_LENGTHS = (16, 32)  # FVD16, FVD32 (paper §4.1)


# ----------------------------------------------------------------------------------------------------
# The distance

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the eigenvalues of S1 S2 are those of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2), so two symmetric eigen-decompositions do it (no complex sqrtm)."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (means (D,), covariances (D, D))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    distance = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * _trace_sqrt_product(sigma1, sigma2))
    return max(float(distance), 0.0)  # >= 0 mathematically; only rounding makes it negative


def frechet_distance_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D).

    With fewer samples than dimensions (typical per video: 25-200 frames, 2048-d) it avoids the D x D
    matrices: for centred samples X1, X2, tr((S1 S2)^(1/2)) = ||X1 X2^T||_* / sqrt((N1 - 1)(N2 - 1))
    (the nonzero eigenvalues of S1 S2 are the squared singular values of X1 X2^T over (N1 - 1)(N2 - 1)).
    """
    x1, x2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1] or min(len(x1), len(x2)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {x1.shape} and {x2.shape}")
    if min(len(x1), len(x2)) >= x1.shape[1]:
        return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1, c2 = x1 - mu1, x2 - mu2
    n1, n2 = len(x1) - 1, len(x2) - 1
    cross = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    distance = np.sum((mu1 - mu2) ** 2) + np.sum(c1 * c1) / n1 + np.sum(c2 * c2) / n2 - 2 * cross
    return max(float(distance), 0.0)


# ----------------------------------------------------------------------------------------------------
# InceptionV3 for FID (torchvision's Inception3 layout + pytorch-fid's TF-compatible blocks)

class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TF's average pool ignores the padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b pools with an average (padding ignored), Mixed_7c with a max: a quirk of the TF graph."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 of TF-FID: (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048).

    The 1008-way `fc` is kept only so the released state dict loads strictly; FID never uses it.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------------
# I3D for FVD (piergiaj/pytorch-i3d layout: TF "SAME" padding computed per input size)

def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    (tf, tb), (hf, hb), (wf, wb) = (_same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride))
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):  # zero padding, as the reference (inputs after ReLU are >= 0)
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d with SAME padding (+ BatchNorm + ReLU); `logits` is the bias-only variant without either."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, activation: bool = True):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x):
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class InceptionI3d(nn.Module):
    """I3D (Carreira & Zisserman): clips (B, 3, T, 224, 224) in [-1, 1] -> (B, 400) logits averaged over time,
    or with `features="pool"` the (B, 1024) pooled features before the logits. T >= 9."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        self.logits = Unit3D(1024, num_classes, batch_norm=False, activation=False)

    def forward(self, clips: torch.Tensor, features: str = "logits") -> torch.Tensor:
        x = clips
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                     "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                     "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"):
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, T', 1, 1) for 224 x 224 input
        if features == "pool":
            return x.mean(dim=(2, 3, 4))
        return self.logits(x).mean(dim=(2, 3, 4))


# ----------------------------------------------------------------------------------------------------
# Feature extractors and the metrics

def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_float_images(frames) -> torch.Tensor:
    """(N, H, W, 3) uint8 or (N, 3, H, W) float in [0, 1] -> (N, 3, H, W) float32 in [0, 1]."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    return x.float()


class InceptionFeatures:
    """pool3 features of frames: `extractor(frames (N, H, W, 3) uint8 | (N, 3, H, W) [0, 1]) -> (N, 2048)`."""

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 50,
                 model: FIDInceptionV3 | None = None):
        if model is None:
            if weights is None:
                raise DawnError(f"FID needs {INCEPTION_FILE}")
            model = load_weights(FIDInceptionV3, weights, INCEPTION_FILE)
        self.model, self.batch_size = model.to(device).eval(), batch_size

    @torch.no_grad()
    def __call__(self, frames) -> np.ndarray:
        device = _device_of(self.model)
        out = [self.model(_as_float_images(frames[i:i + self.batch_size]).to(device)).double().cpu()
               for i in range(0, len(frames), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))


def video_clips(frames: np.ndarray, length: int, stride: int | None = None) -> np.ndarray:
    """(T, H, W, 3) video -> (K, length, H, W, 3) clips starting every `stride` frames (default: back to back)."""
    stride = stride or length
    starts = range(0, len(frames) - length + 1, stride)
    if len(frames) < length:
        return np.zeros((0, length) + tuple(frames.shape[1:]), dtype=frames.dtype)
    return np.stack([frames[s:s + length] for s in starts])


class I3DFeatures:
    """I3D features of clips: `extractor(clips (B, T, H, W, 3) uint8) -> (B, 400)` (or (B, 1024) for "pool").

    Frames are resized to 224 x 224 (bilinear; the face crops are square) and scaled to [-1, 1].
    """

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 8,
                 features: str = "logits", model: InceptionI3d | None = None):
        if features not in ("logits", "pool"):
            raise ValueError(f"features must be 'logits' or 'pool', got {features!r}")
        if model is None:
            if weights is None:
                raise DawnError(f"FVD needs {I3D_FILE}")
            model = load_weights(InceptionI3d, weights, I3D_FILE)
        self.model, self.batch_size, self.features = model.to(device).eval(), batch_size, features

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        device, out = _device_of(self.model), []
        for i in range(0, len(clips), self.batch_size):
            x = torch.as_tensor(np.asarray(clips[i:i + self.batch_size])).to(device)  # (B, T, H, W, 3)
            b, t, h, w, _ = x.shape
            x = x.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False) * 2 - 1
            x = x.reshape(b, t, 3, 224, 224).transpose(1, 2)
            out.append(self.model(x, features=self.features).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 400 if self.features == "logits" else 1024))


def fid(generated_features: np.ndarray, real_features: np.ndarray) -> float:
    """FID from pool3 features of generated and real frames ((N1, 2048), (N2, 2048))."""
    return frechet_distance_features(generated_features, real_features)


def clip_features(video: np.ndarray, extractor, clip_length: int) -> np.ndarray:
    """Features (K, D) of the back-to-back `clip_length`-frame clips of one (T, H, W, 3) video (K may be 0).
    `extractor`: an I3DFeatures (clips (B, T, H, W, 3) -> (B, D))."""
    clips = video_clips(video, clip_length)
    return extractor(clips) if len(clips) else np.zeros((0, 0))


def fvd(generated: list[np.ndarray], real: list[np.ndarray], extractor, clip_length: int = 16) -> float:
    """FVD_{clip_length}: Fréchet distance between the clip features of the generated and of the real videos
    (lists of (T, H, W, 3) uint8), see `clip_features`."""
    sets = []
    for videos, label in ((generated, "generated"), (real, "real")):
        features = [f for f in (clip_features(v, extractor, clip_length) for v in videos) if len(f)]
        if sum(len(f) for f in features) < 2:
            raise DawnError(f"FVD{clip_length} needs at least 2 clips of {clip_length} frames in the {label} "
                            f"videos (they are too short)")
        sets.append(np.concatenate(features))
    return frechet_distance_features(*sets)
