"""What the training loop needs from a model: the `Objective` interface shared by LFG, PBNet and A2V-FDM.

An objective builds its networks (trainable ones in `trainable`, one DeepSpeed engine each; frozen helpers
such as VGG-19 or the teacher LFG are plain attributes), turns decoded shard rows into batches, computes
the loss dict of a batch, makes a sample artifact for MLflow and exports the trained weights as a dawn
checkpoint. It knows nothing of Ray or DeepSpeed: `train_step` only calls `.backward(loss)` and `.step()`
on whatever "engine" objects it is given, so plain torch (`TorchEngine`) drives it in unit tests and
benchmarks exactly as DeepSpeed engines do in `dawn.train.loop`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from dawn import DawnError
from dawn.checkpoint import save_model
from dawn.train.config import TrainConfig


class Objective:
    """Base class; subclasses set `checkpoint_name`, `data_columns`, an `Options` dataclass (loss weights
    etc., filled from TrainConfig.objective_options), build `trainable` and implement `batches`, `loss`
    and `sample_artifact`."""

    @dataclasses.dataclass
    class Options:
        pass

    checkpoint_name: str  # name of the exported dawn checkpoint (lfg, pbnet_pose, pbnet_blink, a2v)
    fit_batches: int = 0  # training batches `fit_to_data` sees after the last step (0: nothing is fitted)
    data_columns: tuple[str, ...]  # array columns of the shards this objective reads

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = torch.device(device)
        self.options = self.parse_options(config)
        self.trainable: dict[str, nn.Module] = {}

    @classmethod
    def parse_options(cls, config: TrainConfig):
        """Options from config.objective_options; DawnError naming unknown keys."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(config.objective_options) - known)
        if unknown:
            raise DawnError(f"unknown {config.model} objective options {unknown} (known: {sorted(known)})")
        return cls.Options(**config.objective_options)

    # -- data --------------------------------------------------------------------------------------------
    def batches(self, rows: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
        """Decoded shard rows -> training batches (dicts of CPU tensors), one pass over `rows`."""
        raise NotImplementedError

    def noise_generator(self, device: torch.device | str | None = None) -> torch.Generator | None:
        """Random source of the loss's own draws (diffusion step and noise, TPS warp, condition dropout):
        None (the global RNG) normally; with overfit_batches a generator reseeded on every call, so a
        fixed batch also gets fixed noise and its loss can only go down by learning."""
        if not self.config.overfit_batches:
            return None
        return torch.Generator(device or self.device).manual_seed(self.config.seed)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # -- optimisation ------------------------------------------------------------------------------------
    def param_groups(self, name: str) -> list[dict]:
        """Optimizer parameter groups of trainable network `name`: weight decay on matrices and kernels
        only (not on biases, norms and 1-d gains)."""
        params = [p for p in self.trainable[name].parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def learning_rate(self, name: str) -> float:
        """Peak learning rate of trainable network `name` (the schedule scales it)."""
        return self.config.lr

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Scalar losses of a batch (on the device); "loss" is the one back-propagated."""
        raise NotImplementedError

    def train_step(self, engines: dict, batch: dict, step: int) -> dict[str, float]:
        """One micro-step: forward, backward, step (the engine applies the update at the accumulation
        boundary). Returns the batch's scalar losses as floats. Objectives with several networks
        (PBNet + discriminator) override this."""
        losses = self.loss(batch, step)
        engines["model"].backward(losses["loss"])
        engines["model"].step()
        return {k: float(v.detach()) for k, v in losses.items()}

    # -- outputs -----------------------------------------------------------------------------------------
    def fit_to_data(self, batches: list[dict]) -> dict[str, float]:
        """After the last step, before export: set what is fitted to `fit_batches` training batches rather
        than learnt by gradient (PBNet's latent scale). Returns the fitted values, which are logged."""
        return {}

    @torch.no_grad()
    def sample_artifact(self, batch: dict) -> tuple[str, bytes]:
        """(file name, PNG bytes) showing what the model does on a batch, for MLflow."""
        raise NotImplementedError

    def export(self, directory: str | Path, extra: dict) -> list[Path]:
        """Write the trained network as a dawn checkpoint (`checkpoint_name`) into `directory`."""
        return [save_model(self.trainable["model"], directory, self.checkpoint_name, extra=extra)]

    def train(self, mode: bool = True) -> None:
        for module in self.trainable.values():
            module.train(mode)


class TorchEngine:
    """The two DeepSpeed engine calls an objective uses, over a plain torch optimizer (tests, benchmarks)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0):
        self.module, self.optimizer, self.grad_clip = module, optimizer, grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def torch_engines(objective: Objective, lr: float | None = None) -> dict[str, TorchEngine]:
    """AdamW + `TorchEngine` for every trainable network of `objective` (no DeepSpeed)."""
    config = objective.config
    return {name: TorchEngine(module, torch.optim.AdamW(objective.param_groups(name),
                                                        lr=lr or objective.learning_rate(name),
                                                        betas=config.betas), config.grad_clip)
            for name, module in objective.trainable.items()}


def box_mask(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Boxes (N, 6) [x_min, x_max, y_min, y_max, H, W] in pixels -> (N, size, size) 0/1 masks.

    x scaled by size/W, y by size/H; left/top truncated, right/bottom = trunc(value + 1), both inclusive
    (the face-mask rule of ARCHITECTURE.md §3 step 2, with the sides the right way round, §9.2). An all-zero box
    (no face found in that frame) gives an empty mask.
    """
    x_min, x_max, y_min, y_max, h, w = boxes.double().unbind(-1)
    left, right = (x_min * size / w).trunc(), (x_max * size / w + 1).trunc()
    top, bottom = (y_min * size / h).trunc(), (y_max * size / h + 1).trunc()
    idx = torch.arange(size, device=boxes.device, dtype=torch.float64)
    found = ((h > 0) & (w > 0))[:, None]  # all-zero boxes: empty masks
    rows = (idx >= top[:, None]) & (idx <= bottom[:, None]) & found
    cols = (idx >= left[:, None]) & (idx <= right[:, None])
    return (rows[:, :, None] & cols[:, None, :]).float()


def override_config(config, overrides: dict):
    """A network config dataclass with some fields replaced (TrainConfig.model_overrides)."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise DawnError(f"model_overrides has fields {unknown} that {type(config).__name__} does not have")
    return dataclasses.replace(config, **overrides)


def image_grid(rows: list[torch.Tensor], max_columns: int = 8) -> bytes:
    """PNG bytes of a grid: each entry of `rows` is a (N, 3, H, W) float [0, 1] batch shown as one row."""
    strips = [torch.cat(list(images[:max_columns].float().clamp(0, 1).cpu()), dim=2) for images in rows]
    width = max(s.shape[2] for s in strips)
    strips = [torch.nn.functional.pad(s, (0, width - s.shape[2])) for s in strips]
    pixels = (torch.cat(strips, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ok, png = cv2.imencode(".png", pixels[:, :, ::-1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
