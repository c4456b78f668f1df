"""Where a render's head jitter comes from: the head pose's jitter at each step from PBNet to the measured
video, on the test videos of a shards folder, beside the ground truth's.

    python bench/motion_jitter.py --shards DEMO/shards --checkpoints DEMO/checkpoints [--max-videos 2]
                                  [--max-frames 250] [--steps 20] [--seed 0]

(DEMO: a `dawn demo --out DEMO` folder.) Jitter = mean |x[t+1] - 2 x[t] + x[t-1]| * fps^2 of yaw, pitch and
roll (deg/s^2; dawn.metrics.motion.jitter), averaged over the three angles and the videos. Rows:

  truth, preprocessed        the shards' pose track (what PBNet trains on)
  truth, measured            the ground-truth frames measured like a render is (mediapipe on the crop)
  PBNet, latents from prior  PBNet's pose sequence as renders use it (latents drawn from its prior, correlated
                             over time when the checkpoint's latent_smoothing is set)
  PBNet, latent 0            the same with every frame's latent at the prior's mean
  LFG reconstruction         the LFG's reconstruction of each true frame from the first (no A2V-FDM),
                             measured: what the decoder can show at best
  render of PBNet's pose     the rendered video (A2V-FDM + LFG, deterministic DDIM), measured
  ... flows smoothed s=k     the same A2V-FDM sample with its flows smoothed over time (Gaussian, k frames)
                             before the LFG decode (RenderOptions.motion_smoothing)
  render of the true pose    the same, driven by the ground-truth pose and blinks, measured

The first two rows say how much the measurement adds; the PBNet rows what the motion generator asks for;
the render rows what A2V-FDM and the decoder make of it. Renders also get the lip-sync proxy (the mouth
opening's correlation with the speech envelope, dawn.metrics.lipsync), since smoothing can blunt the mouth.
Every row also gets its blink rate (dawn.metrics.motion.blinks_per_second of the eye-ratio track), which says
at which step the blinks of the ground truth get lost, and the pose's spread (std of yaw/pitch/roll over the
truth's, the evaluation's pose_std_ratio).
"""

import argparse

import numpy as np


def _blinks(eyes: np.ndarray) -> float:
    from dawn.metrics.motion import blinks_per_second

    return blinks_per_second(np.asarray(eyes, dtype=np.float64))


def _reconstruct(lfg, frames: np.ndarray, batch: int = 32) -> np.ndarray:
    """The LFG's reconstruction (T, S, S, 3) uint8 of every frame from the first, as in its training."""
    import torch

    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = torch.cat([lfg(images[:1].expand(len(chunk), -1, -1, -1), chunk)["prediction"]
                         for chunk in images.split(batch)])
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _spread(pose: np.ndarray, truth: np.ndarray) -> float:
    """std(pose) / std(truth) of yaw, pitch and roll, averaged (the evaluation's pose_std_ratio)."""
    from dawn.metrics.motion import track_statistics

    return float(np.mean(track_statistics(np.asarray(pose)[:, :3], np.asarray(truth)[:, :3])["std_ratio"]))


