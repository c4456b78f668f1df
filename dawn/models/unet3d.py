"""A2V-FDM denoiser: the conditional 3D U-Net of DAWN (paper §3.3, §3.6; ARCHITECTURE.md §3, §4.1-4.5).

Given the noisy motion x_t (B, 3, T, L, L) (flow x, flow y, 2*occlusion-1), the diffusion step t (B,),
the source features (B, C+16, L, L) (LFG source latent z_src + the face-box mask embedding) and the
per-frame condition (B, T, 1032) = [HuBERT 1024, pose delta 6, eye delta 2], it predicts the noise eps
(B, 3, T, L, L). Outputs 0-1 come from the flow head, output 2 from the occlusion head.

Built for long renders (200+ frames, 20 DDIM steps) on CPUs:
- Everything that depends neither on x_t nor on t is computed once per render by `prepare`: the
  source part of the (linear) input convolution, the condition MLPs and the cross-attention keys and
  values of every block, the RoPE angles. `forward_prepared` runs one denoising step from that.
- Temporal attention is local (|i - j| <= window, §3.6) through `local_attention`: memory linear in T.
  Sequences (one per spatial position) are processed in chunks to bound the working set.
- Activations stay (B, C, T, H, W) in channels_last_3d memory: per-frame (1, k, k) convolutions are
  2D convolutions on a free (B*T, C, H, W) view, token-wise layers read a free (B, T, H, W, C) view.
- Inference (no gradients) runs every per-frame layer over chunks of frames and updates activations in
  place (`infer` methods), so a render holds a few activations of the whole clip plus one chunk's working
  set: memory is linear in T with a small constant (a 10-minute clip at 128 px fits in 24 GiB). GroupNorm,
  the only layer besides temporal attention that mixes frames, takes its statistics in a first pass over
  the clip. Training (gradients on) uses the plain `forward` methods; both compute the same function.
- Cross-attention to the two keys [null, this frame's condition] is the closed form of a 2-way
  softmax: attn(cond) = sigmoid(logit_cond - logit_null).
- On CPU in float32 inference, three parts run where PyTorch is slow for these shapes:
  - the temporal attention (32-wide heads) and the cross-attention's per-token terms in native kernels
    (`dawn.models.native`);
  - the 4x4 level's 3x3 convolutions as one matrix product (`conv3x3_as_matmul`).
  The PyTorch path remains for training, CUDA, bf16, and machines without a C++ compiler.

State-dict tensors are the reference's under shorter module names; `dawn.adapters.a2v` maps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dawn.models import native
from dawn.models.attention import RelativePositionBias, RotaryEmbedding, full_attention_bias, local_attention
from dawn.models.diffusion import PREDICTIONS, CosineSchedule, eps_denoiser
from dawn.models.lfg import coordinate_grid

# Temporal attention handles at most this many (sequence x frame) tokens at once: 10 positions of a 200-frame
# clip, whose q/k/v (6 MB in float32) stay in a core's cache between the projection, RoPE and the attention
# (1.7x faster than 100 MB chunks on a 2 MB-L2 Xeon); long renders need no more memory per layer than short.
TEMPORAL_TOKENS_PER_CHUNK = 2**11
# ... but at least this many positions per chunk: long clips would otherwise make many single-position attention
# calls (1600 frames: 1 position per chunk), and time would grow faster than the length.
MIN_TEMPORAL_POSITIONS = 8
# The native kernel (dawn/models/native.py) has no per-call cost worth amortising: there the q/k/v of a chunk
# should stay small instead. At 1600 frames, 2 positions per chunk (10 MB of q/k/v) ran a 32x32 layer in 4.3 s
# against 7.4 s with 8 (39 MB): time per frame as at 200 frames.
NATIVE_MIN_TEMPORAL_POSITIONS = 2
# Local temporal attention takes queries in blocks of this many frames: the CPU flash-attention kernel splits
# queries in blocks of 32, so 40-frame blocks (the window) ran as 32 + 8 (32: ~8% faster, 7% fewer key reads).
TEMPORAL_QUERY_BLOCK = 32
# Inference runs per-frame layers over chunks of frames of at most this many activation elements (8 frames of
# a 64-channel 32x32 level, 2 MB in float32): a chunk's intermediates stay in cache between the pointwise ops
# (norms, SiLU, cross-attention terms, projections); a U-Net step is ~15% faster than with 32 MB chunks.
FRAME_CHUNK_ELEMENTS = 2**19
# 3x3 convolutions of frames of at most this many pixels (the 4x4 level) run as one matrix product over the
# unfolded patches on CPU: oneDNN's direct convolution spends much of a 4x4 frame on its borders (~110 GFLOP/s
# against ~150 for the product, 512 channels).
SMALL_FRAME_PIXELS = 16
# On a GPU the chunks only bound memory (kernel launches, not a cache, set the pace there): both limits above are
# this many times larger for CUDA tensors (a 200-frame hdtf128 render then runs each layer in one piece).
CUDA_CHUNK_SCALE = 2**8


def chunk_scale(x: torch.Tensor) -> int:
    return CUDA_CHUNK_SCALE if x.is_cuda else 1


MOTION_TARGETS = ("grid", "offset")


@dataclass
class A2VConfig:
    image_size: int = 128  # S; the latent side is L = S / 4
    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    source_channels: int = 256  # LFG source latent channels (its bottleneck width; 32 for the tiny LFG)
    face_channels: int = 16  # face-box mask embedding channels (§3 step 2)
    motion_channels: int = 3  # flow x, flow y, 2*occlusion-1
    cond_audio: int = 1024
    cond_pose: int = 6
    cond_eye: int = 2
    heads: int = 8  # temporal / spatial attention
    dim_head: int = 32
    cross_heads: int = 8  # condition cross-attention (§4.3)
    cross_dim_head: int = 8
    cross_scale: float = 8.0
    init_kernel: int = 7
    groups: int = 8
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 32
    timesteps: int = 1000
    window: int | None = 40  # temporal local-attention half width; None = full attention (training)
    reference_bbox_convention: bool = False  # ARCHITECTURE.md §9.2: True reproduces x/H, y/W
    cross_attn_norm_eps: float | None = None  # None: 1e-5 for float32, else 1e-3 (reference rule, §6)
    # what the network outputs: "eps" (paper Eq. 2; the released checkpoints) or "v" (v-prediction; its loss
    # weighs the coarse motion at high noise far more, so short trainings sample sensible motion much sooner)
    prediction: str = "eps"
    # the motion x0 the diffusion generates: "grid" = the LFG's absolute sampling grid (the reference and its
    # checkpoints); "offset" = (grid - identity grid) / offset_scale, the displacement at about unit scale.
    # At grid scale (std 0.57) the mouth's motion is ~2 % of the range and sampling error hides it; offsets
    # are sampled without clipping (they are not bounded by 1). The occlusion channel is 2*occ-1 in both.
    motion_target: str = "grid"
    offset_scale: float = 0.05

    def __post_init__(self):
        self.dim_mults = tuple(self.dim_mults)
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"A2VConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.motion_target not in MOTION_TARGETS:
            raise ValueError(f"A2VConfig.motion_target must be one of {MOTION_TARGETS}, got {self.motion_target!r}")
        if not self.offset_scale > 0:
            raise ValueError(f"A2VConfig.offset_scale must be positive, got {self.offset_scale}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 4

    @property
    def in_channels(self) -> int:
        return self.motion_channels + self.source_channels + self.face_channels

    @property
    def cond_dim(self) -> int:
        return self.cond_audio + self.cond_pose + self.cond_eye

    @classmethod
    def preset(cls, name: str) -> "A2VConfig":
        presets = {
            "tiny": dict(image_size=64, dim=16, dim_mults=(1, 2), source_channels=32),
            "hdtf128": dict(image_size=128),
            "hdtf256": dict(image_size=256),
        }
        if name not in presets:
            raise ValueError(f"unknown A2V preset {name!r} (known: {sorted(presets)})")
        return cls(**presets[name])


# --- layout helpers --------------------------------------------------------------------------------

def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T, H, W, C); a view when x is channels_last_3d."""
    return x.permute(0, 2, 3, 4, 1)


