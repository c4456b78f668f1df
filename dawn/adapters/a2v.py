"""Official A2V-FDM checkpoints (DAWN_128.pth, DAWN_256.pth) <-> dawn `A2VFDM` state dicts.

The official file is a torch pickle whose `diffusion` entry is the GaussianDiffusion state dict: the 12
schedule buffers plus the U-Net under `denoise_fn.*` (ARCHITECTURE.md §1, manifest_a2v_128.json). The
face-box encoder (`face_loc_emb.*`) is in no checkpoint (§9.1); test vectors store it beside the
`diffusion` keys, so it is mapped when present. The tensors are the same; dawn names drop the
reference's wrapper levels (`.fn.fn.fn`) and name the children of each U-Net level, and dawn keeps
per-frame convolutions as 2D weights (the reference's Conv3d (out, in, 1, k, k)), LN_c gains as (C,)
(reference (1, C, 1, 1, 1)) and the levels' 1x1 attention convolutions as Linear weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from dawn import DawnError
from dawn.models.unet3d import A2VConfig, A2VFDM

ASSETS = Path(__file__).resolve().parent.parent / "models" / "assets"
FACE_ENCODER_SEED1234 = ASSETS / "face_loc_emb_seed1234.safetensors"

# dawn key -> reference key, applied in order (each rule at most once per key).
_LEVEL_CHILD = {"res1": "0", "res2": "1", "spatial_attn": "2", "temporal_attn": "3", "resample": "4"}
_RULES = [
    (r"^schedule\.", ""),
    (r"^face_encoder\.", "face_loc_emb."),
    (r"^unet\.", "denoise_fn."),
    (r"\.flow_head\.res\.", ".final_conv.0."),
    (r"\.flow_head\.proj\.", ".final_conv.1."),
    (r"\.occlusion_head\.res\.", ".occlusion_map.0."),
    (r"\.occlusion_head\.proj\.", ".occlusion_map.1."),
    # PreNorm(norm, fn): the norm sits one level down, the layer two (levels' spatial attention) or
    # three (temporal attention and the middle spatial attention, behind a layout rearranger) levels.
    (r"\.(downs|ups)\.(\d+)\.spatial_attn\.norm\.", r".\1.\2.spatial_attn.fn.norm."),
    (r"\.(downs|ups)\.(\d+)\.spatial_attn\.(?!fn\.)", r".\1.\2.spatial_attn.fn.fn."),
    (r"\.(temporal_attn|mid_spatial_attn|mid_temporal_attn|init_temporal_attn)\.norm\.", r".\1.fn.norm."),
    (r"\.(temporal_attn|mid_spatial_attn|mid_temporal_attn|init_temporal_attn)\.(?!fn\.)", r".\1.fn.fn.fn."),
    (r"\.(downs|ups)\.(\d+)\.(res1|res2|spatial_attn|temporal_attn|resample)\.",
     lambda m: f".{m[1]}.{m[2]}.{_LEVEL_CHILD[m[3]]}."),
]


def reference_key(key: str) -> str:
    """The reference name of a dawn A2VFDM state-dict key."""
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key, count=1)
    return key


def _reference_shape(ref_key: str, value: torch.Tensor) -> tuple[int, ...]:
    shape = tuple(value.shape)
    if ref_key.endswith("norm.gamma"):  # LN_c gain (1, C, 1, 1, 1)
        return (1, shape[0], 1, 1, 1)
    if re.search(r"\.(downs|ups)\.\d+\.2\.fn\.fn\.to_(qkv|out)\.weight$", ref_key):  # Conv2d 1x1
        return shape + (1, 1)
    if ref_key.startswith("denoise_fn.") and len(shape) == 4:  # Conv3d (1, k, k) / ConvTranspose3d
        return shape[:2] + (1,) + shape[2:]
    return shape


def _listing(keys) -> str:
    keys = sorted(keys)
    return f"{keys[:8]}{f' ... ({len(keys)} in all)' if len(keys) > 8 else ''}"


def infer_config(state: dict, image_size: int = 128) -> A2VConfig:
    """A2VConfig from a reference-layout state dict's shapes (the image size is not in the weights)."""
    def shape(key):
        if key not in state:
            raise DawnError(f"not an A2V-FDM diffusion state dict: {key} is missing")
        return tuple(state[key].shape)

    dim, in_channels, _, _, kernel = shape("denoise_fn.init_conv.weight")
    buckets, heads = shape("denoise_fn.time_rel_pos_bias.relative_attention_bias.weight")
    levels = sorted({int(m[1]) for k in state for m in [re.match(r"denoise_fn\.downs\.(\d+)\.0\.block1\.proj\.weight$", k)] if m})
    if not levels:
        raise DawnError("not an A2V-FDM diffusion state dict: no denoise_fn.downs.*")
    first = "denoise_fn.downs.0.0"
    cross_heads_x_dh = shape(f"{first}.cross_attn_aud.to_q.weight")[0]
    cross_dim_head = shape(f"{first}.cross_attn_aud.null_kv")[1]
    return A2VConfig(
        image_size=image_size,
        dim=dim,
        dim_mults=tuple(shape(f"denoise_fn.downs.{i}.0.block1.proj.weight")[0] // dim for i in levels),
        source_channels=in_channels - 3 - 16,
        cond_audio=shape(f"{first}.audio_mlp.1.weight")[1],
        cond_pose=shape(f"{first}.pose_mlp.1.weight")[1],
        cond_eye=shape(f"{first}.eye_mlp.1.weight")[1],
        heads=heads,
        dim_head=shape("denoise_fn.init_temporal_attn.fn.fn.fn.to_qkv.weight")[0] // (3 * heads),
        cross_heads=cross_heads_x_dh // cross_dim_head,
        cross_dim_head=cross_dim_head,
        init_kernel=kernel,
        rel_pos_buckets=buckets,
    )


def _expected(config: A2VConfig, with_face_encoder: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """reference key -> (dawn key, dawn shape) for A2VFDM(config)."""
    with torch.device("meta"):
        ours = A2VFDM(config).state_dict()
    return {reference_key(k): (k, tuple(v.shape)) for k, v in ours.items()
            if with_face_encoder or not k.startswith("face_encoder.")}


def _check(ref_state: dict, expected: dict, what: str) -> None:
    missing, unexpected = expected.keys() - ref_state.keys(), ref_state.keys() - expected.keys()
    wrong = [f"{k} {tuple(ref_state[k].shape)}" for k in expected.keys() & ref_state.keys()
             if ref_state[k].numel() != torch.Size(expected[k][1]).numel()]
    if missing or unexpected or wrong:
        raise DawnError(f"{what} does not match an A2V-FDM: missing {_listing(missing)}, "
                        f"unexpected {_listing(unexpected)}, wrong shapes {wrong[:8]}")


def from_reference(state: dict, config: A2VConfig | None = None) -> dict:
    """Reference `diffusion` state dict (+ optional `face_loc_emb.*`) -> dawn A2VFDM keys and shapes.

    Strict: a key too many or too few (w.r.t. A2VFDM(config), config inferred from the shapes by
    default) raises DawnError listing them. Without `face_loc_emb.*` the result has no face_encoder.*.
    """
    config = config or infer_config(state)
    expected = _expected(config, any(k.startswith("face_loc_emb.") for k in state))
    _check(state, expected, "reference A2V-FDM state dict")
    return {expected[k][0]: v.reshape(expected[k][1]) for k, v in state.items()}


def to_reference(state: dict) -> dict:
    """dawn A2VFDM state dict -> reference names and shapes (`face_encoder.*` -> `face_loc_emb.*`)."""
    ref = {}
    for key, value in state.items():
        ref_key = reference_key(key)
        ref[ref_key] = value.reshape(_reference_shape(ref_key, value))
    _check(ref, _expected(infer_config(ref), any(k.startswith("face_encoder.") for k in state)),
           "dawn A2V-FDM state dict")
    return ref


def _image_size_from_name(path: Path) -> int:
    sizes = set(re.findall(r"(?<!\d)(128|256)(?!\d)", path.name))
    if len(sizes) != 1:
        raise DawnError(f"{path}: cannot tell the image size (128 or 256) from the file name; pass image_size")
    return int(sizes.pop())


def face_encoder_state(source: str | Path) -> dict:
    """Face-box encoder weights (dawn names) from "seed1234" (packaged, §9.1) or a safetensors file
    holding `face_loc_emb.*` or `face_encoder.*` keys."""
    path = FACE_ENCODER_SEED1234 if source == "seed1234" else Path(source)
    if not path.is_file():
        raise DawnError(f"{path}: face encoder weights not found")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise DawnError(f"{path}: not a readable safetensors file ({e})") from None
    ours = {re.sub(r"^face_loc_emb\.", "face_encoder.", k): v for k, v in state.items()}
    expected = {"face_encoder.conv1.weight", "face_encoder.conv1.bias", "face_encoder.conv2.weight",
                "face_encoder.conv2.bias"}
    if ours.keys() != expected:
        raise DawnError(f"{path}: expected face encoder keys {sorted(expected)}, found {sorted(state)}")
    return ours


def load_official_a2v(path: str | Path, face_encoder: str | Path = "seed1234",
                      image_size: int | None = None) -> A2VFDM:
    """A2VFDM (eval mode) from an official DAWN_128.pth / DAWN_256.pth, read with weights_only=True.

    face_encoder: "seed1234" (the packaged best guess of the training-time encoder, §9.1), "random"
    (a fresh default initialisation, as the reference's inference does), or a safetensors path.
    image_size: 128 or 256; by default taken from the file name. The released files hold no face
    encoder; `face_loc_emb.*` entries in `diffusion`, if any, are ignored in favour of `face_encoder`.
    """
    path = Path(path)
    if not path.is_file():
        raise DawnError(f"{path}: official A2V-FDM checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding non-tensor objects
        raise DawnError(f"{path}: not a readable official DAWN checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("diffusion"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise DawnError(f"{path}: not an official DAWN checkpoint (needs a 'diffusion' entry, found {found})")
    state = checkpoint["diffusion"]
    try:
        config = infer_config(state, image_size or _image_size_from_name(path))
        ours = from_reference({k: v for k, v in state.items() if not k.startswith("face_loc_emb.")}, config)
    except DawnError as e:
        raise DawnError(f"{path}: {e}") from None
    model = A2VFDM(config)
    if face_encoder != "random":
        ours.update(face_encoder_state(face_encoder))
    model.load_state_dict(ours, strict=face_encoder != "random")
    return model.eval()
