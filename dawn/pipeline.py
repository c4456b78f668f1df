"""The render pipeline (paper §3.6): portrait + speech -> talking-head frames, all frames in one pass.

Stages, each a method with array/tensor inputs and outputs so that a stage can run in another process
(a Serve replica, a Ray Data actor):

    analyze_portrait(image)        face crop, source pose/eyes, face box          (features, CPU)
    audio_features(waveform)       HuBERT at 25 fps                               (features, CPU)
    sample_motion(...)             pose + blink sequences from PBNet (seeded)     (PBNet)
    motion_from_video(frames)      ... or taken from a driving video (A.4.1)
    sample_flows(...)              flow + occlusion for every frame, one DDIM pass (A2V-FDM)
    decode_frames(...)             frames from the source and the flows, batched   (LFG)

`render_files` strings them together for the CLI; the Serve app and the batch job call the stages.
A `RenderPipeline` may hold only the models of the stages it runs (e.g. a PBNet replica holds PBNet).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dawn import DawnError
from dawn.models import native

Progress = Callable[[int, int], None]

SAMPLERS = ("ddim", "dpm-solver++")


def decode_batch_size(requested: int | None, device) -> int:
    """Frames per LFG decode batch: `requested`, else 32 on CUDA and 4 on CPU (where larger batches leave
    the caches: a 32-frame batch is ~25% slower per frame at hdtf128)."""
    return requested or (32 if torch.device(device).type == "cuda" else 4)


class NoiseDraws(Sequence):
    """The sampler's noise draws for a batch of renders, each made when the sampler asks for it (in order),
    so that a long render holds one draw at a time: draw k is render b's k-th (1, C, T, L, L) randn from
    its own generator seeded with seeds[b], concatenated over b."""

    def __init__(self, seeds: list[int], shape: tuple, count: int, device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.shape, self.count, self.device, self.made = shape, count, device, 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> torch.Tensor:
        if k != self.made:
            raise IndexError(f"noise draws are made in order: asked for draw {k}, next is {self.made}")
        self.made += 1
        return torch.cat([torch.randn(self.shape, generator=g, device=self.device) for g in self.generators])


@dataclass
class RenderOptions:
    steps: int = 20
    eta: float = 1.0
    seed: int = 0
    sampler: str = "ddim"  # "ddim" (the reference's) or "dpm-solver++" (faster, off by default)
    crop: str = "face"  # "face": crop/align around the face; "none": resize the whole image (reference)
    decode_batch: int | None = None  # frames per LFG decode batch; None: 4 on CPU (cache-friendly), 32 on CUDA
    cond_scale: float = 1.0


@dataclass
class Portrait:
    """The source frame and its state, measured on the cropped image the models see."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    pose: np.ndarray  # (6,) yaw, pitch, roll (deg), scale, tx, ty
    eyes: np.ndarray  # (2,) left, right eye ratios
    face_box: np.ndarray  # (6,) [x_min, x_max, y_min, y_max, H, W]
    notes: list[str] = field(default_factory=list)