def _jitter(pose: np.ndarray) -> float:
    from dawn.metrics.motion import jitter

    return float(np.mean(jitter(np.asarray(pose, dtype=np.float64)[:, :3])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--max-videos", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smooth", type=float, nargs="*", default=[1.0, 2.0], help="flow smoothing sigmas to try")
    args = parser.parse_args()

    import torch

    from dawn.evaluation import _test_videos
    from dawn.metrics.lipsync import analyze_frames, lip_sync_proxy
    from dawn.pipeline import Motion, Portrait, RenderOptions, RenderPipeline, smooth_over_time

    pipeline = RenderPipeline.from_checkpoints(args.checkpoints, stages=("motion", "frames"))
    options = RenderOptions(steps=args.steps, eta=0.0, seed=args.seed, crop="none")
    rows: dict[str, list[float]] = {}
    sync: dict[str, list[float]] = {}
    blinks: dict[str, list[float]] = {}
    spread: dict[str, list[float]] = {}
    videos = []
    for video in _test_videos(args.shards, args.max_frames):
        if len(videos) == args.max_videos:
            break
        videos.append(video["video_id"])
        portrait = Portrait(image=video["frames"][0], pose=video["pose"][0].astype(np.float32),
                            eyes=video["eyes"][0].astype(np.float32), face_box=video["face_box"][0].astype(np.float32))
        hubert = video["hubert"].astype(np.float32)
        sampled = pipeline.sample_motion(portrait, hubert, seed=args.seed)
        with torch.no_grad():
            audio = torch.as_tensor(hubert)[None]
            z = torch.zeros(1, len(hubert), pipeline.pbnet_pose.config.audio_latent_dim)
            mean_pose = pipeline.pbnet_pose.generate(torch.as_tensor(portrait.pose)[None], audio, z=z)[0].numpy()
            z = torch.zeros(1, len(hubert), pipeline.pbnet_blink.config.audio_latent_dim)
            mean_eyes = pipeline.pbnet_blink.generate(torch.as_tensor(portrait.eyes)[None], audio, z=z)[0].numpy()
        truth_motion = Motion(pose=video["pose"].astype(np.float32), eyes=video["eyes"].astype(np.float32))
        measured_truth = analyze_frames(video["frames"])
        reconstruction = analyze_frames(_reconstruct(pipeline.lfg, video["frames"]))
        for label, pose, eyes in (("truth, preprocessed", video["pose"], video["eyes"]),
                                  ("truth, measured", measured_truth["pose"], measured_truth["eye_ratios"]),
                                  ("PBNet, latents from prior", sampled.pose, sampled.eyes),
                                  ("PBNet, latent 0", mean_pose, mean_eyes),
                                  ("LFG reconstruction", reconstruction["pose"], reconstruction["eye_ratios"])):
            rows.setdefault(label, []).append(_jitter(pose))
            blinks.setdefault(label, []).append(_blinks(eyes))
            spread.setdefault(label, []).append(_spread(pose, video["pose"]))
        for label, analysis in (("truth, measured", measured_truth), ("LFG reconstruction", reconstruction)):
            sync.setdefault(label, []).append(lip_sync_proxy(analysis["mouth_opening"], video["audio"])["correlation"])
        for name, motion in (("PBNet's pose", sampled), ("the true pose", truth_motion)):
            flows = pipeline.sample_flows(portrait, hubert, motion, options)
            for sigma in [0.0] + (list(args.smooth) if name == "PBNet's pose" else []):
                label = f"render of {name}" + (f", flows s={sigma:g}" if sigma else "")
                smoothed = smooth_over_time(flows, sigma) if sigma else flows
                analysis = analyze_frames(pipeline.decode_frames(portrait, smoothed))
                rows.setdefault(label, []).append(_jitter(analysis["pose"]))
                blinks.setdefault(label, []).append(_blinks(analysis["eye_ratios"]))
                spread.setdefault(label, []).append(_spread(analysis["pose"], video["pose"]))
                sync.setdefault(label, []).append(lip_sync_proxy(analysis["mouth_opening"], video["audio"])["correlation"])

    truth = np.mean(rows["truth, preprocessed"])
    measured = np.mean(rows["truth, measured"])
    print(f"motion jitter: {len(videos)} test videos of {args.shards} ({', '.join(videos)}), up to "
          f"{args.max_frames} frames, {args.steps} DDIM steps (eta 0), seed {args.seed}")
    print(f"{'head pose (yaw/pitch/roll)':<32} {'jitter deg/s^2':>14} {'/ truth':>8} {'/ truth measured':>17} "
          f"{'lip-sync':>9} {'blinks/s':>9} {'spread':>7}")
    for label, values in rows.items():
        value = float(np.mean(values))
        lips = f"{np.mean(sync[label]):>9.2f}" if label in sync else f"{'':>9}"
        print(f"{label:<32} {value:>14.0f} {value / truth:>8.2f} {value / measured:>17.2f} {lips} "
              f"{np.mean(blinks[label]):>9.2f} {np.mean(spread[label]):>7.2f}")


if __name__ == "__main__":
    main()
