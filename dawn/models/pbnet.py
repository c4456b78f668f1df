"""PBNet: the pose / blink CVAE (paper §3.4, appendix A.2; ARCHITECTURE.md §5).

Two independent models share this code: `kind="pose"` (6-d: yaw, pitch, roll in degrees, scale, tx, ty)
and `kind="blink"` (2 eye ratios). Given the source state rho_src and per-frame audio features a_{1:T},
the decoder predicts the delta sequence Delta rho_{1:T} from a per-frame latent h ~ N(0, I) (Eq. 9);
during training the encoder gives h's posterior from the true deltas (Eq. 8).

Units: "raw" = degrees / scale / pixels for pose and plain eye ratios for blink. The networks work in
"model units": pose min-max normalised to [0, 1] (§5.3, constants in dawn.config), blink unchanged.
`encode`/`decode`/`forward` take and return model units; `generate` takes and returns raw units.

Layouts are batch-first: states (B, D), sequences (B, T, D), audio (B, T, 1024), latents (B, T, A).

- `PBNetEncoder` (§5.1): cat[embed(rho_src), embed(Delta rho), embed(a)] + sinusoidal positions ->
  post-norm nn.TransformerEncoder -> (mu, logvar) per frame.
- `PBNetDecoder` (§5.2): memory = Linear(cat[embed(rho_src), h, embed(a)]); queries start as a learned
  vector, pass one pre-norm self-attention, then post-norm layers of self-attention, cross-attention to
  the memory and a feed-forward. Attention uses RoPE on 4 of 32 dims per head, T5 relative biases and,
  at inference, a local window (|i - j| <= 200) computed with `local_attention` (memory linear in T).
- `PatchDiscriminator1d`: the 1-D PatchGAN of appendix A.2 (per-patch real/fake logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dawn.config import BLINK_DIM, POSE_DIM, POSE_MAX, POSE_MIN
from dawn.models.attention import RelativePositionBias, RotaryEmbedding, local_attention

STATE_DIMS = {"pose": POSE_DIM, "blink": BLINK_DIM}


def to_model_units(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Raw states (..., D) -> model units: pose (x - min) / (max - min); blink unchanged."""
    if kind == "blink":
        return x
    lo, hi = x.new_tensor(POSE_MIN), x.new_tensor(POSE_MAX)
    return (x - lo) / (hi - lo)


