"""A2V-FDM denoiser cost per render: dawn's prepared, windowed U-Net vs the reference's way of running it.

    python bench/denoiser.py [--preset hdtf128] [--frames 200] [--steps 20] [--timed-steps 2] [--threads 1]

Random weights (cost does not depend on them), batch 1. dawn: `prepare` once per render (condition
MLPs, cross-attention keys/values, source part of the input convolution), then `forward_prepared` per
DDIM step with local temporal attention. Reference way: `reference_mode=True` (temporal attention with
explicit T x T logits and window mask over all positions at once) and the plain `forward` per step
(everything recomputed from the 275-channel input and the raw condition each time). Both share dawn's
other kernels (channels-last per-frame convolutions, closed-form cross-attention), so the ratio is a
lower bound of the gain over the reference code itself. Per-render time = one-off part + steps x the
median of `--timed-steps` steps; CPU time is the process's (all threads).
"""

import argparse
import dataclasses
import statistics
import time

import torch


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hdtf128")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of a render")
    parser.add_argument("--timed-steps", type=int, default=2, help="steps actually run per method")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from dawn.models.unet3d import A2VConfig, A2VFDM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = A2VConfig.preset(args.preset)
    ours = A2VFDM(config).eval()
    reference = A2VFDM(dataclasses.replace(config, reference_mode=True)).eval()
    reference.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    size, frames = config.latent_size, args.frames
    x_t = torch.randn(1, 3, frames, size, size, generator=g)
    features = torch.randn(1, config.source_channels + config.face_channels, size, size, generator=g)
    cond = torch.randn(1, frames, config.cond_dim, generator=g)
    t = torch.tensor([500])

    with torch.no_grad():
        denoise, prep_wall, prep_cpu = timed(lambda: ours.denoiser(features, cond))
        runs = {"dawn": [timed(lambda: denoise(x_t, t)) for _ in range(args.timed_steps)],
                "reference way": [timed(lambda: reference(x_t, t, features, cond)) for _ in range(args.timed_steps)]}
        deviation = (runs["dawn"][0][0] - runs["reference way"][0][0]).abs().max().item()

    print(f"A2V-FDM denoiser, {args.preset} (latent {size}x{size}), {frames} frames, batch 1, float32 CPU, "
          f"{args.threads} torch thread(s); max |dawn - reference way| = {deviation:.1e}")
    print(f"{'':<14}{'one-off s (wall/CPU)':>22}{'per step s (wall/CPU)':>24}{f'render of {args.steps} steps (wall/CPU)':>36}")
    totals = {}
    for name, steps in runs.items():
        once = (prep_wall, prep_cpu) if name == "dawn" else (0.0, 0.0)
        step = (statistics.median(s[1] for s in steps), statistics.median(s[2] for s in steps))
        totals[name] = [once[i] + args.steps * step[i] for i in range(2)]
        print(f"{name:<14}{once[0]:>11.2f} /{once[1]:>8.2f}{step[0]:>13.2f} /{step[1]:>8.2f}"
              f"{totals[name][0]:>24.1f} /{totals[name][1]:>9.1f}")
    ratio = [totals["reference way"][i] / totals["dawn"][i] for i in range(2)]
    print(f"reference way / dawn: x{ratio[0]:.2f} wall, x{ratio[1]:.2f} CPU")


if __name__ == "__main__":
    main()
