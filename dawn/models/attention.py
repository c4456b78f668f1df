"""Temporal attention pieces shared by the A2V-FDM U-Net and PBNet.

- `RotaryEmbedding`: RoPE with interleaved pairs (GPT-J style), as rotary-embedding-torch 0.3.5 does.
- `RelativePositionBias`: T5-style bucketed relative position bias, one value per head.
- `local_attention`: attention where frame i sees frames j with |j - i| <= window (paper §3.6, local
  attention), computed block by block so that memory grows linearly with the number of frames
  (never a T x T mask). With window=None it is ordinary full attention.

Layout: q, k, v are (B, heads, T, d). Scores use scaled_dot_product_attention with scale 1/sqrt(d).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BiasFn = Callable[[torch.Tensor], torch.Tensor]  # relative offsets (any shape) -> (heads, *shape)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first `dim` features of each head (interleaved pairs).

    `freqs` is a (dim/2,) non-trainable tensor kept in the state dict because the released checkpoints
    store it; by default theta^(-2i/dim) (U-Net: dim 32), or given explicitly (PBNet: [1, 0.01]).
    """

    def __init__(self, dim: int, theta: float = 10000.0, freqs: list[float] | None = None):
        super().__init__()
        if freqs is None:
            freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("freqs", torch.as_tensor(freqs, dtype=torch.float32))

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> (T, dim) angles, each frequency repeated for two adjacent features."""
        ang = positions.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return ang.repeat_interleave(2, dim=-1)

    def rotate(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """x (..., T, d) rotated by angles (T, r), r <= d; features beyond r pass unchanged."""
        r = angles.shape[-1]
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)
        rotated_half = torch.stack((-x2, x1), dim=-1).flatten(-2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(x.shape[-2], device=x.device)
        return self.rotate(x, self.angles(positions))


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5 bidirectional buckets of rel = key index - query index.

    Half the buckets for each direction (past first); within a half, exact buckets for |rel| below a
    quarter of num_buckets, then log-spaced up to max_distance (computed in float32, truncated).
    """
    half = num_buckets // 2
    n = -rel
    bucket = (n < 0).long() * half
    m = n.abs()
    max_exact = half // 2
    log_part = max_exact + (
        torch.log(m.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    log_part = torch.minimum(log_part, torch.full_like(log_part, half - 1))
    return bucket + torch.where(m < max_exact, m, log_part)


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by the T5 bucket of the relative frame offset."""

    def __init__(self, heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        """rel (any shape, int) -> bias (heads, *rel.shape)."""
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).movedim(-1, 0)


def full_attention_bias(t: int, bias_fn: BiasFn | None, window: int | None, device, dtype) -> torch.Tensor | None:
    """The (heads or 1, T, T) additive bias of full attention: relative bias plus the window mask.

    This is the reference's O(T^2) formulation; `local_attention` uses it only for short sequences,
    and the benchmarks use it as the baseline.
    """
    idx = torch.arange(t, device=device)
    rel = idx[None, :] - idx[:, None]
    bias = bias_fn(rel).to(dtype) if bias_fn is not None else torch.zeros(1, t, t, device=device, dtype=dtype)
    if window is not None:
        bias = bias.masked_fill((rel.abs() > window)[None], float("-inf"))
    return bias


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    bias_fn: BiasFn | None = None,
    block: int | None = None,
    mask_cache: dict | None = None,
) -> torch.Tensor:
    """Attention of q (B, h, T, d) over k, v where |key frame - query frame| <= window.

    Queries are taken in blocks of `block` frames (default: the window, at least 16); a block
    attends to the contiguous key range it can see (its frames plus `window` on each side), a view of
    k and v, so memory is O(T * (block + 2 * window)) and nothing is copied. Masks are 4-D so that
    scaled_dot_product_attention can use its fused kernels. `bias_fn(rel)` gives the additive
    per-head bias for relative offsets rel = j - i. `mask_cache` (a dict, optional) keeps the block masks
    between calls that share bias_fn, window and dtype (many short sequences: one set of masks).
    """
    t = q.shape[-2]
    block = block or max(window or 0, 16)
    if window is None or t <= block + 2 * window:
        bias = None if bias_fn is None and window is None else full_attention_bias(t, bias_fn, window, q.device, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_as_mask(bias, q))

    out = torch.empty_like(q)
    masks = {} if mask_cache is None else mask_cache  # a mask depends on the offsets only: blocks away from
    for start in range(0, t, block):  # both ends share one
        stop = min(start + block, t)
        lo, hi = max(0, start - window), min(t, stop + window)
        key = (lo - start, hi - start, stop - start, window, q.dtype, q.ndim)
        mask = masks.get(key)
        if mask is None:
            rel = torch.arange(lo, hi, device=q.device)[None, :] - torch.arange(start, stop, device=q.device)[:, None]
            bias = bias_fn(rel).to(q.dtype) if bias_fn is not None else q.new_zeros(1, *rel.shape)
            mask = masks[key] = _as_mask(bias.masked_fill((rel.abs() > window)[None], float("-inf")), q)
        out[..., start:stop, :] = F.scaled_dot_product_attention(
            q[..., start:stop, :], k[..., lo:hi, :], v[..., lo:hi, :], attn_mask=mask
        )
    return out


def _as_mask(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """A (heads or 1, Tq, Tk) bias as a mask with q's number of dimensions (fused kernels need 4-D)."""
    if bias is None:
        return None
    return bias.reshape((1,) * (q.ndim - bias.ndim) + tuple(bias.shape))
