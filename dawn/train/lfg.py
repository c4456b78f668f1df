"""LFG objective (paper §3.2, Eq. 5): reconstruct the driving frame from the source frame.

    loss = sum over scales s and VGG-19 layers l of  w_l * mean |VGG_l(pyr_s(x_gen)) - VGG_l(pyr_s(x_dri))|
         + w_shift  * mean |shift(x_dri) - T(shift(T^-1 x_dri))|                      (MRAA equivariance)
         + w_affine * mean |I - M M^T|,  M = A(x_dri)^-1 J_T A(T^-1 x_dri)

Perceptual loss: multi-resolution (pyramid 1, 1/2, 1/4, 1/8 of the frame; scales whose side would drop
below 32 pixels are skipped since VGG-19 pools 4 times before relu5_1) over relu1_1 ... relu5_1 of an
ImageNet VGG-19 (Johnson et al. 2016), weights 10 each as in FOMM/MRAA. The VGG-19 weights come from a
user file (a torchvision `vgg19` state dict); torchvision itself is not needed. Without a file the loss
falls back to a pixel-space multi-scale L1 on the same pyramid (`PyramidL1Loss`), and says so in the log.

Equivariance (MRAA, Siarohin et al. 2021): a random thin-plate-spline transform T (affine part
N(I, 0.05), 5x5 control points with N(0, 0.005) weights) warps the driving frame, X'(p) = X(T(p)); the
regions found on X' mapped through T must match those found on X. Region centres are compared
directly. The region affines are PCA square roots of the covariances whose singular-vector signs are
arbitrary, so the affine term compares covariances, sign-free: with M = A^-1 J A', M M^T = I.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dawn import DawnError
from dawn.data.readers import lfg_pairs
from dawn.models.lfg import LFG, AntiAliasDownsample, coordinate_grid
from dawn.config import MODELS
from dawn.train.config import TrainConfig
from dawn.train.objective import Objective, box_mask, image_grid, override_config

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision vgg19 "features" layout up to relu5_1 (index 29): conv widths, "M" = 2x2 max pool.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
VGG19_TAPS = (1, 6, 11, 20, 29)  # indices in `features` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
MIN_VGG_SIDE = 32
FALLBACK_MESSAGE = ("LFG loss: no VGG-19 weights ({reason}); using the pixel-space multi-scale L1 pyramid loss "
                    "instead of the VGG-19 perceptual loss of Eq. 5. Pass --vgg19 PATH (a torchvision vgg19 "
                    "state dict, .pth or .safetensors) for the paper's loss.")


class VGG19Features(nn.Module):
    """torchvision's `vgg19().features[:30]` (same module indices, so its state dict loads), returning the
    activations relu1_1 ... relu5_1 of an image in [0, 1] (ImageNet-normalised inside)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in VGG19_LAYOUT:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x, taps = (image - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG19_TAPS:
                taps.append(x)
        return taps

    @classmethod
    def from_file(cls, path: str | Path) -> "VGG19Features":
        """Load the `features.*` weights of a torchvision vgg19 state dict (.pth via torch.load with
        weights_only, or .safetensors); other keys (the classifier) are ignored."""
        path = Path(path)
        if not path.is_file():
            raise DawnError(f"VGG-19 weights file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or foreign files raise many error types
            raise DawnError(f"VGG-19 weights {path} cannot be read: {e}") from None
        model = cls()
        wanted = model.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise DawnError(f"VGG-19 weights {path} are not a torchvision vgg19 state dict (missing {missing[:3]})")
        model.load_state_dict({k: state[k] for k in wanted})
        return model


def pyramid_scales(image_size: int, scales: tuple[float, ...], min_side: int) -> tuple[float, ...]:
    return tuple(s for s in scales if image_size * s >= min_side)


class ImagePyramid(nn.Module):
    """Anti-aliased copies of an image at each scale (1 = the image itself)."""

    def __init__(self, scales: tuple[float, ...], channels: int = 3):
        super().__init__()
        self.scales = scales
        self.down = nn.ModuleList(nn.Identity() if s == 1 else AntiAliasDownsample(channels, s) for s in scales)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [down(image) for down in self.down]


class PerceptualLoss(nn.Module):
    """Multi-resolution VGG-19 loss (Eq. 5): sum_s sum_l w_l mean |VGG_l(pred_s) - VGG_l(target_s)|."""

    def __init__(self, vgg: VGG19Features, scales: tuple[float, ...], layer_weights: tuple[float, ...]):
        super().__init__()
        self.vgg, self.pyramid, self.layer_weights = vgg.eval().requires_grad_(False), ImagePyramid(scales), layer_weights

    def train(self, mode: bool = True):
        return super().train(False)  # the VGG stays in eval mode

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = prediction.new_zeros((), dtype=torch.float32)
        for pred, real in zip(self.pyramid(prediction), self.pyramid(target)):
            for weight, a, b in zip(self.layer_weights, self.vgg(pred), self.vgg(real)):
                total = total + weight * (a.float() - b.detach().float()).abs().mean()
        return total


class PyramidL1Loss(nn.Module):
    """Fallback without VGG weights: sum_s w * mean |pred_s - target_s| over the same image pyramid."""

    def __init__(self, scales: tuple[float, ...], weight: float):
        super().__init__()
        self.pyramid, self.weight = ImagePyramid(scales), weight

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pairs = zip(self.pyramid(prediction), self.pyramid(target))
        return sum(self.weight * (p.float() - t.float()).abs().mean() for p, t in pairs)


class RandomTPS:
    """Random affine + thin-plate-spline warp of [-1, 1] coordinates, one per batch element (MRAA/FOMM).

    T(p) = A p + b + sum_k w_k U(|p - c_k|^2),  U(r2) = r2 log(r2); c_k on a points x points grid.
    """

    def __init__(self, batch: int, sigma_affine: float, sigma_tps: float, points: int, device,
                 generator: torch.Generator | None = None):
        noise = torch.randn(batch, 2, 3, generator=generator) * sigma_affine
        self.theta = (noise + torch.eye(2, 3)).to(device)  # (B, 2, 3)
        self.control_points = coordinate_grid(points, points).view(-1, 2).to(device)  # (P, 2)
        self.control_params = (torch.randn(batch, points * points, 2, generator=generator) * sigma_tps).to(device)

    def _radial(self, coords: torch.Tensor):
        """coords (B, N, 2) -> offsets to the control points (B, N, P, 2) and r2 (B, N, P)."""
        offsets = coords[:, :, None, :] - self.control_points
        return offsets, offsets.pow(2).sum(-1)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (B, N, 2) (x, y) -> T(coords) (B, N, 2)."""
        _, r2 = self._radial(coords)
        affine = coords @ self.theta[:, :, :2].transpose(1, 2) + self.theta[:, None, :, 2]
        radial = r2 * torch.log(r2 + 1e-6)
        return affine + torch.einsum("bnp,bpi->bni", radial, self.control_params)

    def jacobian(self, coords: torch.Tensor) -> torch.Tensor:
        """dT/dp at coords (B, N, 2) -> (B, N, 2, 2) (row: output coordinate)."""
        offsets, r2 = self._radial(coords)
        du = 2 * offsets * (torch.log(r2 + 1e-6) + r2 / (r2 + 1e-6))[..., None]  # dU_k/dp (B, N, P, 2)
        return self.theta[:, None, :, :2] + torch.einsum("bpi,bnpj->bnij", self.control_params, du)

    def warp_image(self, image: torch.Tensor) -> torch.Tensor:
        """X'(p) = X(T(p)): image (B, C, H, W) sampled at the transformed pixel grid (reflection padding).
        align_corners=True matches coordinate_grid (-1 and +1 on the first and last pixel centres)."""
        b, _, h, w = image.shape
        grid = self(coordinate_grid(h, w, image.device).view(1, -1, 2).expand(b, -1, -1)).view(b, h, w, 2)
        return F.grid_sample(image, grid.to(image.dtype), padding_mode="reflection", align_corners=True)


class LFGObjective(Objective):
    checkpoint_name = "lfg"
    data_columns = ("frames", "lip_box", "eye_box")

    @dataclass
    class Options:
        scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
        perceptual_weights: tuple[float, ...] = (10.0, 10.0, 10.0, 10.0, 10.0)  # relu1_1 ... relu5_1
        pixel_weight: float = 10.0  # fallback pyramid L1, per scale
        equivariance_shift: float = 10.0
        equivariance_affine: float = 10.0
        sigma_affine: float = 0.05
        sigma_tps: float = 0.005
        points_tps: int = 5
        # training-time augmentation of each (source, driving) pair, the same for both frames (as MRAA / FOMM
        # train): a horizontal flip with this probability, and per-channel gains in 1 +- colour_jitter
        # (brightness and colour cast). Faces the LFG has not seen then still move as trained ones do.
        flip_probability: float = 0.5
        colour_jitter: float = 0.1
        # An extra L1 term over the driving frame's lip box, times this weight (0 = off, the paper's loss). The
        # mouth is ~2 % of a face crop, so the frame-wide losses hardly weigh whether it opens; the demo's
        # minutes-long runs use it (dawn/demo.py).
        lip_weight: float = 0.0
        # The same over the driving frame's eye box (0 = off): whether the lids close in a blink is a few
        # pixels of the frame (dawn/demo.py).
        eye_weight: float = 0.0

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        lfg_config = override_config(MODELS["lfg"].preset_config(config.preset), config.model_overrides)
        self.lfg = LFG(lfg_config).to(self.device)
        if config.init_from:
            from dawn.checkpoint import load_model

            self.lfg.load_state_dict(load_model(config.init_from, "lfg").state_dict())
        self.trainable = {"model": self.lfg}
        o = self.options
        size = lfg_config.image_size
        if config.vgg19 is not None and Path(config.vgg19).is_file():
            scales = pyramid_scales(size, tuple(o.scales), MIN_VGG_SIDE)
            self.reconstruction = PerceptualLoss(VGG19Features.from_file(config.vgg19), scales,
                                                 tuple(o.perceptual_weights))
            self.uses_vgg = True
        else:
            reason = "no --vgg19 path given" if config.vgg19 is None else f"file not found: {config.vgg19}"
            log.warning(FALLBACK_MESSAGE.format(reason=reason))
            self.reconstruction = PyramidL1Loss(pyramid_scales(size, tuple(o.scales), 8), o.pixel_weight)
            self.uses_vgg = False
        self.reconstruction.to(self.device)

    def batches(self, rows: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
        return lfg_pairs(rows, self.config.batch_size, rng, per_row=self.config.samples_per_row)

    def augment(self, source: torch.Tensor, driving: torch.Tensor, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Options.flip_probability / colour_jitter applied to each pair (B, 3, S, S), identically to both;
        masks of the driving frame (B, M, S, S), if given, are flipped with it. Returns (source, driving, mask)."""
        o = self.options
        b = source.shape[0]
        flip = (torch.rand(b, generator=generator) < o.flip_probability).to(source.device).view(b, 1, 1, 1)
        gain = (1 + o.colour_jitter * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)).to(source)

        def transform(x):
            return (torch.where(flip, x.flip(-1), x) * gain).clamp(0, 1)

        if mask is not None:
            mask = torch.where(flip, mask.flip(-1), mask)
        return transform(source), transform(driving), mask

    def region_masks(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"lip" / "eye": (B, 1, S, S) 0/1 mask of the driving frames' boxes} for the regions whose weight
        option (lip_weight, eye_weight) is on."""
        masks = {}
        for region, weight in (("lip", self.options.lip_weight), ("eye", self.options.eye_weight)):
            if weight <= 0:
                continue
            if f"driving_{region}_box" not in batch:
                raise DawnError(f"the LFG {region}_weight option needs the shards' {region}_box column")
            size = batch["driving"].shape[-1]
            masks[region] = box_mask(batch[f"driving_{region}_box"], size).to(batch["driving"])[:, None]
        return masks

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        source, driving, masks = batch["source"], batch["driving"], self.region_masks(batch)
        if self.lfg.training:
            flip = self.noise_generator("cpu")
            regions = list(masks)
            stacked = torch.cat([masks[r] for r in regions], 1) if regions else None
            source, driving, stacked = self.augment(source, driving, flip, stacked)
            masks = {r: stacked[:, i:i + 1] for i, r in enumerate(regions)}
        out = self.lfg(source, driving)
        reconstruction = self.reconstruction(out["prediction"], driving)
        shift, affine = self.equivariance(driving, out["driving_regions"])
        o = self.options
        loss = reconstruction + o.equivariance_shift * shift + o.equivariance_affine * affine
        losses = {"loss": loss, "reconstruction": reconstruction, "equivariance_shift": shift,
                  "equivariance_affine": affine}
        for region, mask in masks.items():
            # mean |x_gen - x_dri| over the boxes' pixels (frames without a face have empty boxes)
            error = ((out["prediction"] - driving).abs() * mask).sum() / (3 * mask.sum()).clamp_min(1)
            losses[f"{region}_l1"] = error
            losses["loss"] = losses["loss"] + getattr(o, f"{region}_weight") * error
        return losses

    def equivariance(self, driving: torch.Tensor, regions: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """MRAA equivariance of the region predictor under a random TPS warp of the driving frame."""
        o = self.options
        transform = RandomTPS(driving.shape[0], o.sigma_affine, o.sigma_tps, o.points_tps, driving.device,
                              generator=self.noise_generator("cpu"))
        warped_regions = self.lfg.region_predictor(transform.warp_image(driving))
        mapped_shift = transform(warped_regions["shift"])
        shift_loss = (regions["shift"] - mapped_shift).abs().mean()
        if "affine" not in regions:
            return shift_loss, shift_loss.new_zeros(())
        jacobian = transform.jacobian(warped_regions["shift"])  # (B, K, 2, 2)
        m = torch.linalg.inv(regions["affine"].float()) @ jacobian @ warped_regions["affine"].float()
        eye = torch.eye(2, device=m.device)
        return shift_loss, (eye - m @ m.transpose(-1, -2)).abs().mean()

    @torch.no_grad()
    def sample_artifact(self, batch: dict) -> tuple[str, bytes]:
        """Rows: source, driving, reconstruction, source warped by the flow (up to 8 pairs)."""
        out = self.lfg(batch["source"], batch["driving"])
        return "reconstruction.png", image_grid([batch["source"], batch["driving"], out["prediction"],
                                                  out["deformed"]])