def from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, C, T, H, W); channels_last_3d when tokens are contiguous."""
    return tokens.permute(0, 4, 1, 2, 3)


def per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to every frame of x (B, C, T, H, W): a (1, k, k) 3D convolution."""
    b, c, t, h, w = x.shape
    frames = to_tokens(x).reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # channels_last (B*T, C, H, W)
    y = conv3x3_as_matmul(layer, frames) if unfolds_to_matmul(layer, frames) else layer(frames)
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


def unfolds_to_matmul(layer: nn.Module, frames: torch.Tensor) -> bool:
    """Whether `conv3x3_as_matmul` takes this call: a 3x3, stride 1, padding 1 convolution of frames of at most
    SMALL_FRAME_PIXELS pixels, float32 inference on CPU."""
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3) and layer.stride == (1, 1)
            and layer.padding == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
            and frames.shape[-2] * frames.shape[-1] <= SMALL_FRAME_PIXELS and frames.device.type == "cpu"
            and frames.dtype == torch.float32 and not torch.is_grad_enabled() and not autocast_on(frames))


def conv3x3_as_matmul(conv: nn.Conv2d, frames: torch.Tensor) -> torch.Tensor:
    """conv(frames) for frames (N, C, H, W) as one matrix product: the 9 shifted copies of the zero-padded
    frames side by side (N*H*W, 9*C) times the weight (9*C, Cout). Output channels_last, as the convolution's."""
    n, c, h, w = frames.shape
    padded = F.pad(frames.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H+2, W+2, C)
    patches = torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], dim=3)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 9 * c)  # a view when channels_last
    out = F.linear(patches.view(n * h * w, 9 * c), weight, conv.bias)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def frame_chunks(x: torch.Tensor, channels: int | None = None) -> list[slice]:
    """Slices of the frame axis of x (B, C, T, H, W) of at most FRAME_CHUNK_ELEMENTS elements per sample
    (counted with `channels` channels when given: a layer's output width)."""
    t, per_frame_elements = x.shape[2], (channels or x.shape[1]) * x.shape[3] * x.shape[4]
    step = max(1, FRAME_CHUNK_ELEMENTS * chunk_scale(x) // per_frame_elements)
    return [slice(start, min(start + step, t)) for start in range(0, t, step)]


def concat_frames(parts: list[torch.Tensor], frames: slice) -> torch.Tensor:
    """The channel concatenation of `parts` (B, C_i, T, H, W) for a slice of frames (the skip connections'
    concatenation, made one chunk at a time)."""
    if len(parts) == 1:
        return parts[0][:, :, frames]
    return torch.cat([p[:, :, frames] for p in parts], dim=1)


def map_chunks(fn, chunks: list[slice], frames: int) -> torch.Tensor:
    """out[:, :, s] = fn(s) for every chunk s of the frame axis; out (B, C, T, H, W) channels_last_3d,
    allocated from the first result (its dtype follows autocast)."""
    out = None
    for frame_slice in chunks:
        y = fn(frame_slice)
        if out is None:
            out = torch.empty((*y.shape[:2], frames, *y.shape[3:]), dtype=y.dtype, device=y.device,
                              memory_format=torch.channels_last_3d)
        out[:, :, frame_slice] = y
    return out


def autocast_on(x: torch.Tensor) -> bool:
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


# --- building blocks -------------------------------------------------------------------------------

class ChannelLayerNorm(nn.Module):
    """LN_c: normalisation over channels, gain only, eps 1e-5 (the PreNorm of §4.4/4.5). Token layout."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(tokens, tokens.shape[-1:], self.gamma, None, 1e-5)


class GainLayerNorm(nn.Module):
    """Gain-only LayerNorm of the cross-attention (§4.3); its eps is chosen by the caller."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))


class SinusoidalTimeEmbedding(nn.Module):
    """t (B,) int -> (B, dim): [sin(t f), cos(t f)], f_i = exp(-i ln(10000) / (dim/2 - 1)) (§4.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t[:, None] * freqs[None, :]  # float32 from the integer step, as the reference
        return torch.cat([args.sin(), args.cos()], dim=-1)


@dataclass
class CrossAttentionTerms:
    """The x_t-independent part of a block's three cross-attentions (audio, pose, eye; a = 0, 1, 2).

    Per token, head h of attention a puts weight s_ah = sigmoid(<q_ah, w_ah> / |q_ah|) on the frame's
    condition and 1 - s_ah on the null slot, so the attention's to_out output is y_a = V_a0 + sum_h
    s_ah V_ah (V_a0 = to_out of the null value, V_ah = to_out of head h's value difference). Its
    gain-only LayerNorm is then exact from c_a = [1, s_a1, ...]: mean and centring are linear in c_a,
    the variance is c_a^T G_a c_a with the Gram matrix G_a of the centred V_a, so the block's whole
    conditioning term is one product of per-token coefficients with per-frame vectors.

    s_ah only depends on the direction of q_ah, and the input LayerNorm's scale 1/sigma is the same for
    every head of a token: the norm reduces to centring the token, a linear map folded into the weights
    (`q_weight`, and so `w`'s logit weights). The tokens enter as they are, with no normalisation pass.

    Stored once per render: the condition MLPs' keys (as w) and values, a few hundred floats per frame
    and block; `for_frames` expands them to the per-frame products a chunk of frames needs.
    """

    q_weight: torch.Tensor  # (3 * heads * dh, cin): to_q with the input norm (gain, centring) folded in
    w: torch.Tensor  # (B, T, 3, heads, dh)
    value_diff: torch.Tensor  # (B, T, 3, heads, dh): value - null value
    null_out: torch.Tensor  # (3, cout): to_out of the null value
    out_weight: torch.Tensor  # (3, cout, heads, dh): to_out weights
    gains: torch.Tensor  # (3, cout): gains of the output norms

    def for_frames(self, frames: slice = slice(None)):
        """Per-frame products for frames: logit_query (B*T', cin, 3*heads) with <q_ah, w_ah> = token @
        logit_query, Gram matrices (B*T', 3, heads+1, heads+1) and the centred value vectors times the output
        gain (B*T', 3*(heads+1), cout)."""
        w, value_diff = self.w[:, frames], self.value_diff[:, frames]
        b, t, _, heads, dh = w.shape
        logit_query = torch.einsum("ahdc,btahd->btcah", self.q_weight.view(3, heads, dh, -1), w)
        values = torch.cat([self.null_out[:, None].expand(b, t, 3, 1, -1),
                            torch.einsum("achd,btahd->btahc", self.out_weight, value_diff)], dim=3)  # V_aj
        centred = values - values.mean(-1, keepdim=True)
        gram = centred @ centred.transpose(-1, -2) / values.shape[-1]
        return (logit_query.reshape(b * t, -1, 3 * heads), gram.reshape(b * t, 3, heads + 1, heads + 1),
                (centred * self.gains[:, None, :]).reshape(b * t, 3 * (heads + 1), -1))


class CrossAttention(nn.Module):
    """Cosine cross-attention from every spatial token to [null, this frame's condition] (§4.3).

    Parameters as the reference: q = to_q(LN(x) g); k, v = to_kv(context); the learned `null_kv`
    row 0 is the null key, row 1 the null value (shared by all heads); q, k L2-normalised, scaled by
    q_scale / k_scale; logits = scale * q.k; out = LN(to_out(attn v)) g_out (gain-only norms).
    Softmax over two keys: weight on the condition = sigmoid(logit_cond - logit_null), and
    logit_cond - logit_null = <q / |q|, w> with w = scale q_scale k_scale (k_cond/|k_cond| -
    k_null/|k_null|), a per-frame vector. `prepare` returns those x-independent pieces.
    """

    def __init__(self, dim: int, dim_out: int, context_dim: int, heads: int, dim_head: int, scale: float):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, scale
        inner = heads * dim_head
        self.norm = GainLayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Sequential(nn.Linear(inner, dim_out, bias=False), GainLayerNorm(dim_out))

    def prepare(self, context: torch.Tensor):
        """context (B, T, context_dim) -> q_weight (h*dh, cin) (the input norm's gain and centring folded in),
        w (B, T, h, dh), value - null value (B, T, h, dh), to_out of the null value (cout,), to_out weight
        (cout, h, dh)."""
        b, t, _ = context.shape
        k, v = self.to_kv(context).view(b, t, 2, self.heads, self.dim_head).unbind(2)
        null_k, null_v = self.null_kv.unbind(0)
        k_cond = F.normalize(k, dim=-1) * self.k_scale
        k_null = F.normalize(null_k, dim=-1) * self.k_scale
        w = self.scale * self.q_scale * (k_cond - k_null)
        out_weight = self.to_out[0].weight.view(-1, self.heads, self.dim_head)  # (cout, h, dh)
        q_weight = self.to_q.weight * self.norm.g
        q_weight = q_weight - q_weight.mean(1, keepdim=True)  # LN's centring, folded (see CrossAttentionTerms)
        return q_weight, w, v - null_v, out_weight.sum(1) @ null_v, out_weight


def group_moments(h: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance), each (B, groups) in float32, of h (B, C, T, H, W) in any memory layout."""
    var, mean = torch.var_mean(h.unflatten(1, (groups, -1)).float(), dim=(2, 3, 4, 5), correction=0)
    return mean, var


class ConvBlock(nn.Module):
    """Per-frame conv 3x3 -> GroupNorm over (channels of a group, all frames) -> [scale/shift] -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None):
        h = self.norm(per_frame(self.proj, x))
        if scale_shift is not None:
            scale, shift = scale_shift  # (B, C, 1, 1, 1) each
            h = torch.addcmul(shift, h, scale + 1)
        return F.silu(h)

    def moments(self, h: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """GroupNorm statistics of h (B, C, T', H, W), a chunk of frames: (elements per group, mean (B, G),
        variance (B, G)), from the native GroupNorm kernel (its output is discarded)."""
        b, c = h.shape[:2]
        count = h[0, 0].numel() * (c // self.norm.num_groups)
        if h.is_cuda:  # the CUDA kernel takes contiguous (not channels_last) input only: reduce the view instead
            return count, *group_moments(h, self.norm.num_groups)
        _, mean, rstd = torch.ops.aten.native_group_norm(h, None, None, b, c, h[0, 0].numel(),
                                                         self.norm.num_groups, self.norm.eps)
        return count, mean.float(), rstd.float().pow(-2) - self.norm.eps

    def affine(self, moments: list, scale_shift=None) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm over all frames (statistics of the chunks' `moments` combined exactly) and the
        scale/shift as one per-channel affine map: (a, b), each (B, C, 1, 1, 1), norm-then-scale/shift(h)
        = h * a + b."""
        counts = torch.tensor([n for n, _, _ in moments], dtype=torch.float32)[:, None, None]
        means, variances = torch.stack([m for _, m, _ in moments]), torch.stack([v for _, _, v in moments])
        counts = counts.to(means.device)
        mean = (counts * means).sum(0) / counts.sum()
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / counts.sum()  # (B, G)
        per_group = self.norm.num_channels // self.norm.num_groups
        a = torch.rsqrt(var + self.norm.eps).repeat_interleave(per_group, dim=1) * self.norm.weight  # (B, C)
        b = self.norm.bias - mean.repeat_interleave(per_group, dim=1) * a
        a, b = a[:, :, None, None, None], b[:, :, None, None, None]
        if scale_shift is not None:
            scale, shift = scale_shift
            a, b = a * (scale + 1), b * (scale + 1) + shift
        return a, b


class ResnetBlock(nn.Module):
    """Residual block with time scale/shift and audio/pose/eye cross-attention conditioning (§4.2).

    h = block1(x, time scale/shift) + sum of the three cross-attentions read from the block INPUT x;
    out = block2(h) + res_conv(x). An unconditioned block (output heads) has no time or condition
    input; it still owns the three cross-attentions because the released checkpoints store them,
    but they are unused by the reference forward and kept frozen here.
    """

    def __init__(self, config: A2VConfig, dim: int, dim_out: int, conditioned: bool = True):
        super().__init__()
        c = config
        self.conditioned = conditioned
        self.cross_attn_norm_eps = c.cross_attn_norm_eps
        if conditioned:
            time_dim = 4 * c.dim
            self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
            self.audio_mlp = nn.Sequential(nn.SiLU(), nn.Linear(c.cond_audio, 2 * dim_out))
            self.pose_mlp = nn.Sequential(nn.SiLU(), nn.Linear(c.cond_pose, 2 * dim_out))
            self.eye_mlp = nn.Sequential(nn.SiLU(), nn.Linear(c.cond_eye, 2 * dim_out))
        self.cross_attn_aud, self.cross_attn_pose, self.cross_attn_eye = (
            CrossAttention(dim, dim_out, 2 * dim_out, c.cross_heads, c.cross_dim_head, c.cross_scale) for _ in range(3)
        )
        if not conditioned:
            for attn in (self.cross_attn_aud, self.cross_attn_pose, self.cross_attn_eye):
                attn.requires_grad_(False)
        self.block1 = ConvBlock(dim, dim_out, c.groups)
        self.block2 = ConvBlock(dim_out, dim_out, c.groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def prepare(self, cond: torch.Tensor) -> CrossAttentionTerms:
        """cond (B, T, 1032) -> the block's cross-attention terms (once per render)."""
        audio, pose, eye = cond.split([self.audio_mlp[1].in_features, self.pose_mlp[1].in_features,
                                       self.eye_mlp[1].in_features], dim=-1)
        attns = (self.cross_attn_aud, self.cross_attn_pose, self.cross_attn_eye)
        parts = [attn.prepare(mlp(c)) for attn, mlp, c in zip(attns, (self.audio_mlp, self.pose_mlp, self.eye_mlp),
                                                               (audio, pose, eye))]
        q_weights, ws, value_diffs, null_outs, out_weights = zip(*parts)
        gains = torch.stack([attn.to_out[1].g for attn in attns])
        return CrossAttentionTerms(torch.cat(q_weights), torch.stack(ws, dim=2), torch.stack(value_diffs, dim=2),
                                   torch.stack(null_outs), torch.stack(out_weights), gains)

    def cross_attention(self, x: torch.Tensor, terms: CrossAttentionTerms, frames: slice = slice(None),
                        add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the audio, pose and eye cross-attentions of x (B, C, T', H, W), the given frames of the
        render -> (B, cout, T', H, W); or added in place to `add_to` (channels_last_3d, that shape)."""
        b, c, t, h, w = x.shape
        eps = self.cross_attn_norm_eps  # of the output norm (the input norm folds into the weights)
        if eps is None:
            eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        logit_query, gram, out_vectors = terms.for_frames(frames)
        tokens = to_tokens(x).reshape(b * t, h * w, c)  # (B*T, HW, cin), unnormalised (see CrossAttentionTerms)
        heads = logit_query.shape[-1] // 3
        q = F.linear(tokens, terms.q_weight)  # (B*T, HW, 3*h*dh)
        logits = tokens @ logit_query  # (B*T, HW, 3*h)
        if native.cross_attention_supported(q, heads, q.shape[-1] // (3 * heads)):
            coef = native.cross_attention_coefficients(q, logits, gram, eps)  # the lines below, in one pass
        else:
            q_norm = torch.linalg.vector_norm(q.unflatten(-1, (3 * heads, -1)), dim=-1)
            attn_cond = torch.sigmoid(logits.div_(q_norm.clamp_min(1e-12)))  # (B*T, HW, 3*h)
            coef = F.pad(attn_cond.unflatten(-1, (3, heads)), (1, 0), value=1.0)  # c_a: (B*T, HW, 3, h+1)
            variance = (torch.einsum("bnai,baij->bnaj", coef, gram) * coef).sum(-1).clamp_min(0)
            coef = (coef * torch.rsqrt(variance + eps)[..., None]).flatten(-2)  # (B*T, HW, 3(h+1))
        if (add_to is not None and b == 1 and add_to.dtype == coef.dtype == out_vectors.dtype
                and not autocast_on(x)):  # the product accumulated into the destination's tokens
            dest = to_tokens(add_to).view(t, h * w, -1)
            torch.baddbmm(dest, coef, out_vectors, out=dest)
            return add_to
        out = from_tokens(torch.matmul(coef, out_vectors).view(b, t, h, w, -1))  # (B, cout, T', H, W)
        return out if add_to is None else add_to.add_(out)

    def forward(self, x, time_emb=None, terms: CrossAttentionTerms | None = None) -> torch.Tensor:
        """x (B, cin, T, H, W), time_emb (B, 4*dim) -> (B, cout, T, H, W)."""
        scale_shift = None
        if self.conditioned:
            scale_shift = self.time_mlp(time_emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift)
        if self.conditioned:
            h = h + self.cross_attention(x, terms)
        h = self.block2(h)
        return h + per_frame(self.res_conv, x)

    @torch.no_grad()
    def infer(self, inputs: list[torch.Tensor], time_emb=None, terms: CrossAttentionTerms | None = None):
        """`forward` of the channel concatenation of inputs, chunk by chunk of frames (inference): one new
        (B, cout, T, H, W) activation, written in place through three passes (conv1 | GroupNorm-1 ...
        conv2 | GroupNorm-2 ...), each GroupNorm's statistics taken over the whole clip in between."""
        frames = inputs[0].shape[2]
        chunks = frame_chunks(inputs[0])
        if len(chunks) == 1 and len(inputs) > 1:  # a short clip: concatenate the skip connection once
            inputs = [concat_frames(inputs, chunks[0])]
        scale_shift = None
        if self.conditioned:
            scale_shift = self.time_mlp(time_emb)[:, :, None, None, None].chunk(2, dim=1)

        def conv1(s: slice) -> torch.Tensor:
            y = per_frame(self.block1.proj, concat_frames(inputs, s))
            moments.append(self.block1.moments(y))
            return y

        moments = []
        h = map_chunks(conv1, chunks, frames)
        a, b = self.block1.affine(moments, scale_shift)
        moments = []
        for s in chunks:  # h = conv2(SiLU(GN(conv1 x) * (scale + 1) + shift) + cross-attention(x))
            part = h[:, :, s]
            F.silu(part.mul_(a).add_(b), inplace=True)
            if self.conditioned:
                self.cross_attention(concat_frames(inputs, s), terms, s, add_to=part)
            y = per_frame(self.block2.proj, part)  # a per-frame conv: only this chunk's frames
            moments.append(self.block2.moments(y))
            part.copy_(y)
        a, b = self.block2.affine(moments)
        for s in chunks:  # h = SiLU(GN(h)) + res_conv(x)
            part = h[:, :, s]
            F.silu(part.mul_(a).add_(b), inplace=True)
            part += per_frame(self.res_conv, concat_frames(inputs, s))
        return h


class FrameAttention(nn.Module):
    """Residual attention within each frame: subclasses define `attend(x)`, the added term."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(x)

    @torch.no_grad()
    def infer_(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` in place, chunk by chunk of frames (inference)."""
        for s in frame_chunks(x):
            x[:, :, s] += self.attend(x[:, :, s])
        return x


class SpatialLinearAttention(FrameAttention):
    """Residual(PreNorm) linear attention over the H*W positions of each frame (§4.4, levels).

    Per frame and head: q softmax over features, k softmax over positions, context = sum_n k_n v_n^T
    (dh x dh), out = context^T q, then to_out. Here the k normalisation is applied to the small
    context, and where a frame has more positions than channels to_out (and the q scale) is folded
    into it, so per token only q is touched again.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> the attention output added to x by the residual connection."""
        b, c, t, h, w = x.shape
        heads, dh, inner = self.heads, self.dim_head, self.heads * self.dim_head
        tokens = self.norm(to_tokens(x).reshape(b * t, h * w, c))
        q = F.linear(tokens, self.to_qkv.weight[:inner]).view(b * t, h * w, heads, dh).softmax(dim=-1)
        # k and v feature-major, (head, k/v, feature) rows: every head's k and v are contiguous (dh, HW) blocks, so
        # the softmax over positions reads rows and one batched product makes all the heads' contexts
        kv_weight = self.to_qkv.weight[inner:].view(2, heads, dh, c).transpose(0, 1).reshape(2 * inner, c)
        kv = torch.matmul(kv_weight, tokens.transpose(1, 2)).view(b * t * heads, 2, dh, h * w)
        k, v = kv[:, 0], kv[:, 1]
        k = k.sub_(k.detach().amax(dim=-1, keepdim=True)).exp_()  # the shift does not change the softmax
        context = torch.bmm(k, v.transpose(1, 2)) / k.sum(dim=-1, keepdim=True)  # (B*T*heads, dh, dh)
        context = context.view(b * t, heads, dh, dh)
        out_weight = self.to_out.weight * dh**-0.5
        if h * w > c:  # more positions than channels: fold to_out into each frame's contexts
            fold = torch.einsum("bhde,che->bhdc", context, out_weight.view(c, heads, dh))
            out = torch.baddbmm(self.to_out.bias, q.reshape(b * t, h * w, -1), fold.reshape(b * t, -1, c))
        else:
            out = F.linear(torch.einsum("bnhd,bhde->bnhe", q, context).reshape(b * t, h * w, -1), out_weight,
                           self.to_out.bias)
        return from_tokens(out.view(b, t, h, w, c))


class SpatialAttention(FrameAttention):
    """Residual(PreNorm) softmax attention over the H*W positions of each frame (§4.4, middle)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> the attention output added to x by the residual connection."""
        b, c, t, h, w = x.shape
        tokens = to_tokens(x).reshape(b * t, h * w, c)
        qkv = self.to_qkv(self.norm(tokens)).view(b * t, h * w, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*T, heads, HW, dh)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * t, h * w, -1)
        return from_tokens(self.to_out(out).view(b, t, h, w, c))


class RelativeBiasTable:
    """bias_fn for sequences of T frames: the relative bias of every offset -(T-1)..T-1 computed once
    per render (T5 buckets + embedding), then looked up by index. rel (any shape) -> (heads, *shape)."""

    def __init__(self, bias: RelativePositionBias, frames: int, device):
        self.offset = frames - 1
        self.table = bias(torch.arange(-self.offset, frames, device=device))  # (heads, 2T - 1)

    def __call__(self, rel: torch.Tensor) -> torch.Tensor:
        return self.table[:, rel + self.offset]


@dataclass
class TemporalContext:
    """What every temporal attention of one render shares (§4.5)."""

    rotation: torch.Tensor  # (T, 1, 1, dh/2) complex: exp(i * frame index * RoPE frequency)
    bias: RelativeBiasTable
    window: int | None
    reference_mode: bool
    masks: dict = field(default_factory=dict)  # local_attention's block masks, made once per render
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # the native kernel's RoPE tables, made on first use

    @classmethod
    def build(cls, rotary_emb: RotaryEmbedding, bias: RelativePositionBias, frames: int, window, reference_mode,
              device) -> "TemporalContext":
        angles = rotary_emb.angles(torch.arange(frames, device=device))[:, 0::2]  # (T, dh/2)
        rotation = torch.polar(torch.ones_like(angles), angles)[:, None, None, :]
        return cls(rotation, RelativeBiasTable(bias, frames, device), window, reference_mode)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE on x (T, n, heads, dh) (§4.5): the interleaved pairs (x_2i, x_2i+1) are complex numbers
        multiplied by exp(i angle), i.e. x cos + (-x_2i+1, x_2i) sin, as rotary-embedding-torch does."""
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        pairs = torch.view_as_complex(work.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * self.rotation.to(pairs.dtype)).flatten(-2).to(x.dtype)

    def rotate_(self, x: torch.Tensor) -> torch.Tensor:
        """`rotate` in place (x float32, last dimension contiguous), x (T, n, ..., dh): no new tensor."""
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        pairs.mul_(self.rotation.view(self.frames, *(1,) * (pairs.ndim - 2), -1))
        return x

    @property
    def frames(self) -> int:
        return self.rotation.shape[0]

    def rope_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the RoPE angles, each (T, dh/2) contiguous (the native kernel's input), made once."""
        if self.cos_sin is None:
            pairs = self.rotation.reshape(self.frames, -1)
            self.cos_sin = (pairs.real.contiguous(), pairs.imag.contiguous())
        return self.cos_sin


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference's formulation, for benchmarks: explicit (..., T, T) logits + bias (window mask
    included), max-subtracted softmax. Memory O(T^2) per sequence."""
    sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias
    sim = sim - sim.amax(dim=-1, keepdim=True)
    return sim.softmax(dim=-1) @ v


class TemporalAttention(nn.Module):
    """Residual(PreNorm) attention across frames at every spatial position, RoPE + relative bias (§4.5).

    Frame i attends to frames |j - i| <= window (`local_attention`, memory linear in T), a chunk of
    spatial positions at a time; with `reference_mode` it computes all positions at once with the
    reference's full T x T logits and window mask instead (benchmarks).
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        # RoPE frequencies; the same fixed values in every temporal attention (the reference stores
        # them under each one), applied through the render's TemporalContext
        self.rotary_emb = RotaryEmbedding(dim_head)

    def attend(self, tokens: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        """tokens (T, n, C) of n spatial positions of one sample -> attention output (T, n, C)."""
        t, n, c = tokens.shape
        qkv = self.to_qkv(self.norm(tokens))
        if not ctx.reference_mode and native.banded_attention_supported(qkv, self.dim_head, ctx.window):
            # inference on CPU in float32: RoPE, window and softmax in one native pass (dawn/models/native.py)
            cos, sin = ctx.rope_cos_sin()
            return self.to_out(native.banded_attention(qkv, self.heads, cos, sin, ctx.bias.table, ctx.window))
        qkv = qkv.view(t, n, 3, self.heads, self.dim_head)
        if qkv.dtype == torch.float32 and not torch.is_grad_enabled():
            ctx.rotate_(qkv[:, :, :2])  # RoPE on q and k at once, in the projection's buffer
            q, k, v = qkv.unbind(2)
        else:
            q, k, v = qkv.unbind(2)
            q, k = ctx.rotate(q), ctx.rotate(k)
        # (T, n, heads, dh) -> (n, heads, T, dh) views: attention reads the frame-major layout as is
        q, k, v = (y.permute(1, 2, 0, 3) for y in (q, k, v))
        if ctx.reference_mode:
            out = reference_attention(q, k, v, full_attention_bias(t, ctx.bias, ctx.window, q.device, q.dtype))
        else:
            out = local_attention(q, k, v, ctx.window, ctx.bias, TEMPORAL_QUERY_BLOCK, ctx.masks)
        return self.to_out(out.permute(2, 0, 1, 3).reshape(t, n, -1))

    def position_chunks(self, x: torch.Tensor, ctx: TemporalContext) -> list[tuple[int, slice]]:
        """(sample, slice of the H*W positions) pieces of x (B, C, T, H, W) that are attended at once."""
        b, _, t, h, w = x.shape
        tokens = TEMPORAL_TOKENS_PER_CHUNK * chunk_scale(x)
        native_kernel = not autocast_on(x) and native.banded_attention_supported(x, self.dim_head, ctx.window)
        minimum = NATIVE_MIN_TEMPORAL_POSITIONS if native_kernel else MIN_TEMPORAL_POSITIONS
        step = h * w if ctx.reference_mode else max(minimum, tokens // t)
        return [(i, slice(start, start + step)) for i in range(b) for start in range(0, h * w, step)]

    def forward(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = to_tokens(x).reshape(b, t, h * w, c)
        out = torch.empty_like(tokens)
        for i, positions in self.position_chunks(x, ctx):
            out[i, :, positions] = self.attend(tokens[i, :, positions], ctx)
        return x + from_tokens(out.view(b, t, h, w, c))

    @torch.no_grad()
    def infer_(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        """`forward` in place (inference): a position's output only reads that position's frames."""
        b, c, t, h, w = x.shape
        tokens = to_tokens(x).view(b, t, h * w, c)  # x is channels_last_3d: a view
        for i, positions in self.position_chunks(x, ctx):
            tokens[i, :, positions] += self.attend(tokens[i, :, positions], ctx)
        return x


class Level(nn.Module):
    """One U-Net resolution: two residual blocks, spatial and temporal attention, then resampling."""

    def __init__(self, config: A2VConfig, dim: int, dim_out: int, resample: nn.Module):
        super().__init__()
        self.res1 = ResnetBlock(config, dim, dim_out)
        self.res2 = ResnetBlock(config, dim_out, dim_out)
        self.spatial_attn = SpatialLinearAttention(dim_out, config.heads, config.dim_head)
        self.temporal_attn = TemporalAttention(dim_out, config.heads, config.dim_head)
        self.resample = resample

    def forward(self, x, time_emb, terms: tuple[CrossAttentionTerms, CrossAttentionTerms], temporal: TemporalContext):
        """Returns (features before resampling, resampled features)."""
        x = self.res1(x, time_emb, terms[0])
        x = self.res2(x, time_emb, terms[1])
        x = self.temporal_attn(self.spatial_attn(x), temporal)
        return x, per_frame(self.resample, x)

    @torch.no_grad()
    def infer(self, inputs: list[torch.Tensor], time_emb, terms, temporal: TemporalContext):
        """`forward` of the channel concatenation of inputs (inference, chunked). Empties `inputs` once
        they are read, so that the caller's list holds no reference to them."""
        x = self.res1.infer(inputs, time_emb, terms[0])
        inputs.clear()
        x = self.res2.infer([x], time_emb, terms[1])
        self.temporal_attn.infer_(self.spatial_attn.infer_(x), temporal)
        if isinstance(self.resample, nn.Identity):
            return x, x
        return x, map_chunks(lambda s: per_frame(self.resample, x[:, :, s]), frame_chunks(x), x.shape[2])


class OutputHead(nn.Module):
    """Unconditioned residual block then a 1x1 convolution (§4.1 step 9)."""

    def __init__(self, config: A2VConfig, dim: int, dim_hidden: int, dim_out: int):
        super().__init__()
        self.res = ResnetBlock(config, dim, dim_hidden, conditioned=False)
        self.proj = nn.Conv2d(dim_hidden, dim_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self.proj, self.res(x))

    @torch.no_grad()
    def infer(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        h = self.res.infer(inputs)
        return map_chunks(lambda s: per_frame(self.proj, h[:, :, s]), frame_chunks(h), h.shape[2])


@dataclass
class A2VContext:
    """Everything one render's denoising steps share (`UNet3D.prepare`)."""

    source_init: torch.Tensor  # (B, dim, 1, L, L): input-convolution response to the source features
    downs: list[tuple[CrossAttentionTerms, CrossAttentionTerms]]
    mid: tuple[CrossAttentionTerms, CrossAttentionTerms]
    ups: list[tuple[CrossAttentionTerms, CrossAttentionTerms]]
    temporal: TemporalContext

    @property
    def frames(self) -> int:
        return self.temporal.frames


class UNet3D(nn.Module):
    """The A2V-FDM 3D U-Net (`DynamicNfUnet3D`, ARCHITECTURE.md §4)."""

    def __init__(self, config: A2VConfig):
        super().__init__()
        c = config
        self.config = c
        self.reference_attention = False  # A2VFDM.use_reference_attention
        dims = [c.dim] + [c.dim * m for m in c.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))

        self.time_rel_pos_bias = RelativePositionBias(c.heads, c.rel_pos_buckets, c.rel_pos_max_distance)
        self.init_conv = nn.Conv2d(c.in_channels, c.dim, c.init_kernel, padding=c.init_kernel // 2)
        self.init_temporal_attn = TemporalAttention(c.dim, c.heads, c.dim_head)
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(c.dim), nn.Linear(c.dim, 4 * c.dim), nn.GELU(),
                                      nn.Linear(4 * c.dim, 4 * c.dim))

        last = len(in_out) - 1
        self.downs = nn.ModuleList(
            Level(c, d_in, d_out, nn.Conv2d(d_out, d_out, 4, 2, 1) if i < last else nn.Identity())
            for i, (d_in, d_out) in enumerate(in_out)
        )
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(c, mid, mid)
        self.mid_spatial_attn = SpatialAttention(mid, c.heads, c.dim_head)
        self.mid_temporal_attn = TemporalAttention(mid, c.heads, c.dim_head)
        self.mid_block2 = ResnetBlock(c, mid, mid)
        self.ups = nn.ModuleList(
            Level(c, 2 * d_out, d_in, nn.ConvTranspose2d(d_in, d_in, 4, 2, 1) if i < last else nn.Identity())
            for i, (d_in, d_out) in enumerate(reversed(in_out))
        )
        self.flow_head = OutputHead(c, 2 * c.dim, c.dim, 2)
        self.occlusion_head = OutputHead(c, 2 * c.dim, c.dim, 1)

    def prepare(self, source_features: torch.Tensor, cond: torch.Tensor) -> A2VContext:
        """source_features (B, C+16, L, L), cond (B, T, 1032) -> the render's A2VContext."""
        c = self.config
        w = self.init_conv.weight[:, c.motion_channels:]
        source_init = F.conv2d(source_features, w, self.init_conv.bias, padding=self.init_conv.padding)
        return A2VContext(
            source_init=source_init[:, :, None],
            downs=[(level.res1.prepare(cond), level.res2.prepare(cond)) for level in self.downs],
            mid=(self.mid_block1.prepare(cond), self.mid_block2.prepare(cond)),
            ups=[(level.res1.prepare(cond), level.res2.prepare(cond)) for level in self.ups],
            temporal=TemporalContext.build(self.init_temporal_attn.rotary_emb, self.time_rel_pos_bias, cond.shape[1],
                                           c.window, self.reference_attention, cond.device),
        )

    def forward_prepared(self, x_t: torch.Tensor, t: torch.Tensor, ctx: A2VContext) -> torch.Tensor:
        """x_t (B, 3, T, L, L), t (B,) int -> eps (B, 3, T, L, L) (§4.1). Without gradients: `infer`."""
        if x_t.shape[2] != ctx.frames:
            raise ValueError(f"x_t has {x_t.shape[2]} frames but the context was prepared for {ctx.frames}")
        if not torch.is_grad_enabled():
            return self.infer(x_t, t, ctx)
        c = self.config
        x_t = x_t.contiguous(memory_format=torch.channels_last_3d)
        w = self.init_conv.weight[:, : c.motion_channels]
        x = per_frame(lambda f: F.conv2d(f, w, padding=self.init_conv.padding), x_t) + ctx.source_init
        r = x
        x = self.init_temporal_attn(x, ctx.temporal)
        time_emb = self.time_mlp(t)

        skips = []
        for level, terms in zip(self.downs, ctx.downs):
            skip, x = level(x, time_emb, terms, ctx.temporal)
            skips.append(skip)
        x = self.mid_block1(x, time_emb, ctx.mid[0])
        x = self.mid_temporal_attn(self.mid_spatial_attn(x), ctx.temporal)
        x = self.mid_block2(x, time_emb, ctx.mid[1])
        for level, terms in zip(self.ups, ctx.ups):
            _, x = level(torch.cat([x, skips.pop()], dim=1), time_emb, terms, ctx.temporal)

        x = torch.cat([x, r], dim=1)
        return torch.cat([self.flow_head(x), self.occlusion_head(x)], dim=1).contiguous()

    @torch.no_grad()
    def infer(self, x_t: torch.Tensor, t: torch.Tensor, ctx: A2VContext) -> torch.Tensor:
        """`forward_prepared` for inference: the same steps, per-frame layers in chunks of frames and
        activations updated in place (memory: three level-0 activations of the clip at the peak)."""
        c = self.config
        w = self.init_conv.weight[:, : c.motion_channels]

        def input_conv() -> torch.Tensor:  # r of `forward_prepared`
            return map_chunks(lambda s: per_frame(lambda f: F.conv2d(f, w, padding=self.init_conv.padding),
                                                  x_t[:, :, s]) + ctx.source_init, frame_chunks(x_t, c.dim), x_t.shape[2])

        x = self.init_temporal_attn.infer_(input_conv(), ctx.temporal)
        time_emb = self.time_mlp(t)

        skips = []
        for level, terms in zip(self.downs, ctx.downs):
            skip, x = level.infer([x], time_emb, terms, ctx.temporal)
            skips.append(skip)
        x = self.mid_block1.infer([x], time_emb, ctx.mid[0])
        self.mid_temporal_attn.infer_(self.mid_spatial_attn.infer_(x), ctx.temporal)
        x = self.mid_block2.infer([x], time_emb, ctx.mid[1])
        for level, terms in zip(self.ups, ctx.ups):
            inputs = [x, skips.pop()]
            del x  # `level` frees the inputs once read
            _, x = level.infer(inputs, time_emb, terms, ctx.temporal)

        inputs = [x, input_conv()]  # r made again (one 3-channel conv) rather than held through the U-Net
        del x
        flow = self.flow_head.infer(inputs)
        return torch.cat([flow, self.occlusion_head.infer(inputs)], dim=1).contiguous()


class FaceBoxEncoder(nn.Module):
    """Face-box mask (B, 1, S, S) -> (B, 16, S/4, S/4): two stride-2 conv 3x3 + ReLU (§3 step 2)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(mask))))


class A2VFDM(nn.Module):
    """A2V-FDM: the U-Net denoiser, the face-box encoder (trained and saved here, §9.1) and the schedule.

    Render: feats = source_features(z_src, bbox); denoise = denoiser(feats, cond); then a sampler
    (dawn.models.diffusion) calls denoise(x_t, t) once per step.
    """

    config_class = A2VConfig

    def __init__(self, config: A2VConfig):
        super().__init__()
        self.config = config
        self.unet = UNet3D(config)
        self.face_encoder = FaceBoxEncoder(config.face_channels)
        self.schedule = CosineSchedule(timesteps=config.timesteps)

    def use_reference_attention(self, enabled: bool = True) -> "A2VFDM":
        """Benchmarks and tests: temporal attention computed the reference's way (all T x T logits at once)
        instead of windowed. A runtime switch, not part of the saved config."""
        self.unet.reference_attention = enabled
        return self

    def face_mask(self, bbox: torch.Tensor, size: int) -> torch.Tensor:
        """bbox (B, 6) [x_min, x_max, y_min, y_max, H, W] in pixels -> (B, 1, size, size) 0/1 mask.

        Box scaled to size x size; left/top truncated, right/bottom = trunc(value + 1), both ends
        inclusive (§3 step 2). x is scaled by size/W and y by size/H, or with
        `reference_bbox_convention` by size/H and size/W as the reference does (§9.2).
        """
        x_min, x_max, y_min, y_max, h, w = bbox.double().unbind(-1)
        x_side, y_side = (h, w) if self.config.reference_bbox_convention else (w, h)
        left, right = (x_min * size / x_side).trunc(), (x_max * size / x_side + 1).trunc()
        top, bottom = (y_min * size / y_side).trunc(), (y_max * size / y_side + 1).trunc()
        idx = torch.arange(size, device=bbox.device, dtype=torch.float64)
        rows = (idx >= top[:, None]) & (idx <= bottom[:, None])
        cols = (idx >= left[:, None]) & (idx <= right[:, None])
        return (rows[:, :, None] & cols[:, None, :]).to(torch.float32)[:, None]

    def source_features(self, z_src: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        """z_src (B, C, L, L) LFG source latent, bbox (B, 6) -> (B, C + 16, L, L) = [z_src, face emb]."""
        mask = self.face_mask(bbox, 4 * z_src.shape[-1]).to(z_src.dtype)
        return torch.cat([z_src, self.face_encoder(mask)], dim=1)

    def prepare(self, source_features: torch.Tensor, cond: torch.Tensor) -> A2VContext:
        """source_features (B, C+16, L, L), cond (B, T, 1032) -> context shared by all steps."""
        return self.unet.prepare(source_features, cond)

    def forward_prepared(self, x_t: torch.Tensor, t: torch.Tensor, context: A2VContext) -> torch.Tensor:
        """x_t (B, 3, T, L, L), t (B,) int64 -> eps (or v, per config.prediction) (B, 3, T, L, L)."""
        return self.unet.forward_prepared(x_t, t, context)

    def forward(self, x_t, t, source_features, cond) -> torch.Tensor:
        """x_t (B, 3, T, L, L), t (B,), source_features (B, C+16, L, L), cond (B, T, 1032) -> eps (or v)."""
        return self.forward_prepared(x_t, t, self.prepare(source_features, cond))

    @torch.no_grad()
    def denoiser(self, source_features: torch.Tensor, cond: torch.Tensor):
        """For samplers: prepare once, return denoise(x_t, t) -> eps (converted from v when the network
        predicts v) (inference, no gradients)."""
        context = self.prepare(source_features, cond)

        @torch.no_grad()
        def network(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.forward_prepared(x_t, t, context)

        return eps_denoiser(self.schedule, network, self.config.prediction)

    # --- motion representation (A2VConfig.motion_target) ----------------------------------------------
    @property
    def clip_samples(self) -> bool:
        """Whether samplers clip x0 to [-1, 1] (grids are; offsets are not bounded)."""
        return self.config.motion_target == "grid"

    def motion_from_flows(self, flows: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, L, L) [grid x, grid y, 2*occ-1] from the LFG -> the x0 this network generates."""
        if self.config.motion_target == "grid":
            return flows
        identity = coordinate_grid(*flows.shape[-2:], flows.device).permute(2, 0, 1)[:, None].to(flows.dtype)
        return torch.cat([(flows[:, :2] - identity) / self.config.offset_scale, flows[:, 2:]], dim=1)

    def flows_from_motion(self, motion: torch.Tensor) -> torch.Tensor:
        """Inverse of `motion_from_flows` (occlusion channel clamped to [-1, 1]) -> [grid x, grid y, 2*occ-1]."""
        if self.config.motion_target == "grid":
            return motion
        identity = coordinate_grid(*motion.shape[-2:], motion.device).permute(2, 0, 1)[:, None].to(motion.dtype)
        return torch.cat([motion[:, :2] * self.config.offset_scale + identity, motion[:, 2:].clamp(-1, 1)], dim=1)
