"""PBNet objective (paper §3.4, appendix A.2, Eq. 11-13): pose or blink CVAE + 1-D PatchGAN.

Generator step:  L = λ_rec L_rec + λ_KL(step) L_KL + λ_GAN L_GAN
  L_rec = mean over valid frames and dims of (Δρ̂ - Δρ)^2                                   (Eq. 11)
  L_KL  = mean over valid frames and latent dims of -1/2 (1 + log σ² - μ² - σ²)
  L_GAN = BCE(D(ρ_src + Δρ̂), real)                                                         (Eq. 12)
  λ_rec = 1, λ_GAN = 0.6; λ_KL = 0 for the first quarter of training (400 of 1600 epochs), then rising
  linearly to 0.01 at the last step (A.2: "gradually increased to 0.01").
Discriminator step (before each generator step, on the same batch):
  L_D = 1/2 [BCE(D(ρ_src + Δρ), real) + BCE(D(ρ_src + Δρ̂.detach()), fake)].
All in PBNet's model units (pose min-max normalised, blink raw); padded frames are masked out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dawn.checkpoint import save_model
from dawn.data.readers import PBNET_WINDOW, pbnet_windows
from dawn.models.pbnet import PatchDiscriminator1d, PatchDiscriminatorConfig, PBNet
from dawn.config import MODELS
from dawn.train.config import TrainConfig
from dawn.train.objective import Objective, override_config

KINDS = {"pbnet_pose": "pose", "pbnet_blink": "blink"}
STATE_COLUMN = {"pose": "pose", "blink": "eyes"}  # shard column holding each kind's states


def kl_weight(step: int, total_steps: int, warmup_fraction: float = 0.25, max_weight: float = 0.01) -> float:
    """λ_KL at optimizer step `step` of `total_steps`: 0 during the first warmup_fraction of training, then
    linear from 0 to max_weight at the last step (appendix A.2)."""
    start = warmup_fraction * total_steps
    if step < start:
        return 0.0
    return max_weight * min(1.0, (step - start) / max(1.0, total_steps - 1 - start))


LATENT_SCALE_FIT_BATCHES = 4  # training batches `fit_latent_scale` compares samples with


def _motion(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much sequences move: the variance over valid frames of each state, summed over the sequences.
    x (B, T, D), mask (B, T) bool -> (D,)."""
    valid = mask[..., None].to(x.dtype)
    frames = valid.sum(1).clamp(min=1)
    mean = (x * valid).sum(1) / frames
    return (((x - mean[:, None]) ** 2 * valid).sum(1) / frames).sum(0)


@torch.no_grad()
def fit_latent_scale(pbnet: PBNet, batches: list[dict], rounds: int = 2, seed: int = 0,
                     bounds: tuple[float, float] = (0.1, 10.0)) -> float:
    """The prior scale c (h ~ N(0, c^2 I), PBNetConfig.latent_scale) at which sequences PBNet draws from the
    prior move as much as the training sequences they start from.

    For each state (yaw, pitch, ... or the eye ratios), the spread of sequences generated from the first
    frame and audio of the true windows in `batches` ("x" raw states, "audio", "mask") over the spread of
    those windows (standard deviations over valid frames, pooled over windows; the evaluation's
    pose_std_ratio), averaged over the states weighted by their share of the true variance in model units (so
    states that hardly move, like the demo corpus's scale, do not count). Starting from c = 1, c is divided
    by that ratio `rounds` times (a trained decoder's motion grows about linearly with the latent's scale, so
    two rounds land close), within `bounds`. The draws are seeded: the same model and batches give the same
    scale. Leaves config.latent_scale set to the result and the model in its mode.
    """
    was_training, dtype = pbnet.training, next(pbnet.parameters()).dtype
    pbnet.eval()
    scale = 1.0
    try:
        for _ in range(rounds):
            pbnet.config.latent_scale = scale
            generator = torch.Generator(batches[0]["x"].device).manual_seed(seed)
            true_motion = sampled_motion = 0.0
            for batch in batches:
                x, audio = batch["x"].to(dtype), batch["audio"].to(dtype)
                sample = pbnet.generate(x[:, 0], audio, generator=generator)
                true_motion = true_motion + _motion(pbnet.to_model_units(x).float(), batch["mask"])
                sampled_motion = sampled_motion + _motion(pbnet.to_model_units(sample).float(), batch["mask"])
            if not true_motion.sum() > 0:
                break
            weight = true_motion / true_motion.sum()
            ratio = float((weight * (sampled_motion / true_motion.clamp(min=1e-12)).sqrt()).sum())
            if not ratio > 0:
                break
            scale = min(max(scale / ratio, bounds[0]), bounds[1])
    finally:
        pbnet.config.latent_scale = scale
        pbnet.train(was_training)
    return scale


