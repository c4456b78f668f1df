"""Latent Flow Generator (LFG): paper §3.2, ARCHITECTURE.md §2 (layers) and §6 (numerics).

An MRAA-style motion model (Siarohin et al., 2021) in three networks:

- `region_predictor`: image -> K soft regions, each summarised by its centre (`shift`) and, with PCA,
  a 2x2 `affine` square root of its covariance (§2.2).
- `bg_predictor`: (source, driving) -> one 3x3 background affine matrix (§2.3).
- `generator`: the image encoder E and decoder D (Johnson et al. style: 7x7 stem, down blocks, residual
  bottleneck, up blocks, 7x7 to RGB) plus the pixelwise `flow_predictor` P, which turns the regions into a
  dense flow f (an absolute sampling grid, last axis (x, y), in [-1, 1]) and an occlusion map m (§2.4, §2.5).

Layouts: images (B, 3, S, S) in [0, 1]; latent side L = S/4; flow (N, L, L, 2); occlusion (N, 1, L, L).
Paper eq. (4): x_gen = D(A(z_src, f) * m), with the warp-and-blend applied at every decoder scale.

Numerics kept from the reference (§6): `coordinate_grid` puts -1 and +1 on the centres of the first and
last pixels while `grid_sample` / bilinear resizing use align_corners=False; up-sampling is legacy nearest;
the PCA's SVD runs on CPU in float32 and every 2x2 inverse is taken in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LFGConfig:
    image_size: int = 128  # S; frames are S x S RGB
    num_channels: int = 3
    num_regions: int = 10  # K
    scale_factor: float = 0.25  # region and flow predictors look at the image downsampled by this factor
    # generator: image encoder / decoder (§2.5)
    generator_channels: int = 64  # stem width; doubles per down block
    generator_max_channels: int = 512
    generator_down_blocks: int = 2  # latent side = S / 2**generator_down_blocks
    generator_res_blocks: int = 6
    # pixelwise flow predictor hourglass (§2.4)
    flow_channels: int = 64
    flow_max_channels: int = 1024
    flow_blocks: int = 5
    # region predictor hourglass (§2.2)
    region_channels: int = 32
    region_max_channels: int = 1024
    region_blocks: int = 5
    region_temperature: float = 0.1  # softmax temperature of the region heatmaps
    pca: bool = True  # PCA affine per region; False: translation-only regions, isotropic Gaussians
    # background predictor encoder (§2.3)
    bg_channels: int = 32
    bg_max_channels: int = 1024
    bg_blocks: int = 5
    revert_axis_swap: bool = True  # multiply each region affine by the sign of its [0, 0] entry (§2.4)

    @classmethod
    def preset(cls, name: str) -> "LFGConfig":
        """"tiny" (64x64, CPU tests), "hdtf128" / "hdtf256" (the released LFG_128 / LFG_256 shapes)."""
        if name == "tiny":
            return cls(
                image_size=64,
                generator_channels=16, generator_max_channels=64, generator_res_blocks=2,
                flow_channels=16, flow_max_channels=64, flow_blocks=3,
                region_channels=16, region_max_channels=64, region_blocks=3,
                bg_channels=16, bg_max_channels=64, bg_blocks=3,
            )  # fmt: skip
        if name in ("hdtf128", "hdtf256"):
            return cls(image_size=int(name[4:]))
        raise ValueError(f"unknown LFG preset {name!r} (tiny, hdtf128, hdtf256)")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2**self.generator_down_blocks

    @property
    def latent_channels(self) -> int:
        """Channels of the source latent z_src (256 at hdtf; A2V-FDM's `source_channels` must match)."""
        return min(self.generator_max_channels, self.generator_channels * 2**self.generator_down_blocks)


# ---------------------------------------------------------------------------------------------------
# Building blocks (§2.1). Every norm is BatchNorm2d (the reference's SyncBatchNorm computes the same).


class ConvNormReLU(nn.Module):
    """conv(k x k, same padding) -> BatchNorm -> ReLU (reference SameBlock2d)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class DownBlock(ConvNormReLU):
    """conv3x3 -> BN -> ReLU -> 2x2 average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(super().forward(x), 2)


class UpBlock(ConvNormReLU):
    """legacy nearest x2 up-sampling -> conv3x3 -> BN -> ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=2))


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(h)))


def down_path(in_channels: int, base: int, num_blocks: int, max_channels: int) -> nn.ModuleList:
    """Down blocks in -> min(max, base*2) -> min(max, base*4) -> ... (the reference Encoder)."""
    width = [min(max_channels, base * 2**i) for i in range(num_blocks + 1)]
    return nn.ModuleList(DownBlock(in_channels if i == 0 else width[i], width[i + 1]) for i in range(num_blocks))


class Hourglass(nn.Module):
    """U-Net: `down` blocks, then `up` blocks each followed by concat [upsampled, skip].

    (B, in, H, W) -> (B, base + in, H, W); H and W must be divisible by 2**num_blocks.
    """

    def __init__(self, in_channels: int, base: int, num_blocks: int, max_channels: int):
        super().__init__()
        width = [min(max_channels, base * 2**i) for i in range(num_blocks + 1)]
        self.down = down_path(in_channels, base, num_blocks, max_channels)
        # The deepest up block sees only the bottom map; the others see [up, skip] (twice the width).
        self.up = nn.ModuleList(
            UpBlock((1 if i == num_blocks - 1 else 2) * width[i + 1], width[i]) for i in reversed(range(num_blocks))
        )
        self.out_channels = base + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for block in self.down:
            skips.append(block(skips[-1]))
        out = skips.pop()
        for block in self.up:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return out


class AntiAliasDownsample(nn.Module):
    """Gaussian blur (sigma = (1/scale - 1)/2, zero padding) then keep every (1/scale)-th pixel from 0.

    The kernel is a fixed buffer, kept in the state dict because the released checkpoints store it.
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        self.stride = int(1 / scale)
        self.pad = size // 2
        pos = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-(pos**2) / (2 * sigma**2))
        kernel = g[:, None] * g[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("kernel", kernel.expand(channels, 1, size, size).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.pad(x, (self.pad,) * 4), self.kernel, groups=x.shape[1])
        return x[:, :, :: self.stride, :: self.stride]


def coordinate_grid(h: int, w: int, device=None) -> torch.Tensor:
    """(h, w, 2) float32 grid, last axis (x, y), with -1 and +1 at the first and last pixel centres."""
    x = 2 * (torch.arange(w, device=device, dtype=torch.float32) / (w - 1)) - 1
    y = 2 * (torch.arange(h, device=device, dtype=torch.float32) / (h - 1)) - 1
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a (N, C, h, w) map; identity when already that size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear")


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample x (N, C, H, W) at the grid flow (N, h, w, 2) resized to (H, W) as a 2-channel image.

    grid_sample: bilinear, zero padding, align_corners=False (§2.5 warping helper).
    """
    grid = resize_bilinear(flow.permute(0, 3, 1, 2), x.shape[-2:]).permute(0, 2, 3, 1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------------------------------------
# The three networks.


class RegionPredictor(nn.Module):
    """Image (B, 3, S, S) -> K soft regions and their parameters (§2.2).

    Returns a dict: heatmap (B, K, h, w) (softmax over positions), shift (B, K, 2) (region centre, (x, y));
    with PCA also covar (B, K, 2, 2), affine (B, K, 2, 2) = U diag(sqrt(s)), u and d (B*K, 2, 2).
    """

    def __init__(self, c: LFGConfig):
        super().__init__()
        self.temperature, self.pca = c.region_temperature, c.pca
        self.downsample = AntiAliasDownsample(c.num_channels, c.scale_factor)
        self.hourglass = Hourglass(c.num_channels, c.region_channels, c.region_blocks, c.region_max_channels)
        self.region_logits = nn.Conv2d(self.hourglass.out_channels, c.num_regions, 7, padding=3)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.region_logits(self.hourglass(self.downsample(image))).float()
        b, k, h, w = logits.shape
        heatmap = F.softmax(logits.view(b, k, h * w) / self.temperature, dim=2).view(b, k, h, w)
        grid = coordinate_grid(h, w, image.device)
        shift = torch.einsum("bkhw,hwi->bki", heatmap, grid)
        regions = {"heatmap": heatmap, "shift": shift}
        if self.pca:
            centred = grid - shift[:, :, None, None, :]  # (B, K, h, w, 2)
            covar = torch.einsum("bkhw,bkhwi,bkhwj->bkij", heatmap, centred, centred)
            # LAPACK SVD on CPU in float32, as the reference: the singular vectors' signs must match it (§6).
            u, s, _ = torch.linalg.svd(covar.reshape(-1, 2, 2).cpu())
            u, d = u.to(covar.device), torch.diag_embed(s.sqrt()).to(covar.device)
            regions.update(covar=covar, affine=(u @ d).view(b, k, 2, 2), u=u, d=d)
        return regions


class BackgroundPredictor(nn.Module):
    """(source, driving) images (B, 3, S, S) each -> (B, 3, 3) background affine matrix (§2.3)."""

    def __init__(self, c: LFGConfig):
        super().__init__()
        self.encoder = down_path(2 * c.num_channels, c.bg_channels, c.bg_blocks, c.bg_max_channels)
        self.affine_head = nn.Linear(min(c.bg_max_channels, c.bg_channels * 2**c.bg_blocks), 6)
        # Starts at the identity transform.
        nn.init.zeros_(self.affine_head.weight)
        with torch.no_grad():
            self.affine_head.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([source, driving], dim=1)
        for block in self.encoder:
            x = block(x)
        top = self.affine_head(x.mean(dim=(2, 3))).view(-1, 2, 3).float()
        bottom = torch.tensor([0.0, 0.0, 1.0], device=top.device).expand(top.shape[0], 1, 3)
        return torch.cat([top, bottom], dim=1)


class FlowPredictor(nn.Module):
    """Regions of source and driving + background matrix -> dense flow and occlusion (§2.4).

    Works at scale_factor x S (= L): K+1 candidate motions (background first) each warp the downsampled
    source; an hourglass over [heatmap difference, warped source] per motion predicts per-pixel softmax
    weights that mix the motions into one flow.
    """

    def __init__(self, c: LFGConfig):
        super().__init__()
        self.pca, self.revert_axis_swap = c.pca, c.revert_axis_swap
        motions = c.num_regions + 1
        self.downsample = AntiAliasDownsample(c.num_channels, c.scale_factor)
        in_channels = motions * (c.num_channels + 1)  # per motion: [heatmap, warped RGB]
        self.hourglass = Hourglass(in_channels, c.flow_channels, c.flow_blocks, c.flow_max_channels)
        self.motion_mask = nn.Conv2d(self.hourglass.out_channels, motions, 7, padding=3)
        self.occlusion = nn.Conv2d(self.hourglass.out_channels, 1, 7, padding=3)

    def region_gaussians(self, regions: dict, grid: torch.Tensor) -> torch.Tensor:
        """exp(-0.5 (p - mu)^T Sigma^-1 (p - mu)) per region on the grid -> (B, K, h, w)."""
        centred = grid - regions["shift"][:, :, None, None, :]
        if self.pca:
            inverse = torch.linalg.inv(regions["covar"].float())
            mahalanobis = torch.einsum("bkhwi,bkij,bkhwj->bkhw", centred, inverse, centred)
        else:
            mahalanobis = centred.pow(2).sum(-1) / 0.01  # isotropic region variance
        return torch.exp(-0.5 * mahalanobis)

    def sparse_motions(self, source: dict, driving: dict, bg_params: torch.Tensor, grid: torch.Tensor):
        """(B, K+1, h, w, 2) sampling grids: background first, then p -> A_k (p - mu_drv) + mu_src."""
        centred = grid - driving["shift"][:, :, None, None, :]
        if self.pca:
            affine = source["affine"] @ torch.linalg.inv(driving["affine"].float())
            if self.revert_axis_swap:
                affine = affine * torch.sign(affine[:, :, 0:1, 0:1])
            centred = torch.einsum("bkij,bkhwj->bkhwi", affine, centred)
        regions = centred + source["shift"][:, :, None, None, :]
        homogeneous = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1)
        background = torch.einsum("bij,hwj->bhwi", bg_params.float(), homogeneous)
        background = background[..., :2] / background[..., 2:3]
        return torch.cat([background[:, None], regions], dim=1)

    def forward(self, source_image: torch.Tensor, source_regions: dict, driving_regions: dict, bg_params: torch.Tensor):
        """source_image (B, 3, S, S), regions of both frames, bg_params (B, 3, 3)
        -> flow (B, h, w, 2), occlusion (B, 1, h, w) with h = w = scale_factor * S."""
        small = self.downsample(source_image)
        b, c, h, w = small.shape
        grid = coordinate_grid(h, w, small.device)
        heat = self.region_gaussians(driving_regions, grid) - self.region_gaussians(source_regions, grid)
        heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1)  # background: no heatmap
        motions = self.sparse_motions(source_regions, driving_regions, bg_params, grid)
        m = motions.shape[1]
        warped = F.grid_sample(
            small[:, None].expand(b, m, c, h, w).reshape(b * m, c, h, w),
            motions.reshape(b * m, h, w, 2).to(small.dtype),
            mode="bilinear", padding_mode="zeros", align_corners=False,
        ).view(b, m, c, h, w)  # fmt: skip
        features = torch.cat([heat[:, :, None].to(warped.dtype), warped], dim=2).view(b, -1, h, w)
        features = self.hourglass(features)
        weights = F.softmax(self.motion_mask(features), dim=1)
        flow = torch.einsum("bkhw,bkhwi->bhwi", weights.float(), motions)
        return flow, torch.sigmoid(self.occlusion(features))


class Generator(nn.Module):
    """Image encoder E / decoder D with per-scale warp-and-blend, and the flow predictor P (§2.5)."""

    def __init__(self, c: LFGConfig):
        super().__init__()
        n = c.generator_down_blocks
        width = [min(c.generator_max_channels, c.generator_channels * 2**i) for i in range(n + 1)]
        self.stem = ConvNormReLU(c.num_channels, width[0], kernel_size=7)
        self.down_blocks = nn.ModuleList(DownBlock(width[i], width[i + 1]) for i in range(n))
        self.bottleneck = nn.Sequential(*(ResBlock(width[-1]) for _ in range(c.generator_res_blocks)))
        self.up_blocks = nn.ModuleList(UpBlock(width[i + 1], width[i]) for i in reversed(range(n)))
        self.to_rgb = nn.Conv2d(width[0], c.num_channels, 7, padding=3)
        self.flow_predictor = FlowPredictor(c)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image (B, 3, S, S) -> [stem (B, C0, S, S), down_1, ..., latent z_src (B, C, L, L)]."""
        features = [self.stem(image)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features

    def decode(self, features: list[torch.Tensor], image: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor):
        """Encoder outputs and source image (batch N, or 1 broadcast over the frames), flow (N, L, L, 2),
        occlusion (N, 1, L, L) -> frames (N, 3, S, S).

        At each scale: warped(skip) * m + previous * (1 - m) (eq. 4; ARCHITECTURE.md §2.5 "apply").
        """
        n = flow.shape[0]
        occlusion_at = {}  # occlusion resized to each feature size, computed once per size

        def warped(x):
            return warp(x.expand(n, -1, -1, -1), flow)

        def blend(warped_skip, previous=None):
            size = tuple(warped_skip.shape[-2:])
            if size not in occlusion_at:
                occlusion_at[size] = resize_bilinear(occlusion, size)
            m = occlusion_at[size]
            return warped_skip * m if previous is None else warped_skip * m + previous * (1 - m)

        warped_latent = warped(features[-1])  # used twice: bottleneck input and first skip
        out = self.bottleneck(blend(warped_latent))
        for i, block in enumerate(self.up_blocks):
            out = block(blend(warped_latent if i == 0 else warped(features[-1 - i]), out))
        out = torch.sigmoid(self.to_rgb(blend(warped(features[0]), out)))
        return blend(warped(image), out)


@dataclass
class SourceFeatures:
    """Encoder outputs of one source image, from full resolution (stem) down to the latent z_src."""

    pyramid: list[torch.Tensor]

    @property
    def latent(self) -> torch.Tensor:
        return self.pyramid[-1]


class LFG(nn.Module):
    """Latent flow generator: generator (E, D, P), region_predictor, bg_predictor (paper §3.2)."""

    config_class = LFGConfig

    def __init__(self, config: LFGConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.region_predictor = RegionPredictor(config)
        self.bg_predictor = BackgroundPredictor(config)

    def motion(self, source: torch.Tensor, driving: torch.Tensor):
        """Images (B, 3, S, S) -> (source regions, driving regions, bg params (B, 3, 3))."""
        return self.region_predictor(source), self.region_predictor(driving), self.bg_predictor(source, driving)

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> dict:
        """Reconstruct driving (B, 3, S, S) from source (B, 3, S, S), as in LFG training (eq. 3-5).

        Returns prediction (B, 3, S, S), deformed (source warped by the flow, (B, 3, S, S)),
        flow (B, L, L, 2), occlusion (B, 1, L, L), source_latent (B, C, L, L), source_regions,
        driving_regions (RegionPredictor dicts) and bg_params (B, 3, 3).
        """
        source_regions, driving_regions, bg_params = self.motion(source, driving)
        flow, occlusion = self.generator.flow_predictor(source, source_regions, driving_regions, bg_params)
        pyramid = self.generator.encode(source)
        return {
            "prediction": self.generator.decode(pyramid, source, flow, occlusion),
            "deformed": warp(source, flow),
            "flow": flow,
            "occlusion": occlusion,
            "source_latent": pyramid[-1],
            "source_regions": source_regions,
            "driving_regions": driving_regions,
            "bg_params": bg_params,
        }

    def flow_targets(self, source: torch.Tensor, driving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A2V-FDM training targets: flow (B, L, L, 2) and occlusion (B, 1, L, L) of driving w.r.t. source."""
        return self.generator.flow_predictor(source, *self.motion(source, driving))

    def source_latent(self, source: torch.Tensor) -> torch.Tensor:
        """z_src (B, C, L, L): stem + down blocks of the source image (reference compute_fea)."""
        return self.generator.encode(source)[-1]

    def encode_source(self, source: torch.Tensor) -> SourceFeatures:
        """Everything `decode` needs from the source image (B, 3, S, S), computed once."""
        return SourceFeatures(self.generator.encode(source))

    def decode(self, source_features: SourceFeatures, source: torch.Tensor, flow: torch.Tensor,
               occlusion: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Frames (N, 3, S, S) from flow (N, L, L, 2) and occlusion (N, 1, L, L) in [0, 1].

        The source (features and image) has batch N, or batch 1 and is broadcast over the N frames.
        """
        return self.generator.decode(source_features.pyramid, source, flow, occlusion)

    @torch.no_grad()
    def decode_video(self, source: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor, batch_size: int = 32):
        """source (1, 3, S, S), flow (1, 2, T, L, L) (channel 0 x, 1 y), occlusion (1, 1, T, L, L) in [0, 1]
        -> frames (T, 3, S, S). The source is encoded once; frames are decoded batch_size at a time."""
        if source.shape[0] != 1 or flow.shape[:2] != (1, 2) or occlusion.shape[:2] != (1, 1):
            raise ValueError(
                f"decode_video wants source (1,3,S,S), flow (1,2,T,L,L), occlusion (1,1,T,L,L); got "
                f"{tuple(source.shape)}, {tuple(flow.shape)}, {tuple(occlusion.shape)}"
            )
        features = self.encode_source(source)
        grids = flow[0].permute(1, 2, 3, 0)  # (T, L, L, 2)
        masks = occlusion[0].transpose(0, 1)  # (T, 1, L, L)
        batches = range(0, grids.shape[0], batch_size)
        return torch.cat([self.decode(features, source, grids[i : i + batch_size], masks[i : i + batch_size])
                          for i in batches])  # fmt: skip