def to_raw_units(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Model units (..., D) -> raw states: pose x * (max - min) + min; blink unchanged."""
    if kind == "blink":
        return x
    lo, hi = x.new_tensor(POSE_MIN), x.new_tensor(POSE_MAX)
    return x * (hi - lo) + lo


def sinusoidal_table(length: int, dim: int, device=None) -> torch.Tensor:
    """(length, dim) absolute positions: [p, 2i] = sin(p * exp(-2i ln(10000) / dim)), [p, 2i+1] = cos."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


@dataclass
class PBNetConfig:
    kind: str = "pose"  # "pose" (D = 6) or "blink" (D = 2)
    audio_dim: int = 1024  # HuBERT features per frame
    audio_latent_dim: int = 256  # A: audio embedding width = latent h width
    pose_latent_dim: int = 64  # P: state embedding width = decoder width; encoder width A + 2P
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32  # decoder attention heads (the encoder splits its width over num_heads)
    ff_size: int = 128
    dropout: float = 0.1
    num_buckets: int = 128  # T5 relative-position buckets
    max_distance: int = 128
    rotary_dim: int = 4  # RoPE on the first rotary_dim features of each decoder head
    rotary_freqs: tuple[float, ...] = (1.0, 0.01)
    inference_window: int | None = 200  # eval-mode local attention: frame i sees |j - i| <= window
    attention_block: int | None = None  # query block of the windowed attention (None: the window)
    # `generate` draws the latent h_{1:T} from N(0, I) per frame (Eq. 9). With latent_smoothing = sigma > 0 the
    # draws are correlated over time instead: white noise filtered by a Gaussian of sigma frames and divided by
    # the kernel's L2 norm, so each frame's latent is still N(0, I) but neighbouring frames are alike, as the
    # posterior latents of smooth training sequences are. 0 = the paper's independent draws.
    latent_smoothing: float = 0.0
    # `generate` draws h from N(0, latent_scale^2 I) instead (1 = the paper's prior). A briefly trained PBNet
    # decodes its prior's latents into less motion than its training sequences have (its posterior has not yet
    # met the prior); the PBNet objective's `fit_latent_scale` option sets this scale from the training data.
    latent_scale: float = 1.0

    @property
    def state_dim(self) -> int:
        return STATE_DIMS[self.kind]

    def __post_init__(self):
        if self.kind not in STATE_DIMS:
            raise ValueError(f"PBNet kind must be 'pose' or 'blink', got {self.kind!r}")
        self.rotary_freqs = tuple(float(f) for f in self.rotary_freqs)
        if len(self.rotary_freqs) * 2 != self.rotary_dim:
            raise ValueError(f"rotary_freqs needs rotary_dim / 2 = {self.rotary_dim // 2} values")

    @classmethod
    def preset(cls, name: str, kind: str | None = None) -> "PBNetConfig":
        """"pose" / "blink": the released shapes; "hdtf128" / "hdtf256": the same, with `kind` (default
        pose); "tiny-pose" / "tiny-blink" (or "tiny" with `kind`): small shapes (those of the test vectors)."""
        size, kind = _preset_size_and_kind(name, kind)
        if size == "released":
            return cls(kind=kind, ff_size=128 if kind == "pose" else 64)
        return cls(kind=kind, audio_latent_dim=32, pose_latent_dim=16, ff_size=32 if kind == "pose" else 24)


# Preset name -> (size, kind); kind None means "from the `kind` argument, default pose".
_PRESETS = {
    "pose": ("released", "pose"),
    "blink": ("released", "blink"),
    "hdtf128": ("released", None),
    "hdtf256": ("released", None),
    "tiny": ("tiny", None),
    "tiny-pose": ("tiny", "pose"),
    "tiny-blink": ("tiny", "blink"),
}


def _preset_size_and_kind(name: str, kind: str | None) -> tuple[str, str]:
    if name not in _PRESETS:
        raise ValueError(f"unknown PBNet preset {name!r} (known: {', '.join(_PRESETS)})")
    size, named_kind = _PRESETS[name]
    if named_kind and kind and kind != named_kind:
        raise ValueError(f"preset {name!r} is a {named_kind} model, not {kind}")
    return size, named_kind or kind or "pose"


class GainLayerNorm(nn.Module):
    """LayerNorm over the last axis with a gain and no bias (eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gain, None, self.eps)


class PBNetEncoder(nn.Module):
    """Posterior q(h | rho_src, Delta rho, a) (paper Eq. 8, ARCHITECTURE.md §5.1)."""

    def __init__(self, config: PBNetConfig):
        super().__init__()
        d, p, a = config.state_dim, config.pose_latent_dim, config.audio_latent_dim
        self.width = a + 2 * p
        self.first_state_embed = nn.Linear(d, p)
        self.delta_embed = nn.Linear(d, p)
        self.audio_embed = nn.Linear(config.audio_dim, a)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            self.width, config.num_heads, config.ff_size, config.dropout, activation="gelu", batch_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.to_mu = nn.Linear(self.width, a)
        self.to_logvar = nn.Linear(self.width, a)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) absolute states (model units), audio (B, T, 1024), mask (B, T) bool -> mu, logvar (B, T, A)."""
        t = x.shape[1]
        first = self.first_state_embed(x[:, 0])[:, None].expand(-1, t, -1)
        h = torch.cat([first, self.delta_embed(x - x[:, :1]), self.audio_embed(audio)], dim=-1)
        h = self.dropout(h + sinusoidal_table(t, self.width, h.device).to(h.dtype))
        h = self.transformer(h, src_key_padding_mask=~mask)
        return self.to_mu(h), self.to_logvar(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention with partial RoPE and a relative bias; no projection biases."""

    def __init__(self, dim: int, heads: int, head_dim: int, rotary: RotaryEmbedding):
        super().__init__()
        self.heads = heads
        self.rotary = rotary
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: RelativePositionBias, window: int | None, block: int | None):
        """x (B, T, dim) -> (B, T, dim)."""
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = local_attention(self.rotary(q), self.rotary(k), v, window, bias, block)
        return self.to_out(out.transpose(1, 2).flatten(-2))


class CrossAttention(nn.Module):
    """Queries attend to a same-length memory; RoPE on q and k at the same frame positions."""

    def __init__(self, dim: int, heads: int, head_dim: int, rotary: RotaryEmbedding):
        super().__init__()
        self.heads = heads
        self.rotary = rotary
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, memory, bias: RelativePositionBias, window: int | None, block: int | None) -> torch.Tensor:
        """x, memory (B, T, dim) -> (B, T, dim)."""
        q, k, v = (proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj, t in ((self.to_q, x), (self.to_k, memory), (self.to_v, memory)))
        out = local_attention(self.rotary(q), self.rotary(k), v, window, bias, block)
        return self.to_out(out.transpose(1, 2).flatten(-2))


def _rotary(config: PBNetConfig) -> RotaryEmbedding:
    return RotaryEmbedding(config.rotary_dim, freqs=list(config.rotary_freqs))


class DecoderLayer(nn.Module):
    """Post-norm: x = LN1(x + SA(x)); x = LN2(x + CA(x, memory)); x = LN3(x + FFN(x)) (§5.2 step 5)."""

    def __init__(self, config: PBNetConfig):
        super().__init__()
        p, heads, hd = config.pose_latent_dim, config.num_heads, config.head_dim
        self.self_attn = SelfAttention(p, heads, hd, _rotary(config))
        self.cross_attn = CrossAttention(p, heads, hd, _rotary(config))
        self.ff_in = nn.Linear(p, config.ff_size)
        self.ff_out = nn.Linear(config.ff_size, p)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(p), nn.LayerNorm(p), nn.LayerNorm(p)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, memory, self_bias, cross_bias, window, block):
        x = self.norm1(x + self.dropout(self.self_attn(x, self_bias, window, block)))
        x = self.norm2(x + self.dropout(self.cross_attn(x, memory, cross_bias, window, block)))
        ff = self.ff_out(self.dropout(F.gelu(self.ff_in(x))))
        return self.norm3(x + self.dropout(ff))


class PBNetDecoder(nn.Module):
    """p(Delta rho | h, a, rho_src) (paper Eq. 9, ARCHITECTURE.md §5.2)."""

    def __init__(self, config: PBNetConfig):
        super().__init__()
        d, p, a = config.state_dim, config.pose_latent_dim, config.audio_latent_dim
        self.first_state_embed = nn.Linear(d, p)
        self.audio_embed = nn.Linear(config.audio_dim, a)
        self.memory_proj = nn.Linear(p + 2 * a, p)
        self.query_init = nn.Linear(p, p)
        self.self_attn_bias = RelativePositionBias(config.num_heads, config.num_buckets, config.max_distance)
        self.cross_attn_bias = RelativePositionBias(config.num_heads, config.num_buckets, config.max_distance)
        self.init_norm = GainLayerNorm(p)
        self.init_attn = SelfAttention(p, config.num_heads, config.head_dim, _rotary(config))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.out_proj = nn.Linear(p, d)

    def forward(self, x0, z, audio, mask, window: int | None, block: int | None) -> torch.Tensor:
        """x0 (B, D) source state, z (B, T, A), audio (B, T, 1024), mask (B, T) bool -> delta (B, T, D)."""
        b, t, _ = z.shape
        first = self.first_state_embed(x0)[:, None].expand(-1, t, -1)
        memory = self.memory_proj(torch.cat([first, z, self.audio_embed(audio)], dim=-1))
        q = self.query_init(z.new_zeros(b, t, self.query_init.in_features))  # every query starts as the bias
        q = q + self.init_attn(self.init_norm(q), self.self_attn_bias, window, block)
        for layer in self.layers:
            q = layer(q, memory, self.self_attn_bias, self.cross_attn_bias, window, block)
        return self.out_proj(q).masked_fill(~mask[..., None], 0.0)


class PBNet(nn.Module):
    """Pose or blink CVAE. State-dict keys map one-to-one to the reference (dawn.adapters.pbnet)."""

    config_class = PBNetConfig

    def __init__(self, config: PBNetConfig):
        super().__init__()
        self.config = config
        self.encoder = PBNetEncoder(config)
        self.decoder = PBNetDecoder(config)

    def to_model_units(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_units(x, self.config.kind)

    def to_raw_units(self, x: torch.Tensor) -> torch.Tensor:
        return to_raw_units(x, self.config.kind)

    def _window(self, window: int | None | Literal["auto"]) -> int | None:
        # The reference masks |i - j| > 200 only in eval mode; training attends to the whole window.
        if window == "auto":
            return None if self.training else self.config.inference_window
        return window

    @staticmethod
    def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()

    def encode(self, x: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor | None = None):
        """x (B, T, D) model units, audio (B, T, 1024), mask (B, T) bool (None: all valid) -> mu, logvar (B, T, A)."""
        return self.encoder(x, audio, self._mask(x, mask))

    def decode(self, x0: torch.Tensor, z: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor | None = None,
               window: int | None | Literal["auto"] = "auto") -> torch.Tensor:
        """x0 (B, D) source state (model units), z (B, T, A), audio (B, T, 1024) -> delta (B, T, D) vs x0.

        window: "auto" = none in train mode, config.inference_window in eval mode (as the reference);
        an int or None overrides. Rows where mask is False are zero (as in the reference, padded frames
        still take part in the decoder's attention; training windows are unpadded).
        """
        return self.decoder(x0, z, audio, self._mask(z, mask), self._window(window), self.config.attention_block)

    def forward(self, batch: dict) -> dict:
        """Training pass through the posterior.

        batch: "x" (B, T, D) absolute states in RAW units, "audio" (B, T, 1024), optional "mask" (B, T) bool.
        Returns (model units): "source" (B, D) = x[:, 0], "target_delta" (B, T, D) = x - x[:, :1],
        "mu", "logvar", "z" (B, T, A) with z = mu + exp(logvar / 2) * eps, "delta" (B, T, D) predicted.
        """
        x = self.to_model_units(batch["x"])
        audio, mask = batch["audio"], self._mask(x, batch.get("mask"))
        mu, logvar = self.encode(x, audio, mask)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        delta = self.decode(x[:, 0], z, audio, mask)
        return {"source": x[:, 0], "target_delta": x - x[:, :1], "mu": mu, "logvar": logvar, "z": z, "delta": delta}

    @torch.no_grad()
    def generate(self, source_state: torch.Tensor, audio: torch.Tensor, generator: torch.Generator | None = None,
                 z: torch.Tensor | None = None) -> torch.Tensor:
        """Absolute sequence (B, T, D) in raw units from source_state (B, D) raw units and audio (B, T, 1024).

        The latent z (B, T, A) is drawn from the prior with `generator` unless given (`prior_latents` with
        config.latent_smoothing, times config.latent_scale). The decoder runs with the inference window; call
        .eval() first to switch dropout off.
        """
        b, t, _ = audio.shape
        if z is None:
            z = self.config.latent_scale * prior_latents(b, t, self.config.audio_latent_dim,
                                                         self.config.latent_smoothing, generator, audio.device)
            z = z.to(audio.dtype)
        x0 = self.to_model_units(source_state)
        delta = self.decode(x0, z, audio, window=self.config.inference_window)
        return self.to_raw_units(x0[:, None] + delta)


def prior_latents(batch: int, frames: int, dim: int, sigma: float = 0.0, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """Latents h (batch, frames, dim) from the prior N(0, I) of every frame: independent per frame (sigma 0, Eq. 9),
    or white noise filtered over time by a Gaussian of sigma frames and divided by the kernel's L2 norm (each
    frame still N(0, I), neighbouring frames alike). The noise runs 4 sigma past both ends, so the first and last
    frames are filtered like the others."""
    if sigma <= 0:
        return torch.randn(batch, frames, dim, generator=generator, device=device)
    radius = int(math.ceil(4 * sigma))
    noise = torch.randn(batch, frames + 2 * radius, dim, generator=generator, device=device)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=noise.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.norm()
    filtered = F.conv1d(noise.transpose(1, 2).reshape(batch * dim, 1, -1), kernel.view(1, 1, -1))
    return filtered.view(batch, dim, frames).transpose(1, 2)


@dataclass
class PatchDiscriminatorConfig:
    kind: str = "pose"  # judged sequences have D = 6 (pose) or 2 (blink)
    channels: int = 64  # width of the first conv; doubles per strided layer (capped at 8x)
    num_layers: int = 3  # strided convs (total stride 2^num_layers)
    kernel_size: int = 4

    @property
    def state_dim(self) -> int:
        return STATE_DIMS[self.kind]

    def __post_init__(self):
        if self.kind not in STATE_DIMS:
            raise ValueError(f"discriminator kind must be 'pose' or 'blink', got {self.kind!r}")

    @classmethod
    def preset(cls, name: str, kind: str | None = None) -> "PatchDiscriminatorConfig":
        """Same names as PBNetConfig.preset: pose, blink, hdtf128/hdtf256 (+ kind), tiny(-pose|-blink)."""
        size, kind = _preset_size_and_kind(name, kind)
        return cls(kind=kind) if size == "released" else cls(kind=kind, channels=16, num_layers=2)


class PatchDiscriminator1d(nn.Module):
    """1-D PatchGAN (appendix A.2, after Isola et al.): per-patch logits that a sequence is real motion.

    Layout: conv(k4, s2) + LeakyReLU(0.2); (num_layers - 1) x [conv(k4, s2) + BatchNorm + LeakyReLU];
    conv(k4, s1) + BatchNorm + LeakyReLU; conv(k4, s1) -> 1 channel. Train with BCE-with-logits.
    """

    config_class = PatchDiscriminatorConfig

    def __init__(self, config: PatchDiscriminatorConfig):
        super().__init__()
        self.config = config
        k, c = config.kernel_size, config.channels
        layers: list[nn.Module] = [nn.Conv1d(config.state_dim, c, k, 2, 1), nn.LeakyReLU(0.2)]
        width = c
        for i in range(1, config.num_layers + 1):
            stride = 2 if i < config.num_layers else 1
            out = c * min(2**i, 8)
            layers += [nn.Conv1d(width, out, k, stride, 1, bias=False), nn.BatchNorm1d(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv1d(width, 1, k, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, delta: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Judge the absolute sequence source + delta: delta (B, T, D), source (B, D), model units -> logits (B, T')."""
        return self.net((source[:, None] + delta).transpose(1, 2)).squeeze(1)
