"""Gaussian diffusion for A2V-FDM (paper §3.1; ARCHITECTURE.md §4.6, §4.7), apart from any network.

The denoiser is any callable `denoise(x_t, t) -> eps` with x_t (B, C, T, H, W) and t an int64 (B,)
tensor of diffusion steps; it predicts the noise eps (same layout as x_t). This module holds:

- `CosineSchedule`: the 1000-step cosine noise schedule as the 12 float32 buffers of the released
  checkpoints (state-dict names as in the reference), q_sample and the eps -> x0 conversion.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values (N,) indexed by t (B,) -> (B, 1, ..., 1) broadcastable against an ndim-d tensor."""
    return values[t].reshape(-1, *([1] * (ndim - 1)))


class CosineSchedule(nn.Module):
    """Cosine schedule (Nichol & Dhariwal, s = 0.008) computed in float64, kept as float32 buffers.

    a(k) = cos(((k/N) + s)/(1 + s) * pi/2)^2, a /= a(0); beta_t = clip(1 - a(t+1)/a(t), 0, 0.9999).
    Buffer names and order match the reference `GaussianDiffusion` state dict (ARCHITECTURE.md §4.6).
    """

    def __init__(self, timesteps: int = 1000, s: float = 0.008):
        super().__init__()
        self.timesteps = timesteps
        k = torch.arange(timesteps + 1, dtype=torch.float64)
        a = torch.cos(((k / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
        a = a / a[0]
        betas = (1 - a[1:] / a[:-1]).clamp(0, 0.9999)
        ac = torch.cumprod(1 - betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        posterior_variance = betas * (1 - ac_prev) / (1 - ac)
        buffers = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise; t int64 (B,)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(1/ac[t]) x_t - sqrt(1/ac[t] - 1) eps; t int64 (B,)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)
