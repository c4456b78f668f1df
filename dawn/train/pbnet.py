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

    def export(self, directory: str | Path, extra: dict) -> list[Path]:
        """PBNet as `pbnet_pose` / `pbnet_blink` (what `dawn render` loads) and its discriminator beside it."""
        return [save_model(self.pbnet, directory, self.checkpoint_name, extra=extra),
                save_model(self.discriminator, directory, f"{self.checkpoint_name}_discriminator", extra=extra)]
