"""Paste-back cost next to the render itself, in one run.

    python bench/paste_back.py                      # hdtf128, 100 frames, 20 DDIM steps, 1024x768 and 1920x1080
    python bench/paste_back.py --frames 50 --steps 2 --threads 2

Renders `--frames` frames with random hdtf128 weights (sampling + LFG decode, `RenderPipeline`), then times
`dawn.composite.paste_back` of those frames into portraits of each size (the mask, the resize and the blend;
not the H.264 encoding, which every output pays) and prints each as a share of the render's time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from render import make_inputs  # bench/render.py (scripts here import by name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="hdtf128")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "1920x1080"], help="portrait sizes WxH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dawn.composite import paste_back
    from dawn.config import build_models
    from dawn.pipeline import RenderOptions, RenderPipeline

    models = build_models(args.preset, seed=0)
    pipeline = RenderPipeline(lfg=models["lfg"], a2v=models["a2v"]).use_channels_last()
    portrait, hubert, motion = make_inputs(pipeline.resolution, args.frames)
    start = time.perf_counter()
    flows = pipeline.sample_flows(portrait, hubert, motion, RenderOptions(steps=args.steps, eta=0.0))
    frames = pipeline.decode_frames(portrait, flows)
    render_s = time.perf_counter() - start
    print(f"render: {args.preset}, {args.frames} frames, {args.steps} DDIM steps, {args.threads} thread(s): "
          f"{render_s:.1f} s")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        side = int(0.6 * min(height, width))
        box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        start = time.perf_counter()
        written = sum(len(batch) for batch in paste_back(image, frames, portrait.image, box, max(width, height)))
        paste_s = time.perf_counter() - start
        print(f"paste-back into {width}x{height} (crop side {side} px): {paste_s:.2f} s for {written} frames, "
              f"{1000 * paste_s / written:.1f} ms/frame = {100 * paste_s / render_s:.1f}% of the render")


if __name__ == "__main__":
    main()