class PBNetObjective(Objective):
    data_columns = ("pose", "eyes", "hubert")

    @dataclass
    class Options:
        window: int = PBNET_WINDOW  # frames per training sequence
        rec_weight: float = 1.0  # λ_rec
        gan_weight: float = 0.6  # λ_GAN
        kl_max: float = 0.01  # final λ_KL
        kl_warmup_fraction: float = 0.25  # λ_KL = 0 for this share of the steps
        discriminator_lr: float | None = None  # default: the generator's lr
        # After training, set PBNetConfig.latent_scale so that sequences drawn from the prior move as much as
        # the training sequences (`fit_latent_scale`); off = the paper's N(0, I).
        fit_latent_scale: bool = False

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        self.kind = KINDS[config.model]
        self.checkpoint_name = config.model
        spec = MODELS[config.model]
        self.pbnet = PBNet(override_config(spec.preset_config(config.preset), config.model_overrides)).to(self.device)
        if config.init_from:
            from dawn.checkpoint import load_model

            self.pbnet.load_state_dict(load_model(config.init_from, config.model).state_dict())
        self.discriminator = PatchDiscriminator1d(PatchDiscriminatorConfig.preset(spec.presets[config.preset])).to(self.device)
        self.trainable = {"model": self.pbnet, "discriminator": self.discriminator}
        self.fit_batches = LATENT_SCALE_FIT_BATCHES if self.options.fit_latent_scale else 0

    def batches(self, rows: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
        column = STATE_COLUMN[self.kind]
        for batch in pbnet_windows(rows, self.config.batch_size, rng, window=self.options.window,
                                   per_row=self.config.samples_per_row):
            yield {"x": batch[column], "audio": batch["hubert"], "mask": batch["mask"]}

    def learning_rate(self, name: str) -> float:
        if name == "discriminator" and self.options.discriminator_lr is not None:
            return self.options.discriminator_lr
        return self.config.lr

    def _forward(self, batch: dict) -> tuple[dict, torch.Tensor]:
        out = self.pbnet(batch)
        valid = batch["mask"].to(out["delta"].dtype)[..., None]  # (B, T, 1)
        out["target_delta"] = out["target_delta"] * valid  # padded frames: zero, as the prediction
        return out, valid

    def _discriminate(self, delta: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.discriminator(delta, source).float()

    def generator_loss(self, out: dict, valid: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        o = self.options
        frames = valid.sum()
        rec = ((out["delta"].float() - out["target_delta"].float()) ** 2 * valid).sum() / (frames * out["delta"].shape[-1])
        mu, logvar = out["mu"].float(), out["logvar"].float()
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()) * valid).sum() / (frames * mu.shape[-1])
        fake_logits = self._discriminate(out["delta"], out["source"])
        gan = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        kl_w = kl_weight(step, self.config.steps, o.kl_warmup_fraction, o.kl_max)
        loss = o.rec_weight * rec + kl_w * kl + o.gan_weight * gan
        return {"loss": loss, "rec": rec, "kl": kl, "gan": gan, "kl_weight": torch.tensor(kl_w)}

    def discriminator_loss(self, out: dict) -> torch.Tensor:
        source = out["source"].detach()
        real = self._discriminate(out["target_delta"], source)
        fake = self._discriminate(out["delta"].detach(), source)
        return 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Generator losses of a batch (the discriminator's is in `train_step`)."""
        out, valid = self._forward(batch)
        return self.generator_loss(out, valid, step)

    def train_step(self, engines: dict, batch: dict, step: int) -> dict[str, float]:
        """Alternating updates on one batch: the discriminator on (real, detached fake), then PBNet with
        the discriminator frozen (no gradients reach its parameters)."""
        out, valid = self._forward(batch)
        d_loss = self.discriminator_loss(out)
        engines["discriminator"].backward(d_loss)
        engines["discriminator"].step()
        self.discriminator.requires_grad_(False)
        try:
            losses = self.generator_loss(out, valid, step)
            engines["model"].backward(losses["loss"])
            engines["model"].step()
        finally:
            self.discriminator.requires_grad_(True)
        return {**{k: float(v.detach()) for k, v in losses.items()}, "d_loss": float(d_loss.detach())}

    @torch.no_grad()
    def sample_artifact(self, batch: dict) -> tuple[str, bytes]:
        """PNG of the first sequence: true states vs PBNet's posterior reconstruction and a prior sample
        (z ~ N(0, I)), one panel per dimension, raw units."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        first = {k: v[:1] for k, v in batch.items()}
        length = int(first["mask"].sum())
        out = self.pbnet(first)
        reconstruction = self.pbnet.to_raw_units(out["source"][:, None] + out["delta"])[0, :length]
        sample = self.pbnet.generate(first["x"][:, 0], first["audio"][:, :length],
                                     generator=torch.Generator(self.device).manual_seed(0))[0]
        truth = first["x"][0, :length]
        names = (["yaw", "pitch", "roll", "scale", "tx", "ty"] if self.kind == "pose" else ["left eye", "right eye"])
        fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names)), sharex=True, squeeze=False)
        for i, (ax, name) in enumerate(zip(axes[:, 0], names)):
            ax.plot(truth[:, i].cpu(), label="data", color="black")
            ax.plot(reconstruction[:, i].cpu(), label="reconstruction", color="tab:blue")
            ax.plot(sample[:, i].cpu(), label="sample", color="tab:orange", alpha=0.8)
            ax.set_ylabel(name)
        axes[0, 0].legend(loc="upper right", fontsize="small")
        axes[-1, 0].set_xlabel("frame (25 fps)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        return f"{self.kind}_curves.png", buffer.getvalue()

    def fit_to_data(self, batches: list[dict]) -> dict[str, float]:
        if not self.options.fit_latent_scale:
            return {}
        self.pbnet.config.latent_scale = fit_latent_scale(self.pbnet, batches)
        return {"latent_scale": self.pbnet.config.latent_scale}

    def export(self, directory: str | Path, extra: dict) -> list[Path]:
        """PBNet as `pbnet_pose` / `pbnet_blink` (what `dawn render` loads) and its discriminator beside it."""
        return [save_model(self.pbnet, directory, self.checkpoint_name, extra=extra),
                save_model(self.discriminator, directory, f"{self.checkpoint_name}_discriminator", extra=extra)]
