"""Official PBNet checkpoints <-> dawn PBNet state dicts (ARCHITECTURE.md §1, §5; manifest_pbnet_*.json).

The released `pbnet_seperate/{pose,blink}/checkpoint_*.pth.tar` files are the CVAE state dict itself.
Keys map one-to-one by renaming (table below, applied per scope), with two special cases:
- `decoder.init_temporal_attn.fn.norm.gamma` is (1, 1, P) there and `decoder.init_norm.gain` (P,) here;
- the sinusoidal tables `{encoder,decoder}.sequence_pos_encoder.pe` (20000, 1, width) are not stored by
  dawn (the encoder recomputes its rows; the decoder never uses its table): `from_reference` checks them
  against the formula and drops them (they may be absent, as in the test vectors), `to_reference`
  regenerates them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from dawn import DawnError
from dawn.models.pbnet import STATE_DIMS, PBNet, PBNetConfig, sinusoidal_table

PE_MAX_LEN = 20000
PE_KEYS = ("encoder.sequence_pos_encoder.pe", "decoder.sequence_pos_encoder.pe")
INIT_GAIN_KEYS = ("decoder.init_temporal_attn.fn.norm.gamma", "decoder.init_norm.gain")  # (reference, dawn)

# (scope, reference fragment, dawn fragment); fragments are whole dot-separated name segments.
RENAMES = [
    ("encoder.", "firstposeEmbedding", "first_state_embed"),
    ("encoder.", "poseEmbedding", "delta_embed"),
    ("encoder.", "audioEmbedding", "audio_embed"),
    ("encoder.", "seqTransEncoder", "transformer"),  # nn.TransformerEncoder: inner names identical
    ("encoder.", "mu_layer", "to_mu"),
    ("encoder.", "sigma_layer", "to_logvar"),
    ("decoder.", "firstposeEmbedding", "first_state_embed"),
    ("decoder.", "audioEmbedding", "audio_embed"),
    ("decoder.", "ztimelinear", "memory_proj"),
    ("decoder.", "init_proj", "query_init"),
    ("decoder.", "time_rel_pos_bias_tgt", "self_attn_bias"),
    ("decoder.", "time_rel_pos_bias_mem", "cross_attn_bias"),
    ("decoder.", "init_temporal_attn.fn.norm.gamma", "init_norm.gain"),
    ("decoder.", "init_temporal_attn.fn.fn", "init_attn"),
    ("decoder.", "seqTransDecoder.decoder_layers", "layers"),
    ("decoder.", "multihead_attn", "cross_attn"),
    ("decoder.", "rotary_emb", "rotary"),
    ("decoder.", "ffn.linear1", "ff_in"),
    ("decoder.", "ffn.linear2", "ff_out"),
    ("decoder.", "layer_norm1", "norm1"),
    ("decoder.", "layer_norm2", "norm2"),
    ("decoder.", "layer_norm3", "norm3"),
    ("decoder.", "finallayer", "out_proj"),
]


def _rename(key: str, to_dawn: bool) -> str:
    for scope, ref, ours in RENAMES:
        if key.startswith(scope):
            old, new = (ref, ours) if to_dawn else (ours, ref)
            key = re.sub(rf"(?<=\.){re.escape(old)}(?=\.|$)", new, key)
    return key


def config_from_reference(state: dict, kind: str | None = None) -> PBNetConfig:
    """The PBNetConfig whose shapes match a reference state dict (max_distance cannot be read: preset).

    kind: expected "pose"/"blink"; a DawnError if the checkpoint is the other one."""
    try:
        out_dim, width = state["decoder.finallayer.weight"].shape
        latent, _ = state["encoder.mu_layer.weight"].shape
        num_buckets, heads = state["decoder.time_rel_pos_bias_tgt.relative_attention_bias.weight"].shape
        _, inner = state["decoder.init_temporal_attn.fn.fn.to_out.weight"].shape
        ff_size = state["encoder.seqTransEncoder.layers.0.linear1.weight"].shape[0]
        audio_dim = state["encoder.audioEmbedding.weight"].shape[1]
        freqs = state["decoder.init_temporal_attn.fn.fn.rotary_emb.freqs"]
    except (KeyError, ValueError, AttributeError) as e:
        raise DawnError(f"not a PBNet (CVAE) state dict: missing or malformed {e}") from None
    found = {d: k for k, d in STATE_DIMS.items()}.get(out_dim)
    if found is None:
        raise DawnError(f"PBNet state dict predicts {out_dim}-d states; expected 6 (pose) or 2 (blink)")
    if kind is not None and kind != found:
        raise DawnError(f"expected a {kind} PBNet checkpoint, got a {found} one ({out_dim}-d output)")
    num_layers = len({k.split(".")[3] for k in state if k.startswith("encoder.seqTransEncoder.layers.")})
    preset = PBNetConfig.preset(found)
    if not torch.equal(freqs.float(), torch.tensor(preset.rotary_freqs)):  # keep (1, 0.01) unrounded
        preset.rotary_freqs = tuple(freqs.tolist())
    return replace(
        preset,
        audio_dim=audio_dim, audio_latent_dim=latent, pose_latent_dim=width, num_layers=num_layers,
        num_heads=heads, head_dim=inner // heads, ff_size=ff_size, num_buckets=num_buckets,
        rotary_dim=2 * freqs.numel(),
    )


def _expected_dawn_shapes(config: PBNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in PBNet(config).state_dict().items()}


def _check_keys(got, expected, what: str) -> None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise DawnError(f"{what} does not match the PBNet layout: missing {missing}, unexpected {unexpected}")


def from_reference(state: dict, config: PBNetConfig | None = None) -> dict:
    """Reference CVAE state dict -> dawn PBNet state dict (strict; pe tables checked and dropped)."""
    state = dict(state)
    config = config or config_from_reference(state)
    for key in PE_KEYS:
        if key in state:
            pe = state.pop(key)
            p, a = config.pose_latent_dim, config.audio_latent_dim
            width = a + 2 * p if key.startswith("encoder.") else p
            if pe.shape != (PE_MAX_LEN, 1, width) or not torch.allclose(
                pe.float(), sinusoidal_table(PE_MAX_LEN, width)[:, None], atol=1e-4
            ):
                raise DawnError(f"{key} {tuple(pe.shape)} is not the sinusoidal table (20000, 1, {width})")
    out = {_rename(k, to_dawn=True): v for k, v in state.items()}
    gain = INIT_GAIN_KEYS[1]
    if gain in out:
        out[gain] = out[gain].reshape(-1)
    expected = _expected_dawn_shapes(config)
    _check_keys(out, expected, "reference PBNet state dict (dawn names)")
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in out.items() if v.shape != expected[k]]
    if bad:
        raise DawnError(f"reference PBNet state dict has wrong shapes: {bad}")
    return out


def to_reference(state: dict, config: PBNetConfig | None = None) -> dict:
    """dawn PBNet state dict -> reference CVAE state dict (strict; pe tables regenerated)."""
    out = {}
    for k, v in state.items():
        ref = _rename(k, to_dawn=False)
        out[ref] = v.reshape(1, 1, -1) if ref == INIT_GAIN_KEYS[0] else v
    config = config or config_from_reference(out)
    _check_keys(state, _expected_dawn_shapes(config), "dawn PBNet state dict")
    width, latent = config.pose_latent_dim, config.audio_latent_dim
    out[PE_KEYS[0]] = sinusoidal_table(PE_MAX_LEN, latent + 2 * width)[:, None]
    out[PE_KEYS[1]] = sinusoidal_table(PE_MAX_LEN, width)[:, None]
    return out


def load_official_pbnet(path: str | Path, kind: str) -> PBNet:
    """Build a dawn PBNet (eval mode) from an official `checkpoint_*.pth.tar` (kind "pose" or "blink")."""
    path = Path(path)
    if kind not in STATE_DIMS:
        raise DawnError(f"PBNet kind must be 'pose' or 'blink', got {kind!r}")
    if not path.is_file():
        raise DawnError(f"PBNet checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a truncated or foreign file
        raise DawnError(f"cannot read PBNet checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DawnError(f"{path} is not a PBNet state dict (expected a dict of tensors)")
    try:
        config = config_from_reference(state, kind)
        model = PBNet(config)
        model.load_state_dict(from_reference(state, config))
    except DawnError as e:
        raise DawnError(f"{path}: {e}") from None
    return model.eval()
