"""PBNet pose's sampled motion as it trains: how far its sequences move (spread) and how smoothly (jitter), with
the prior's latents drawn independently per frame (the paper's) and correlated over time (latent_smoothing),
at the prior's scale of 1 and at the scale fitted to training batches (fit_latent_scale).

    python bench/pbnet_spread.py --shards DEMO/shards [--steps 500] [--every 100] [--lr 3e-4] [--batch 8]
                                 [--options '{"gan_weight": 0}'] [--smoothing 0 4 8] [--samples 3] [--seed 0]

(DEMO: a `dawn demo --out DEMO` folder.) Trains PBNet pose (tiny preset, the objective's real training step,
plain torch on 1 thread, no Ray) on the training split and, every `--every` steps, draws `--samples` pose
sequences for each test video (at most 2) from its first frame's pose and its audio, for each latent smoothing
sigma. Per row: the logged losses averaged since the last row (reconstruction `rec`, `kl`, `gan`, the
discriminator's `d_loss`), then per sigma spread = std of the sampled yaw/pitch/roll over the truth's (the
evaluation's pose_std_ratio) and jitter = their mean |frame-to-frame acceleration| over the truth's, averaged
over samples and videos, first with latent_scale 1 (the paper's N(0, I)), then with the scale that
`fit_latent_scale` finds on LATENT_SCALE_FIT_BATCHES training batches (`scale`). The truth's own values are
1.00 / 1.00.
"""

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--options", default="{}", help="PBNet objective options (JSON), e.g. kl_max, gan_weight")
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.0, 4.0, 8.0],
                        help="latent smoothing sigmas (frames) to sample with")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from dawn.data.readers import iter_shard_rows
    from dawn.evaluation import _test_videos
    from dawn.metrics.motion import jitter, track_statistics
    from dawn.train.config import TrainConfig
    from dawn.train.loop import build_objective
    from dawn.train.objective import torch_engines
    from dawn.train.pbnet import LATENT_SCALE_FIT_BATCHES, fit_latent_scale

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = TrainConfig(model="pbnet_pose", data=args.shards, preset="tiny", batch_size=args.batch, lr=args.lr,
                         objective_options=json.loads(args.options), steps=args.steps)
    objective = build_objective(config, "cpu")
    engines = torch_engines(objective)
    pbnet = objective.pbnet
    rows = list(iter_shard_rows(args.shards, split="train", columns=list(objective.data_columns)))
    tests = [v for _, v in zip(range(2), _test_videos(args.shards, None))]

    def sample_statistics(sigma: float, fit: bool) -> tuple[float, float, float]:
        pbnet.config.latent_smoothing = sigma
        pbnet.config.latent_scale = 1.0
        if fit:
            fit_rng = np.random.default_rng(args.seed)  # the same training windows at every row
            fit_rows = (rows[i] for i in fit_rng.permutation(len(rows)))
            fit_batches = [b for _, b in zip(range(LATENT_SCALE_FIT_BATCHES), objective.batches(fit_rows, fit_rng))]
            fit_latent_scale(pbnet, fit_batches)
        pbnet.eval()
        spread, shake = [], []
        with torch.no_grad():
            for video in tests:
                truth = video["pose"].astype(np.float64)[:, :3]
                source = torch.as_tensor(video["pose"][:1], dtype=torch.float32)
                audio = torch.as_tensor(video["hubert"], dtype=torch.float32)[None]
                for k in range(args.samples):
                    pose = pbnet.generate(source, audio, generator=torch.Generator().manual_seed(k))[0, :, :3].numpy()
                    spread.append(np.mean(track_statistics(pose, truth)["std_ratio"]))
                    shake.append(np.mean(jitter(pose)) / np.mean(jitter(truth)))
        pbnet.train()
        scale = pbnet.config.latent_scale
        pbnet.config.latent_smoothing, pbnet.config.latent_scale = 0.0, 1.0
        return float(np.mean(spread)), float(np.mean(shake)), scale

    print(f"pbnet spread: PBNet pose (tiny), batch {args.batch}, lr {args.lr:g}, options {args.options}, "
          f"{len(rows)} training segments, {len(tests)} test videos x {args.samples} samples, seed {args.seed}")
    print(f"{'':>37}" + "".join(f"  {'s=' + format(s, 'g') + ', scale 1':^19}  {'s=' + format(s, 'g') + ', fitted':^25}"
                                 for s in args.smoothing))
    print(f"{'step':>5} {'rec':>8} {'kl':>7} {'gan':>6} {'d_loss':>7}"
          + f"  {'spread':>11} {'jitter':>7}  {'scale':>7} {'spread':>8} {'jitter':>8}" * len(args.smoothing))
    rng = np.random.default_rng(args.seed)
    history, step, started = [], 0, time.perf_counter()
    while step < args.steps:
        for batch in objective.batches((rows[i] for i in rng.permutation(len(rows))), rng):
            if step == args.steps:
                break
            history.append(objective.train_step(engines, batch, step))
            step += 1
            if step % args.every == 0:
                recent = history[-args.every:]
                losses = [float(np.mean([h[k] for h in recent])) for k in ("rec", "kl", "gan", "d_loss")]
                cells = ""
                for sigma in args.smoothing:
                    spread, shake, _ = sample_statistics(sigma, fit=False)
                    fitted_spread, fitted_shake, scale = sample_statistics(sigma, fit=True)
                    cells += (f"  {spread:>11.2f} {shake:>7.2f}  {scale:>7.2f} {fitted_spread:>8.2f} "
                              f"{fitted_shake:>8.2f}")
                print(f"{step:>5} {losses[0]:>8.4f} {losses[1]:>7.3f} {losses[2]:>6.2f} {losses[3]:>7.3f}{cells}",
                      flush=True)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
