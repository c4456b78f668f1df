"""The model registry and the constants every part of dawn shares.

Registry (torchtitan-style): for each of the four networks a `ModelSpec` names its config dataclass, the
network config preset behind each dawn preset, its module, its training objective and its official-checkpoint
adapter. Checkpoints (`dawn.checkpoint`), training (`dawn.train`), `dawn init-checkpoints`, `dawn models` and
the benchmarks look models up here; nothing else lists them. Entries are "module:attribute" strings resolved on
use, so importing this module imports no network code.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

from dawn import DawnError

# ---- media -------------------------------------------------------------------------------------------
FPS = 25  # video frames per second, everywhere
SAMPLE_RATE = 16_000  # decoded speech: 16 kHz mono
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples = one 40 ms video frame

# ---- motion states (paper §3.3-3.4) -------------------------------------------------------------------
# Pose is 6-d: yaw, pitch, roll (degrees), scale, tx, ty (pixels); blink is 2 eye aspect ratios (left, right).
POSE_DIM = 6
BLINK_DIM = 2
# PBNet's pose min-max normalisation (§5.3); blink is used unnormalised.
POSE_MIN = (-90.0, -90.0, -90.0, 0.0, 0.0, 0.0)
POSE_MAX = (90.0, 90.0, 90.0, 1.0, 720.0, 1080.0)

# ---- the registry -------------------------------------------------------------------------------------
PRESETS = ("tiny", "hdtf128", "hdtf256")  # dawn presets: four networks that fit together


def resolve(target: str):
    """'module:attribute' -> the attribute."""
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the checkpoint name (<name>.safetensors / <name>.json) and `dawn train` model
    config: str  # its config dataclass
    module: str  # its nn.Module (built from a config)
    objective: str  # its training objective (dawn.train)
    adapter: str  # loads the officially released weights: adapter(path) -> module
    presets: dict  # dawn preset -> the config's own preset name
    adapter_args: tuple = ()  # the adapter's arguments after the path
    companions: tuple = ()  # other modules its checkpoints may hold (the PBNet discriminator)

    def config_class(self):
        return resolve(self.config)

    def module_class(self):
        return resolve(self.module)

    def objective_class(self):
        return resolve(self.objective)

    def load_official(self, path):
        """The module with the officially released weights at `path` (through the state-dict adapter)."""
        return resolve(self.adapter)(path, *self.adapter_args)

    def preset_config(self, preset: str, **changes):
        """The config of dawn preset `preset`, with `changes` applied."""
        if preset not in self.presets:
            raise DawnError(f"unknown preset {preset!r} (choose from {', '.join(self.presets)})")
        config = self.config_class().preset(self.presets[preset])
        return dataclasses.replace(config, **changes) if changes else config


_SAME = {preset: preset for preset in PRESETS}
MODELS = {
    "lfg": ModelSpec("lfg", "dawn.models.lfg:LFGConfig", "dawn.models.lfg:LFG", "dawn.train.lfg:LFGObjective",
                     "dawn.adapters.lfg:load_official_lfg", _SAME),
    "a2v": ModelSpec("a2v", "dawn.models.unet3d:A2VConfig", "dawn.models.unet3d:A2VFDM",
                     "dawn.train.a2v:A2VObjective", "dawn.adapters.a2v:load_official_a2v", _SAME),
    **{f"pbnet_{kind}": ModelSpec(f"pbnet_{kind}", "dawn.models.pbnet:PBNetConfig", "dawn.models.pbnet:PBNet",
                                  "dawn.train.pbnet:PBNetObjective", "dawn.adapters.pbnet:load_official_pbnet",
                                  {"tiny": f"tiny-{kind}", "hdtf128": kind, "hdtf256": kind}, adapter_args=(kind,),
                                  companions=("dawn.models.pbnet:PatchDiscriminator1d",))
       for kind in ("pose", "blink")},
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise DawnError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    return MODELS[name]


def checkpoint_classes() -> dict[str, str]:
    """Class name -> 'module:Class' of every module a checkpoint may hold (nothing else is ever built)."""
    targets = [t for spec in MODELS.values() for t in (spec.module, *spec.companions)]
    return {t.split(":")[1]: t for t in targets}


def preset_configs(preset: str) -> dict:
    """The four network configs of a dawn preset, made to fit together: A2V-FDM reads the LFG's latent."""
    configs = {name: spec.preset_config(preset) for name, spec in MODELS.items()}
    lfg = configs["lfg"]
    configs["a2v"] = dataclasses.replace(configs["a2v"], image_size=lfg.image_size,
                                         source_channels=lfg.latent_channels)
    return configs


def build_models(preset: str, seed: int = 0, device=None) -> dict:
    """Randomly initialised networks of a preset (seeded), by checkpoint name. device "meta" builds them
    without memory (parameter and FLOP counts)."""
    import torch

    torch.manual_seed(seed)
    models = {}
    for name, config in preset_configs(preset).items():
        with torch.device(device or "cpu"):
            models[name] = MODELS[name].module_class()(config)
    return models