@dataclass
class Motion:
    pose: np.ndarray  # (T, 6) absolute, raw units
    eyes: np.ndarray  # (T, 2) absolute eye ratios


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class RenderPipeline:
    """Holds the networks (any subset) and runs the render stages on one device."""

    def __init__(self, lfg=None, a2v=None, pbnet_pose=None, pbnet_blink=None, hubert=None,
                 device: str = "cpu", dtype: str = "fp32"):
        if dtype not in DTYPES:
            raise DawnError(f"unknown dtype {dtype!r} (use one of {sorted(DTYPES)})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DawnError("--device cuda was asked for but no CUDA device is available")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.lfg, self.a2v, self.pbnet_pose, self.pbnet_blink = (
            m.to(self.device).eval() if m is not None else None for m in (lfg, a2v, pbnet_pose, pbnet_blink))
        self.hubert = hubert
        if lfg is not None and a2v is not None:
            _check_compatible(lfg, a2v)
        if a2v is not None and self.device.type == "cpu":
            native.load()  # the native CPU kernels: built here (seconds, once per machine), not mid-render

    # ---- loading ---------------------------------------------------------------------------------
    def use_channels_last(self) -> "RenderPipeline":
        """Store the U-Net's convolution weights channels_last, the layout its per-frame convolutions read, so
        they are not converted at every call. In place: the loaders call it on
        models they own; a caller passing in a model it still trains should not (DeepSpeed's parameter
        broadcast needs contiguous parameters)."""
        if self.a2v is not None:
            self.a2v.unet.to(memory_format=torch.channels_last)
        return self

    @classmethod
    def from_checkpoints(cls, directory: str | Path, hubert_dir: str | Path | None = None,
                         stages: tuple[str, ...] = ("features", "pbnet", "a2v"), device: str = "cpu",
                         dtype: str = "fp32") -> "RenderPipeline":
        """Load a dawn checkpoint directory (see dawn.checkpoint); `stages` picks which models to load."""
        from dawn.checkpoint import load_model

        directory = Path(directory)
        if not directory.is_dir():
            raise DawnError(f"checkpoint directory not found: {directory}")
        models = {}
        if "a2v" in stages:
            models["lfg"] = load_model(directory, "lfg")
            models["a2v"] = load_model(directory, "a2v")
        if "pbnet" in stages:
            models["pbnet_pose"] = load_model(directory, "pbnet_pose")
            models["pbnet_blink"] = load_model(directory, "pbnet_blink")
        if "features" in stages:
            models["hubert"] = _load_hubert(hubert_dir or directory / "hubert", device)
        return cls(**models, device=device, dtype=dtype).use_channels_last()

    @classmethod
    def from_official(cls, lfg: str | Path, a2v: str | Path, pbnet_pose: str | Path, pbnet_blink: str | Path,
                      hubert_dir: str | Path, device: str = "cpu", dtype: str = "fp32") -> "RenderPipeline":
        """Load the officially released DAWN files through the state-dict adapters."""
        from dawn.adapters.a2v import load_official_a2v
        from dawn.adapters.lfg import load_official_lfg
        from dawn.adapters.pbnet import load_official_pbnet

        return cls(lfg=load_official_lfg(lfg), a2v=load_official_a2v(a2v),
                   pbnet_pose=load_official_pbnet(pbnet_pose, "pose"),
                   pbnet_blink=load_official_pbnet(pbnet_blink, "blink"),
                   hubert=_load_hubert(hubert_dir, device), device=device, dtype=dtype).use_channels_last()

    @property
    def resolution(self) -> int:
        if self.lfg is None:
            raise RuntimeError("this pipeline holds no LFG")
        return self.lfg.config.image_size

    # ---- stage 1: features -----------------------------------------------------------------------
    def analyze_portrait(self, image: np.ndarray, crop: str = "face", resolution: int | None = None,
                         name: str = "portrait") -> Portrait:
        from dawn.face import analyze_portrait

        size = resolution or self.resolution
        analysis = analyze_portrait(image, size=size, crop=crop, name=name)
        return Portrait(image=analysis.image, pose=np.asarray(analysis.pose, np.float32),
                        eyes=np.asarray(analysis.eye_ratios, np.float32),
                        face_box=np.asarray(analysis.face_box, np.float32), notes=list(analysis.notes))

    def audio_features(self, waveform: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 (N,) -> HuBERT features (T, 1024) at 25 fps, T = int(N / 16000 * 25)."""
        if self.hubert is None:
            raise RuntimeError("this pipeline holds no HuBERT model")
        return self.hubert(waveform)

    # ---- stage 2: pose and blink -----------------------------------------------------------------
    @torch.no_grad()
    def sample_motion(self, portrait: Portrait, hubert: np.ndarray, seed: int = 0) -> Motion:
        """PBNet pose and blink sequences for every frame (paper §3.4), seeded."""
        audio = torch.as_tensor(hubert, dtype=torch.float32, device=self.device)[None]
        out = []
        for k, (model, state) in enumerate(((self.pbnet_pose, portrait.pose), (self.pbnet_blink, portrait.eyes))):
            generator = torch.Generator(device=self.device).manual_seed(seed * 2 + k)
            source = torch.as_tensor(state, dtype=torch.float32, device=self.device)[None]
            with _autocast(self.device, self.dtype):
                seq = model.generate(source, audio, generator=generator)
            out.append(seq[0].float().cpu().numpy())
        return Motion(pose=out[0], eyes=out[1])

    def motion_from_video(self, frames: np.ndarray, num_frames: int) -> Motion:
        """Pose and eye ratios measured on every frame of a driving video (paper A.4.1), fitted to
        `num_frames` (cut, or the last frame held)."""
        from dawn.face import analyze_video_frames

        analysis = analyze_video_frames(frames)
        if not analysis["found"].any():
            raise DawnError("no face found in any frame of the pose video")
        index = np.minimum(np.arange(num_frames), len(frames) - 1)
        return Motion(pose=analysis["pose"][index].astype(np.float32), eyes=analysis["eye_ratios"][index].astype(np.float32))

    # ---- stage 3: flows ----------------------------------------------------------------------------
    def condition(self, portrait: Portrait, hubert: np.ndarray, motion: Motion) -> torch.Tensor:
        """Per-frame condition (1, T, 1032) = [HuBERT, pose - source pose, eyes - source eyes] (§3.3)."""
        cond = np.concatenate([hubert, motion.pose - portrait.pose[None], motion.eyes - portrait.eyes[None]], axis=1)
        return torch.as_tensor(cond, dtype=torch.float32, device=self.device)[None]

    def source_tensor(self, portrait: Portrait) -> torch.Tensor:
        return torch.tensor(portrait.image, device=self.device).permute(2, 0, 1)[None].float() / 255.0  # copies: the array may be read-only

    def sample_flows(self, portrait: Portrait, hubert: np.ndarray, motion: Motion, options: RenderOptions,
                     progress: Progress | None = None) -> torch.Tensor:
        """Flow and occlusion for all T frames in one sampling pass: (1, 3, T, L, L), channels
        (flow x, flow y, 2 * occlusion - 1)."""
        return self.sample_flows_batch([portrait], [hubert], [motion], options, seeds=[options.seed],
                                       progress=progress)

    @torch.no_grad()
    def sample_flows_batch(self, portraits: list[Portrait], huberts: list[np.ndarray], motions: list[Motion],
                           options: RenderOptions, seeds: list[int], progress: Progress | None = None
                           ) -> torch.Tensor:
        """`sample_flows` for B renders with the same frame count T in one batched pass -> (B, 3, T, L, L).

        Render b draws its noise from its own generator seeded with seeds[b], in the order a single
        render draws it, so its flows do not depend on what it is batched with (options.seed is unused).
        """
        from dawn.models.diffusion import classifier_free_guidance, ddim_sample, ddim_timesteps, dpm_solver_sample

        if options.sampler not in SAMPLERS:
            raise DawnError(f"unknown sampler {options.sampler!r} (use one of {SAMPLERS})")
        if len({len(h) for h in huberts}) != 1 or not len(portraits) == len(motions) == len(seeds) == len(huberts):
            raise ValueError("sample_flows_batch needs one portrait, motion and seed per render, all of one length")
        cond = torch.cat([self.condition(p, h, m) for p, h, m in zip(portraits, huberts, motions)])
        source = torch.cat([self.source_tensor(p) for p in portraits])
        box = torch.as_tensor(np.stack([p.face_box for p in portraits]), dtype=torch.float32, device=self.device)
        latent = self.a2v.config.latent_size
        one = (1, 3, cond.shape[1], latent, latent)
        # x_T, then one draw per DDIM step that adds noise (t' > 0 and eta > 0); DPM-Solver++ draws x_T only.
        pairs = ddim_timesteps(options.steps, self.a2v.schedule.timesteps)
        draws = 1 + (sum(t_next > 0 for _, t_next in pairs) if options.sampler == "ddim" and options.eta > 0 else 0)
        noise = NoiseDraws(seeds, one, draws, self.device)
        with _autocast(self.device, self.dtype):
            features = self.a2v.source_features(self.lfg.source_latent(source), box)
            denoise = self.a2v.denoiser(features, cond)
            if options.cond_scale != 1.0:
                denoise = classifier_free_guidance(denoise, self.a2v.denoiser(features, torch.zeros_like(cond)),
                                                   options.cond_scale)
            shape = (len(seeds), *one[1:])
            if options.sampler == "ddim":
                motion = ddim_sample(self.a2v.schedule, denoise, shape, steps=options.steps, eta=options.eta,
                                     noise=noise, progress=progress, clip=self.a2v.clip_samples)
            else:
                motion = dpm_solver_sample(self.a2v.schedule, denoise, shape, steps=options.steps, noise=noise,
                                           progress=progress, clip=self.a2v.clip_samples)
        return self.a2v.flows_from_motion(motion.float())

    # ---- stage 4: frames ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode_frames(self, portrait: Portrait, flows: torch.Tensor, batch_size: int | None = None,
                      progress: Progress | None = None) -> np.ndarray:
        """LFG decode: the source encoded once, frames decoded in batches (`decode_batch_size`) ->
        (T, S, S, 3) uint8."""
        batch_size = decode_batch_size(batch_size, self.device)
        source = self.source_tensor(portrait)
        grids = flows[0, :2].permute(1, 2, 3, 0)  # (T, L, L, 2)
        occlusion = (flows[0, 2:3].transpose(0, 1) + 1) / 2  # (T, 1, L, L)
        t, s = grids.shape[0], source.shape[-1]
        frames = np.empty((t, s, s, 3), dtype=np.uint8)  # uint8 output keeps long videos small
        with _autocast(self.device, self.dtype):
            features = self.lfg.encode_source(source)
            for start in range(0, t, batch_size):
                stop = min(start + batch_size, t)
                batch = self.lfg.decode(features, source, grids[start:stop].to(self.device),
                                        occlusion[start:stop].to(self.device))
                frames[start:stop] = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                if progress is not None:
                    progress(stop, t)
        return frames

    # ---- everything --------------------------------------------------------------------------------
    def render_arrays(self, image: np.ndarray, waveform: np.ndarray, options: RenderOptions,
                      pose_frames: np.ndarray | None = None, progress_bars: bool = False,
                      name: str = "portrait") -> tuple[np.ndarray, dict]:
        """All stages on in-memory inputs -> (frames (T,S,S,3) uint8, info dict with timings)."""
        timings = {}
        t0 = time.perf_counter()
        portrait = self.analyze_portrait(image, crop=options.crop, name=name)
        hubert = self.audio_features(waveform)
        timings["features_s"] = time.perf_counter() - t0
        t = hubert.shape[0]
        t0 = time.perf_counter()
        motion = (self.motion_from_video(pose_frames, t) if pose_frames is not None
                  else self.sample_motion(portrait, hubert, seed=options.seed))
        timings["motion_s"] = time.perf_counter() - t0
        with _progress_bar(progress_bars, options.steps, "sampling") as bar:
            t0 = time.perf_counter()
            flows = self.sample_flows(portrait, hubert, motion, options, progress=bar)
            timings["sampling_s"] = time.perf_counter() - t0
        with _progress_bar(progress_bars, t, "decoding") as bar:
            t0 = time.perf_counter()
            frames = self.decode_frames(portrait, flows, batch_size=options.decode_batch, progress=bar)
            timings["decoding_s"] = time.perf_counter() - t0
        info = {"frames": t, "notes": portrait.notes, "timings": timings, "motion": motion, "portrait": portrait}
        return frames, info


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar driven by progress(done, total) callbacks, or None when disabled."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step" if desc == "sampling" else "frame")

    def update(done: int, total_: int):
        bar.total = total_
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _check_compatible(lfg, a2v) -> None:
    s, latent = lfg.config.image_size, a2v.config.latent_size
    if s != 4 * latent:
        raise DawnError(f"checkpoints do not fit together: LFG renders {s}x{s} but A2V-FDM expects a "
                        f"{latent}x{latent} latent ({4 * latent}x{4 * latent} images)")


def _load_hubert(directory, device: str):
    from dawn.audio import HubertFeatureExtractor

    if directory is None:
        raise DawnError("no HuBERT model directory given (--hubert DIR)")
    return HubertFeatureExtractor(directory, device=device)


def load_pose_frames(path: str | Path) -> np.ndarray:
    """A driving video's frames resampled to 25 fps: (T, H, W, 3) uint8 RGB (for motion_from_video)."""
    from dawn.data.preprocess import resample_indices
    from dawn.video import read_video

    video, fps = read_video(path)
    return video[resample_indices(len(video), fps)]


def render_files(pipeline: RenderPipeline, portrait_path: str | Path, audio_path: str | Path,
                 out_path: str | Path, options: RenderOptions, pose_video: str | Path | None = None,
                 progress_bars: bool = True) -> dict:
    """Read the inputs, render, and write an H.264 mp4 with the input audio as AAC (atomically)."""
    from dawn.audio import load_audio
    from dawn.face import load_image
    from dawn.video import write_mp4

    image = load_image(portrait_path)
    waveform = load_audio(audio_path)
    pose_frames = load_pose_frames(pose_video) if pose_video is not None else None
    frames, info = pipeline.render_arrays(image, waveform, options, pose_frames=pose_frames,
                                          progress_bars=progress_bars, name=str(portrait_path))
    write_mp4(out_path, frames, fps=25, audio=waveform)
    return info
