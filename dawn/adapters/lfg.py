"""Official LFG checkpoints (LFG_128_1000ep.pth, LFG_256_400ep.pth) <-> dawn `LFG` state dicts.

The official file is a torch pickle holding three state dicts (`generator`, `region_predictor`,
`bg_predictor`) plus training bookkeeping (ARCHITECTURE.md §1). Here a "reference state" is those three
merged into one dict with keys prefixed by the network name, the way the test vector stores them.
The two layouts hold the same tensors; only module names differ (`RENAMES`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dawn import DawnError
from dawn.models.lfg import LFG, LFGConfig

NETWORKS = ("generator", "region_predictor", "bg_predictor")

# (reference key prefix, dawn key prefix). Every key of either layout starts with exactly one of them.
RENAMES = [
    ("generator.pixelwise_flow_predictor.hourglass.encoder.down_blocks.",
     "generator.flow_predictor.hourglass.down."),
    ("generator.pixelwise_flow_predictor.hourglass.decoder.up_blocks.", "generator.flow_predictor.hourglass.up."),
    ("generator.pixelwise_flow_predictor.mask.", "generator.flow_predictor.motion_mask."),
    ("generator.pixelwise_flow_predictor.occlusion.", "generator.flow_predictor.occlusion."),
    ("generator.pixelwise_flow_predictor.down.weight", "generator.flow_predictor.downsample.kernel"),
    ("generator.first.", "generator.stem."),
    ("generator.down_blocks.", "generator.down_blocks."),
    ("generator.bottleneck.r", "generator.bottleneck."),
    ("generator.up_blocks.", "generator.up_blocks."),
    ("generator.final.", "generator.to_rgb."),
    ("region_predictor.predictor.encoder.down_blocks.", "region_predictor.hourglass.down."),
    ("region_predictor.predictor.decoder.up_blocks.", "region_predictor.hourglass.up."),
    ("region_predictor.regions.", "region_predictor.region_logits."),
    ("region_predictor.down.weight", "region_predictor.downsample.kernel"),
    ("bg_predictor.encoder.down_blocks.", "bg_predictor.encoder."),
    ("bg_predictor.fc.", "bg_predictor.affine_head."),
]


def _rename(state: dict, pairs: list[tuple[str, str]], what: str) -> dict:
    out, unknown = {}, []
    for key, value in state.items():
        match = next(((old, new) for old, new in pairs if key.startswith(old)), None)
        if match is None:
            unknown.append(key)
        else:
            out[match[1] + key[len(match[0]) :]] = value
    if unknown:
        raise DawnError(f"{what}: unexpected keys {_listing(unknown)}")
    return out


def _listing(keys) -> str:
    keys = sorted(keys)
    return f"{keys[:8]}{f' ... ({len(keys)} in all)' if len(keys) > 8 else ''}"


def _check_against_model(state: dict, config: LFGConfig, what: str) -> None:
    """Raise DawnError unless `state` (dawn names) has exactly the keys and shapes LFG(config) has."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LFG(config).state_dict().items()}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in expected.keys() & state.keys()
             if tuple(state[k].shape) != tuple(expected[k])]  # fmt: skip
    if missing or unexpected or wrong:
        raise DawnError(
            f"{what} does not match the LFG config: missing {_listing(missing)}, unexpected "
            f"{_listing(unexpected)}, wrong shapes {wrong[:8]}"
        )


def from_reference(state: dict, config: LFGConfig | None = None) -> dict:
    """Reference-layout LFG state (keys `generator.*`, `region_predictor.*`, `bg_predictor.*`) -> dawn keys.

    Keys no rule covers raise DawnError; with `config`, the result must also match LFG(config) exactly.
    """
    ours = _rename(state, RENAMES, "reference LFG state dict")
    if config is not None:
        _check_against_model(ours, config, "reference LFG state dict")
    return ours


def to_reference(state: dict, config: LFGConfig | None = None) -> dict:
    """dawn LFG state dict -> the reference layout (inverse of `from_reference`)."""
    if config is not None:
        _check_against_model(state, config, "dawn LFG state dict")
    return _rename(state, [(new, old) for old, new in RENAMES], "dawn LFG state dict")


def config_from_reference(reference_config: dict) -> LFGConfig:
    """LFGConfig from a reference model config (hdtf*.yaml `model_params` plus `frame_shape` or `image_size`)."""
    gen = reference_config["generator_params"]
    flow = gen["pixelwise_flow_predictor_params"]
    region = reference_config["region_predictor_params"]
    bg = reference_config["bg_predictor_params"]
    if flow["scale_factor"] != region["scale_factor"]:
        raise DawnError("reference LFG config: region and flow predictors use different scale factors")
    return LFGConfig(
        image_size=int(reference_config.get("frame_shape", reference_config.get("image_size"))),
        num_channels=reference_config.get("num_channels", 3),
        num_regions=reference_config["num_regions"],
        scale_factor=region["scale_factor"],
        generator_channels=gen["block_expansion"],
        generator_max_channels=gen["max_features"],
        generator_down_blocks=gen["num_down_blocks"],
        generator_res_blocks=gen["num_bottleneck_blocks"],
        flow_channels=flow["block_expansion"],
        flow_max_channels=flow["max_features"],
        flow_blocks=flow["num_blocks"],
        region_channels=region["block_expansion"],
        region_max_channels=region["max_features"],
        region_blocks=region["num_blocks"],
        region_temperature=region["temperature"],
        pca=region["pca_based"],
        bg_channels=bg["block_expansion"],
        bg_max_channels=bg["max_features"],
        bg_blocks=bg["num_blocks"],
        revert_axis_swap=reference_config.get("revert_axis_swap", True),
    )


def official_preset_name(path: str | Path) -> str:
    """"hdtf128" or "hdtf256" from an official file name (LFG_128_1000ep.pth, LFG_256_400ep.pth).

    The two releases have identical keys and shapes, so the frame size can only come from the name.
    """
    sizes = set(re.findall(r"(?<!\d)(128|256)(?!\d)", Path(path).name))
    if len(sizes) != 1:
        raise DawnError(f"{path}: cannot tell the LFG frame size (128 or 256) from the file name; pass a config")
    return f"hdtf{sizes.pop()}"


def load_official_lfg(path: str | Path, config: LFGConfig | str | None = None) -> LFG:
    """Build an LFG (eval mode) from an official `.pth` file, read with weights_only=True (no code runs).

    `config`: an LFGConfig or preset name; by default hdtf128/hdtf256 from the file name.
    """
    path = Path(path)
    if not path.is_file():
        raise DawnError(f"{path}: official LFG checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding non-tensor objects
        raise DawnError(f"{path}: not a readable official LFG checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or not all(isinstance(checkpoint.get(n), dict) for n in NETWORKS):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise DawnError(f"{path}: not an official LFG checkpoint (needs {list(NETWORKS)}, found {found})")
    if config is None:
        config = official_preset_name(path)
    if isinstance(config, str):
        config = LFGConfig.preset(config)
    state = {f"{net}.{k}": v for net in NETWORKS for k, v in checkpoint[net].items()}
    try:
        ours = from_reference(state, config)
    except DawnError as e:
        raise DawnError(f"{path}: {e}") from None
    model = LFG(config)
    model.load_state_dict(ours)
    return model.eval()
