"""The A2V-FDM U-Net forward computed the way the official code computes it: a benchmark baseline.

`reference_forward(a2v, x_t, t, source_features, cond)` reads the parameters of a dawn `A2VFDM` and runs
the forward as ARCHITECTURE.md §4.1-4.5 describes the official inference code running it, so that
bench/render.py can compare dawn's renderer with "the reference's way" on the same weights. It returns
dawn's eps up to float32 rounding (tests/unit/test_reference_unet.py). Use dawn's own forward
(`A2VFDM.denoiser` / `forward`) for anything else: this one is deliberately the slow, memory-hungry way.

What makes it the reference's way, step by step and at every call:
- activations (B, C, T, H, W) contiguous; every (1, k, k) convolution is a `conv3d` (the dawn Conv2d
  weight with a unit time axis), the input convolution over the full concatenation [x_t, source features
  repeated over T] (275 channels at hdtf128), resampling by (1, 4, 4) conv3d / conv_transpose3d;
- the time MLP, the audio/pose/eye condition MLPs and the three cross-attentions of every block from
  scratch: gain LayerNorm, q over all tokens, k/v per frame with the null key/value prepended (2 keys),
  cosine logits x 8, softmax, to_out + gain LayerNorm;
- the channel LayerNorm of every attention computed plainly (mean and variance over dim 1);
- spatial linear attention per frame with both softmaxes and the two context products; the middle
  spatial attention with its H*W x H*W logits materialised;
- temporal attention over all spatial positions at once with explicit (heads, T, T) logits: q k^T +
  relative bias + window mask (-1e8 where |i - j| > window), max-subtracted softmax. Memory O(T^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dawn.models.unet3d import A2VFDM

MASKED = -1e8  # what the reference adds outside the temporal window (§4.5)


def conv(x: torch.Tensor, layer, **kwargs) -> torch.Tensor:
    """A dawn per-frame Conv2d applied as the reference's Conv3d with kernel (1, k, k)."""
    k = layer.weight.shape[-1]
    return F.conv3d(x, layer.weight.unsqueeze(2), layer.bias, padding=(0, k // 2, k // 2), **kwargs)


def channel_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LN_c of PreNorm (§4.4): over the channels (dim 1) of x (B, C, T, H, W), gain only."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * gamma.view(1, -1, 1, 1, 1)


def gain_norm(x: torch.Tensor, g: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Gain-only LayerNorm over the last axis (cross-attention input and output, §4.3); eps None: the
    reference's rule, 1e-5 for float32 input and 1e-3 otherwise."""
    if eps is None:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * g


def time_embedding(unet, t: torch.Tensor) -> torch.Tensor:
    """t (B,) int -> (B, 4*dim): sinusoidal(dim) -> Linear -> exact GELU -> Linear (§4.1 step 4)."""
    first, last = unet.time_mlp[1], unet.time_mlp[3]
    half = first.in_features // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.linear(F.gelu(F.linear(emb, first.weight, first.bias)), last.weight, last.bias)


def cross_attention(attn, tokens: torch.Tensor, context: torch.Tensor, norm_eps: float | None) -> torch.Tensor:
    """Cosine cross-attention (§4.3): tokens (B*T, HW, cin), context (B*T, 1, ctx) -> (B*T, HW, cout)."""
    heads, dh = attn.heads, attn.dim_head
    n = tokens.shape[0]
    q = F.linear(gain_norm(tokens, attn.norm.g, norm_eps), attn.to_q.weight)
    k, v = F.linear(context, attn.to_kv.weight).chunk(2, dim=-1)
    q, k, v = (y.reshape(n, -1, heads, dh).transpose(1, 2) for y in (q, k, v))  # (B*T, heads, n, dh)
    null_k, null_v = (row.expand(n, heads, 1, dh) for row in attn.null_kv.unbind(0))
    k, v = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)  # 2 keys: [null, this frame]
    q, k = F.normalize(q, dim=-1) * attn.q_scale, F.normalize(k, dim=-1) * attn.k_scale
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * attn.scale
    weights = sim.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).reshape(n, -1, heads * dh)
    return gain_norm(F.linear(out, attn.to_out[0].weight), attn.to_out[1].g, norm_eps)


def conv_block(block, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
    """conv (1,3,3) -> GroupNorm -> [x (scale + 1) + shift] -> SiLU."""
    h = conv(x, block.proj)
    h = F.group_norm(h, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    if scale_shift is not None:
        scale, shift = scale_shift
        h = h * (scale + 1) + shift
    return F.silu(h)


def resnet_block(block, x: torch.Tensor, t_emb=None, cond=None, norm_eps: float | None = None) -> torch.Tensor:
    """ResnetBlock_ca_mul (§4.2) on x (B, cin, T, H, W); unconditioned when t_emb is None (output heads)."""
    scale_shift = h_cond = None
    if t_emb is not None:
        mlp = block.time_mlp[1]
        scale_shift = F.linear(F.silu(t_emb), mlp.weight, mlp.bias)[:, :, None, None, None].chunk(2, dim=1)
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # from the block INPUT x
        audio, pose, eye = cond.split([block.audio_mlp[1].in_features, block.pose_mlp[1].in_features,
                                       block.eye_mlp[1].in_features], dim=-1)

        def attend(attn, mlp_seq, part):
            context = F.linear(F.silu(part), mlp_seq[1].weight, mlp_seq[1].bias)  # (B, T, 2 cout)
            return cross_attention(attn, tokens, context.reshape(b * t, 1, -1), norm_eps)

        h_cond = (attend(block.cross_attn_pose, block.pose_mlp, pose) + attend(block.cross_attn_aud, block.audio_mlp, audio)
                  + attend(block.cross_attn_eye, block.eye_mlp, eye))
        h_cond = h_cond.reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)
    out = conv_block(block.block1, x, scale_shift)
    if h_cond is not None:
        out = out + h_cond
    out = conv_block(block.block2, out)
    res = x if isinstance(block.res_conv, torch.nn.Identity) else conv(x, block.res_conv)
    return out + res


def spatial_linear_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Residual(PreNorm(linear attention over each frame's H*W positions)) (§4.4)."""
    b, c, t, h, w = x.shape
    heads, dh = attn.heads, attn.dim_head
    frames = channel_norm(x, attn.norm.gamma).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    qkv = F.conv2d(frames, attn.to_qkv.weight[:, :, None, None])
    q, k, v = (y.reshape(b * t, heads, dh, h * w) for y in qkv.chunk(3, dim=1))
    q = q.softmax(dim=-2) * dh**-0.5  # over the features
    k = k.softmax(dim=-1)  # over the positions
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b * t, heads * dh, h, w)
    out = F.conv2d(out, attn.to_out.weight[:, :, None, None], attn.to_out.bias)
    return x + out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def softmax_attention(q, k, v, bias=None) -> torch.Tensor:
    """q (scaled), k, v (..., n, d): explicit logits (+ bias), max-subtracted softmax, @ v."""
    sim = torch.einsum("...id,...jd->...ij", q, k)
    if bias is not None:
        sim = sim + bias
    sim = sim - sim.amax(dim=-1, keepdim=True)
    return torch.einsum("...ij,...jd->...id", sim.softmax(dim=-1), v)


def spatial_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Residual(PreNorm(softmax attention over each frame's H*W tokens)), the middle level (§4.4)."""
    b, c, t, h, w = x.shape
    heads, dh = attn.heads, attn.dim_head
    tokens = channel_norm(x, attn.norm.gamma).permute(0, 2, 3, 4, 1).reshape(b, t, h * w, c)
    q, k, v = (y.reshape(b, t, h * w, heads, dh).transpose(2, 3)
               for y in F.linear(tokens, attn.to_qkv.weight).chunk(3, dim=-1))
    out = softmax_attention(q * dh**-0.5, k, v).transpose(2, 3).reshape(b, t, h * w, heads * dh)
    out = F.linear(out, attn.to_out.weight)
    return x + out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


def temporal_bias(unet, frames: int, window: int | None, device) -> torch.Tensor:
    """(heads, T, T): relative-position bias of r = j - i plus the window mask (§4.5)."""
    idx = torch.arange(frames, device=device)
    rel = idx[None, :] - idx[:, None]
    bias = unet.time_rel_pos_bias(rel)
    if window is not None:
        bias = bias + MASKED * (rel.abs() > window).to(bias.dtype)
    return bias


def temporal_attention(attn, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Residual(PreNorm(attention across frames at every spatial position, all at once)) (§4.5)."""
    b, c, t, h, w = x.shape
    heads, dh = attn.heads, attn.dim_head
    tokens = channel_norm(x, attn.norm.gamma).permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c)
    q, k, v = (y.reshape(b, h * w, t, heads, dh).transpose(2, 3)
               for y in F.linear(tokens, attn.to_qkv.weight).chunk(3, dim=-1))  # (B, HW, heads, T, dh)
    q, k = attn.rotary_emb(q * dh**-0.5), attn.rotary_emb(k)  # RoPE over the frame index
    out = softmax_attention(q, k, v, bias).transpose(2, 3).reshape(b, h * w, t, heads * dh)
    out = F.linear(out, attn.to_out.weight)
    return x + out.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)


def level(lvl, x, t_emb, cond, bias, norm_eps):
    """block1, block2, spatial, temporal -> (features, resampled features) (§4.1 steps 6, 8)."""
    x = resnet_block(lvl.res1, x, t_emb, cond, norm_eps)
    x = resnet_block(lvl.res2, x, t_emb, cond, norm_eps)
    x = temporal_attention(lvl.temporal_attn, spatial_linear_attention(lvl.spatial_attn, x), bias)
    r = lvl.resample
    if isinstance(r, torch.nn.Conv2d):
        return x, F.conv3d(x, r.weight.unsqueeze(2), r.bias, stride=(1, 2, 2), padding=(0, 1, 1))
    if isinstance(r, torch.nn.ConvTranspose2d):
        return x, F.conv_transpose3d(x, r.weight.unsqueeze(2), r.bias, stride=(1, 2, 2), padding=(0, 1, 1))
    return x, x


def output_head(head, x: torch.Tensor) -> torch.Tensor:
    """Unconditioned residual block, then a 1x1x1 conv (§4.1 step 9)."""
    return conv(resnet_block(head.res, x), head.proj)


@torch.no_grad()
def reference_forward(a2v: A2VFDM, x_t: torch.Tensor, t: torch.Tensor, source_features: torch.Tensor,
                      cond: torch.Tensor) -> torch.Tensor:
    """x_t (B, 3, T, L, L), t (B,) int64, source_features (B, C+16, L, L), cond (B, T, 1032) -> eps
    (B, 3, T, L, L), computed as the official code does (§4.1), with a2v's weights and window."""
    unet, config = a2v.unet, a2v.config
    frames = x_t.shape[2]
    norm_eps = config.cross_attn_norm_eps  # cross-attention LayerNorms; None: the reference's dtype rule
    bias = temporal_bias(unet, frames, config.window, x_t.device)
    source = source_features[:, :, None].expand(-1, -1, frames, -1, -1)
    x = conv(torch.cat([x_t, source], dim=1), unet.init_conv)
    r = x.clone()
    x = temporal_attention(unet.init_temporal_attn, x, bias)
    t_emb = time_embedding(unet, t)

    skips = []
    for lvl in unet.downs:
        skip, x = level(lvl, x, t_emb, cond, bias, norm_eps)
        skips.append(skip)
    x = resnet_block(unet.mid_block1, x, t_emb, cond, norm_eps)
    x = temporal_attention(unet.mid_temporal_attn, spatial_attention(unet.mid_spatial_attn, x), bias)
    x = resnet_block(unet.mid_block2, x, t_emb, cond, norm_eps)
    for lvl in unet.ups:
        _, x = level(lvl, torch.cat([x, skips.pop()], dim=1), t_emb, cond, bias, norm_eps)

    x = torch.cat([x, r], dim=1)
    return torch.cat([output_head(unet.flow_head, x), output_head(unet.occlusion_head, x)], dim=1)
