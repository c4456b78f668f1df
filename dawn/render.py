"""`dawn render` (portrait + speech -> mp4) and `dawn init-checkpoints` (random weights of a preset)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from dawn import DawnError
from dawn.pipeline import SAMPLERS, RenderOptions, RenderPipeline, RenderState, write_video

def init_checkpoints(directory: str | Path, preset: str = "tiny", seed: int = 0, hubert: bool = True) -> Path:
    """Write randomly initialised dawn checkpoints of `preset` (+ a tiny random HuBERT) to `directory`."""
    from dawn.audio import save_random_hubert
    from dawn.checkpoint import save_model
    from dawn.config import build_models

    directory = Path(directory)
    for name, model in build_models(preset, seed).items():
        save_model(model, directory, name, extra={"preset": preset, "initialisation": f"random, seed {seed}"})
    if hubert:
        save_random_hubert(directory / "hubert", seed=seed)
    return directory


def render_options(args: argparse.Namespace) -> RenderOptions:
    """The RenderOptions of parsed `dawn render` flags (OptionError names a bad value)."""
    return RenderOptions.from_fields({name: getattr(args, name) for name in RenderOptions.FIELDS
                                      if getattr(args, name, None) is not None})


def _render_command(args: argparse.Namespace) -> int:
    options = render_options(args)  # a bad option stops here, before any model is loaded
    official = [args.official_lfg, args.official_a2v, args.official_pbnet_pose, args.official_pbnet_blink]
    if any(official) and not all(official):
        raise DawnError("--official-lfg, --official-a2v, --official-pbnet-pose and --official-pbnet-blink "
                        "must be given together")
    for path, what in ((args.portrait, "portrait"), (args.audio, "audio"), (args.pose_from, "pose video")):
        if path is not None and not Path(path).is_file():
            raise DawnError(f"{what} file not found: {path}")
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
    state = RenderState.from_files(args.portrait, args.audio, args.pose_from, options=options)
    with _progress_bars(enabled=not args.quiet) as progress:
        state = pipeline.render(state, progress=progress)
    write_video(state, args.out)
    for note in state.notes:
        print(f"note: {note}", file=sys.stderr)
    timing = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in state.timings.items())
    print(f"wrote {args.out}: {state.num_frames} frames at 25 fps ({timing})")
    return 0


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """A progress(what, done, total) callback drawing one tqdm bar per kind of work, or None."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def progress(what: str, done: int, total: int) -> None:
        if what not in bars:
            bars[what] = tqdm(total=total, desc=what, unit="step" if what == "sampling" else "frame")
        bar = bars[what]
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        yield progress
    finally:
        for bar in bars.values():
            bar.close()


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
    defaults = RenderOptions()
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"sampling steps (default {defaults.steps})")
    p.add_argument("--eta", type=float, default=defaults.eta,
                   help="DDIM eta, 0 (deterministic) to 1 (default, the reference's)")
    p.add_argument("--sampler", default=defaults.sampler, help=f"{' or '.join(SAMPLERS)} (default {defaults.sampler})")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--pose-from", help="take head pose and blinks from this video instead of PBNet")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--crop", default=defaults.crop,
                   help="face (crop around the face, default) or none (the whole image resized, as the reference)")
    p.add_argument("--decode-batch", type=int, help="frames decoded per LFG batch (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--paste-back", action="store_true",
                   help="write the whole portrait at its resolution with the rendered head blended in")
    p.add_argument("--max-side", type=int, default=defaults.max_side,
                   help=f"with --paste-back: the video's longer side at most this (default {defaults.max_side})")
    p.add_argument("--motion-smoothing", type=float, default=defaults.motion_smoothing,
                   help="smooth the sampled motion over time, sigma in frames (default 0: as sampled; ~1 steadies "
                        "briefly trained models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_render_command)

    p = subparsers.add_parser("init-checkpoints", help="write randomly initialised checkpoints of a preset")
    p.add_argument("directory")
    p.add_argument("--preset", default="tiny", choices=("tiny", "hdtf128", "hdtf256"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init_command)
