"""`dawn render` (portrait + speech -> mp4) and `dawn init-checkpoints` (random weights of a preset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dawn import DawnError
from dawn.pipeline import SAMPLERS, RenderOptions, RenderPipeline, render_files

CHECKPOINT_NAMES = ("lfg", "a2v", "pbnet_pose", "pbnet_blink")


def build_models(preset: str, seed: int = 0) -> dict:
    """Randomly initialised networks of a preset that fit together (same image size and latent)."""
    import dataclasses

    import torch

    from dawn.models.lfg import LFG, LFGConfig
    from dawn.models.pbnet import PBNet, PBNetConfig
    from dawn.models.unet3d import A2VFDM, A2VConfig

    torch.manual_seed(seed)
    lfg = LFG(LFGConfig.preset(preset))
    a2v_config = dataclasses.replace(A2VConfig.preset(preset), source_channels=lfg.config.latent_channels)
    pbnet_preset = {"tiny": "tiny-{}"}.get(preset, "{}")
    return {
        "lfg": lfg,
        "a2v": A2VFDM(a2v_config),
        "pbnet_pose": PBNet(PBNetConfig.preset(pbnet_preset.format("pose"))),
        "pbnet_blink": PBNet(PBNetConfig.preset(pbnet_preset.format("blink"))),
    }


def init_checkpoints(directory: str | Path, preset: str = "tiny", seed: int = 0, hubert: bool = True) -> Path:
    """Write randomly initialised dawn checkpoints of `preset` (+ a tiny random HuBERT) to `directory`."""
    from dawn.audio import save_random_hubert
    from dawn.checkpoint import save_model

    directory = Path(directory)
    for name, model in build_models(preset, seed).items():
        save_model(model, directory, name, extra={"preset": preset, "initialisation": f"random, seed {seed}"})
    if hubert:
        save_random_hubert(directory / "hubert", seed=seed)
    return directory


def _render_command(args: argparse.Namespace) -> int:
    official = [args.official_lfg, args.official_a2v, args.official_pbnet_pose, args.official_pbnet_blink]
    if any(official) and not all(official):
        raise DawnError("--official-lfg, --official-a2v, --official-pbnet-pose and --official-pbnet-blink "
                        "must be given together")
    if all(official):
        if args.hubert is None:
            raise DawnError("official checkpoints need --hubert DIR (facebook/hubert-large-ls960-ft files)")
        pipeline = RenderPipeline.from_official(*official, hubert_dir=args.hubert, device=args.device,
                                                dtype=args.dtype)
    elif args.checkpoints:
        pipeline = RenderPipeline.from_checkpoints(args.checkpoints, hubert_dir=args.hubert, device=args.device,
                                                   dtype=args.dtype)
    else:
        raise DawnError("give --checkpoints DIR (dawn checkpoints) or the four --official-* files")
    for path, what in ((args.portrait, "portrait"), (args.audio, "audio")):
        if not Path(path).is_file():
            raise DawnError(f"{what} file not found: {path}")
    options = RenderOptions(steps=args.steps, eta=args.eta, seed=args.seed, sampler=args.sampler, crop=args.crop,
                            decode_batch=args.decode_batch)
    info = render_files(pipeline, args.portrait, args.audio, args.out, options, pose_video=args.pose_from,
                        progress_bars=not args.quiet)
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)
    timing = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in info["timings"].items())
    print(f"wrote {args.out}: {info['frames']} frames at 25 fps ({timing})")
    return 0


def _init_command(args: argparse.Namespace) -> int:
    directory = init_checkpoints(args.directory, preset=args.preset, seed=args.seed)
    print(f"wrote random {args.preset} checkpoints to {directory}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("render", help="portrait + speech -> talking-head mp4")
    p.add_argument("--portrait", required=True, help="image file (png, jpg, ...)")
    p.add_argument("--audio", required=True, help="speech: wav, flac, mp3, m4a, ogg, or a video's audio track")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--checkpoints", help="dawn checkpoint directory (see dawn init-checkpoints / training)")
    p.add_argument("--official-lfg", help="official LFG_128_1000ep.pth / LFG_256_400ep.pth")
    p.add_argument("--official-a2v", help="official DAWN_128.pth / DAWN_256.pth")
    p.add_argument("--official-pbnet-pose", help="official pbnet_seperate/pose/checkpoint_*.pth.tar")
    p.add_argument("--official-pbnet-blink", help="official pbnet_seperate/blink/checkpoint_*.pth.tar")
    p.add_argument("--hubert", help="HuBERT model folder (default: CHECKPOINTS/hubert)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1.0, as the reference)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pose-from", help="take head pose and blinks from this video instead of PBNet")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--crop", choices=("face", "none"), default="face")
    p.add_argument("--decode-batch", type=int, help="frames decoded per LFG batch (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_render_command)

    p = subparsers.add_parser("init-checkpoints", help="write randomly initialised checkpoints of a preset")
    p.add_argument("directory")
    p.add_argument("--preset", default="tiny", choices=("tiny", "hdtf128", "hdtf256"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init_command)
