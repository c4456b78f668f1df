"""A2V-FDM objective (paper §3.3, §3.5, appendix A.2; ARCHITECTURE.md §4.7): denoise LFG motion.

Per batch of clips (B, 3, K, S, S) with a source frame (B, 3, S, S):
  targets   x0 = [flow x, flow y, 2*occ - 1] (B, 3, K, L, L) of every clip frame w.r.t. the source, from
            the frozen LFG (its parameters are never trained here, A.2)
  features  A2VFDM.source_features(z_src = LFG source latent, face mask of the source face box)
  condition (B, K, 1032) = [HuBERT, pose - source pose, eyes - source eyes]; each frame's condition is
            replaced by zeros with probability 0.1 (condition dropout, §4.7)
  loss      Eq. 7: L_simple + w_lip (L_simple ⊗ m_lip), w_lip = 1, m_lip the clip frames' lip boxes at
            latent resolution (and, with the option w_eye > 0, the same kind of term over the eye boxes) (dawn.models.diffusion.diffusion_loss; optional temporal-FFT term of the
            reference with fft_weight, off by default since the paper does not use it). With the model
            option prediction="v" (`--model-overrides '{"prediction": "v"}'`) the network learns v instead
            of eps (same loss form on v); the demo uses it.
Curriculum (§3.5, `TrainConfig.stage`): stage 1 clips of K' = 20 frames with the first frame as source;
stage 2 clips of K in [30, 40] with the source anywhere in the segment, starting from the stage-1 weights
(`TrainConfig.init_from`). Clip sampling is `dawn.data.readers.a2v_clips`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dawn import DawnError
from dawn.checkpoint import load_model, save_model
from dawn.data.readers import A2V_STAGE1_FRAMES, A2V_STAGE2_FRAMES, a2v_clips
from dawn.models.diffusion import CosineSchedule, ddim_sample, diffusion_loss
from dawn.models.unet3d import A2VFDM
from dawn.config import MODELS
from dawn.train.config import TrainConfig
from dawn.train.objective import Objective, box_mask, image_grid, override_config


class A2VObjective(Objective):
    checkpoint_name = "a2v"
    data_columns = ("frames", "hubert", "pose", "eyes", "face_box", "lip_box", "eye_box")

    @dataclass
    class Options:
        w_lip: float = 1.0  # Eq. 7 (A.2: w_lip = 1 in both stages)
        # The same kind of term over the eyes' boxes (0 = off, the paper's loss): a blink moves a few latent
        # cells for a few frames, which the clip-wide loss hardly weighs in a short run (dawn/demo.py).
        w_eye: float = 0.0
        cond_dropout: float = 0.1  # per-frame probability of an all-zero condition
        fft_weight: float = 0.0  # reference's temporal-FFT term (0.15 there); not in the paper
        stage1_frames: int = A2V_STAGE1_FRAMES  # K'
        stage2_frames: tuple[int, int] = A2V_STAGE2_FRAMES  # [K_min, K_max]
        target_batch: int = 64  # frames per frozen-LFG call when computing targets
        sample_steps: int = 10  # DDIM steps of the MLflow sample artifact

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.lfg = load_model(config.lfg, "lfg", map_location=str(self.device)).eval().requires_grad_(False)
        lfg_config = self.lfg.config
        a2v_config = MODELS["a2v"].preset_config(config.preset, image_size=lfg_config.image_size,
                                                 source_channels=lfg_config.latent_channels)
        a2v_config = override_config(a2v_config, config.model_overrides)
        self.a2v = A2VFDM(a2v_config).to(self.device)
        if config.init_from:
            start = load_model(config.init_from, "a2v")
            if dataclasses.asdict(start.config) != dataclasses.asdict(a2v_config):
                raise DawnError(f"--init-from {config.init_from}: its A2V-FDM config differs from this run's "
                                f"({start.config} vs {a2v_config})")
            self.a2v.load_state_dict(start.state_dict())
        self.schedule = CosineSchedule(a2v_config.timesteps).to(self.device)  # fp32 even under autocast
        self.trainable = {"model": self.a2v}

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        self.lfg.eval()

    def batches(self, rows: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
        o = self.options
        return a2v_clips(rows, self.config.batch_size, self.config.stage, rng, per_row=self.config.samples_per_row,
                         stage1_frames=o.stage1_frames, stage2_frames=tuple(o.stage2_frames))

    @torch.no_grad()
    def motion_targets(self, frames: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """frames (B, 3, K, S, S), source (B, 3, S, S) -> x0 (B, 3, K, L, L): [flow x, flow y, 2*occ-1] of
        each frame w.r.t. the source, from the frozen LFG, as A2V-FDM generates it (A2VConfig.motion_target)."""
        b, _, k, s, _ = frames.shape
        driving = frames.transpose(1, 2).reshape(b * k, 3, s, s)
        sources = source[:, None].expand(b, k, 3, s, s).reshape(b * k, 3, s, s)
        step = self.options.target_batch
        flows, occlusions = zip(*(self.lfg.flow_targets(sources[i:i + step], driving[i:i + step])
                                  for i in range(0, b * k, step)))
        flow, occlusion = torch.cat(flows).float(), torch.cat(occlusions).float()  # (BK, L, L, 2), (BK, 1, L, L)
        x0 = torch.cat([flow.permute(0, 3, 1, 2), 2 * occlusion - 1], dim=1)  # (BK, 3, L, L)
        return self.a2v.motion_from_flows(x0.view(b, k, 3, *x0.shape[-2:]).transpose(1, 2).contiguous())

    def condition(self, batch: dict, dropout: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, K, 1032) = [HuBERT, pose delta, eye delta]; frames zeroed with probability `dropout`."""
        cond = torch.cat([batch["hubert"], batch["pose_delta"], batch["eye_delta"]], dim=-1).float()
        if dropout > 0:
            keep = torch.rand(cond.shape[:2], device=cond.device, generator=generator) >= dropout
            cond = cond * keep[..., None]
        return cond

    def region_mask(self, box: torch.Tensor, latent: int) -> torch.Tensor:
        """Per-frame boxes (B, K, 6) -> (B, 1, K, L, L) 0/1 regions at latent resolution."""
        b, k, _ = box.shape
        return box_mask(box.reshape(b * k, 6), latent).view(b, k, latent, latent)[:, None]

    def features(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            z_src = self.lfg.source_latent(batch["source"]).float()
        return self.a2v.source_features(z_src, batch["source_face_box"])

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        x0 = self.motion_targets(batch["frames"], batch["source"])
        features = self.features(batch)
        generator = self.noise_generator()
        cond = self.condition(batch, self.options.cond_dropout, generator)
        o, latent = self.options, x0.shape[-1]
        lip = self.region_mask(batch["lip_box"], latent)
        eyes = self.region_mask(batch["eye_box"], latent) if o.w_eye > 0 else None
        losses = diffusion_loss(self.schedule, lambda x_t, t: self.a2v(x_t, t, features, cond), x0,
                                lip_mask=lip, w_lip=o.w_lip, eye_mask=eyes, w_eye=o.w_eye,
                                fft_weight=o.fft_weight, generator=generator, prediction=self.a2v.config.prediction)
        losses["clip_frames"] = torch.tensor(float(x0.shape[2]))
        return losses

    @torch.no_grad()
    def sample_artifact(self, batch: dict) -> tuple[str, bytes]:
        """Rows (up to 8 frames of the first clip): data, LFG reconstruction from the target motion, and
        the LFG decode of A2V-FDM's DDIM sample for the clip's audio and pose/blink condition."""
        first = {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}
        x0 = self.motion_targets(first["frames"], first["source"])
        denoise = self.a2v.denoiser(self.features(first), self.condition(first, 0.0))
        sample = ddim_sample(self.schedule, denoise, tuple(x0.shape), steps=self.options.sample_steps,
                             generator=torch.Generator(self.device).manual_seed(0), clip=self.a2v.clip_samples).float()
        k = x0.shape[2]
        shown = torch.linspace(0, k - 1, min(8, k)).round().long()

        def decode(motion):
            flows = self.a2v.flows_from_motion(motion)
            frames = self.lfg.decode_video(first["source"], flows[:, :2], (flows[:, 2:] + 1) / 2)
            return frames[shown.to(frames.device)]

        real = first["frames"][0].transpose(0, 1)[shown.to(first["frames"].device)]
        return "clip.png", image_grid([real, decode(x0), decode(sample)])

    def export(self, directory: str | Path, extra: dict) -> list[Path]:
        """`a2v` into `directory`, plus a copy of the LFG it was trained against when `directory` has none
        (the two must be used together: the U-Net reads that LFG's latents)."""
        paths = [save_model(self.a2v, directory, "a2v", extra=extra)]
        directory, source = Path(directory), Path(self.config.lfg)
        if not (directory / "lfg.json").exists() and source.resolve() != directory.resolve():
            for suffix in (".json", ".safetensors"):
                shutil.copy2(source / f"lfg{suffix}", directory / f"lfg{suffix}")
            paths.append(directory / "lfg.safetensors")
        return paths
