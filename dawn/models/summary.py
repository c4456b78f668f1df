"""`dawn models`: parameter counts and GFLOPs of each preset next to the reference implementation's figures.

FLOPs are counted with torch.utils.flop_counter on the meta device (no memory, no compute), for one
clip of `frames` frames: one A2V-FDM U-Net forward (a sampling step), the LFG decode of every frame, and
one PBNet generation. "Reference way" counts the same work laid out as the official code does it:
temporal attention over all T x T frame pairs, and the LFG source encoder run again for every frame.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

# Learnable parameters of the released checkpoints (tests/assets/reference/manifest_*.json).
REFERENCE_PARAMS = {
    "lfg": 66_004_557,
    "lfg.generator": 45_575_391,
    "lfg.region_predictor": 14_146_728,
    "lfg.bg_predictor": 6_282_438,
    "a2v.unet": 49_857_555,
    "pbnet_pose": 2_347_018,
    "pbnet_blink": 2_231_046,
}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _gflops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def preset_summary(preset: str, frames: int = 200) -> list[tuple[str, int, int | None, float | None, float | None]]:
    """Rows (name, our params, reference params or None, our GFLOPs, reference-way GFLOPs)."""
    from dawn.config import build_models
    from dawn.models.unet3d import A2VFDM

    released = preset != "tiny"
    ref = (lambda key: REFERENCE_PARAMS[key]) if released else (lambda key: None)
    models = build_models(preset, device="meta")
    lfg, a2v = models["lfg"], models["a2v"]
    a2v_config = a2v.config
    pbnets = {kind: models[f"pbnet_{kind}"].eval() for kind in ("pose", "blink")}
    with torch.device("meta"):
        a2v_reference = A2VFDM(a2v_config).use_reference_attention()

        s, lat, c = lfg.config.image_size, a2v_config.latent_size, a2v_config.source_channels
        x_t = torch.empty(1, 3, frames, lat, lat)
        t = torch.zeros(1, dtype=torch.long)
        feats = torch.empty(1, c + a2v_config.face_channels, lat, lat)
        cond = torch.empty(1, frames, a2v_config.cond_dim)
        unet_ours = _gflops(lambda: a2v(x_t, t, feats, cond))
        unet_reference = _gflops(lambda: a2v_reference(x_t, t, feats, cond))

        source = torch.empty(1, 3, s, s)
        flow, occ = torch.empty(frames, lat, lat, 2), torch.empty(frames, 1, lat, lat)
        lfg.eval()
        decode_ours = _gflops(lambda: lfg.decode(lfg.encode_source(source), source, flow, occ))
        encode_one = _gflops(lambda: lfg.encode_source(source))
        decode_reference = decode_ours + (frames - 1) * encode_one

        audio = torch.empty(1, frames, 1024)
        pbnet_flops = {kind: _gflops(lambda m=m: m.decode(torch.empty(1, m.config.state_dim),
                                                          torch.empty(1, frames, m.config.audio_latent_dim),
                                                          audio)) for kind, m in pbnets.items()}

    return [
        ("LFG (total)", count_params(lfg), ref("lfg"), decode_ours, decode_reference),
        ("  generator", count_params(lfg.generator), ref("lfg.generator"), None, None),
        ("  region predictor", count_params(lfg.region_predictor), ref("lfg.region_predictor"), None, None),
        ("  background predictor", count_params(lfg.bg_predictor), ref("lfg.bg_predictor"), None, None),
        ("A2V-FDM U-Net (1 step)", count_params(a2v.unet), ref("a2v.unet"), unet_ours, unet_reference),
        ("PBNet pose", count_params(pbnets["pose"]), ref("pbnet_pose"), pbnet_flops["pose"], None),
        ("PBNet blink", count_params(pbnets["blink"]), ref("pbnet_blink"), pbnet_flops["blink"], None),
    ]


def format_table(preset: str, rows, frames: int) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"preset {preset} — GFLOPs for a {frames}-frame clip (LFG: decode all frames; U-Net: one step)",
             f"{'network':<26}{'params':>14}{'reference':>14}{'GFLOPs':>12}{'ref. way':>12}"]
    for name, params, reference, ours, reference_way in rows:
        lines.append(f"{name:<26}{params:>14,}{num(reference, ',') :>14}{num(ours, '.1f'):>12}"
                     f"{num(reference_way, '.1f'):>12}")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    for preset in args.presets:
        print(format_table(preset, preset_summary(preset, args.frames), args.frames))
        print()
    print("Reference params: the released checkpoints' state dicts (PBNet counts include 4 rotary "
          "frequencies the reference stores as parameters). 'ref. way' = full T x T temporal attention and "
          "the LFG source re-encoded per frame, as the official code does.")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("models", help="parameter counts and GFLOPs of each preset vs the reference")
    p.add_argument("--presets", nargs="+", default=["tiny", "hdtf128", "hdtf256"])
    p.add_argument("--frames", type=int, default=200)
    p.set_defaults(func=_command)
