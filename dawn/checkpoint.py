"""dawn checkpoints: a directory with `<name>.safetensors` + `<name>.json` per model; loading never unpickles.

    ckpt/
      lfg.safetensors          lfg.json          (LFG: generator + region + background predictors)
      a2v.safetensors          a2v.json          (A2V-FDM U-Net + face-mask encoder)
      pbnet_pose.safetensors   pbnet_pose.json
      pbnet_blink.safetensors  pbnet_blink.json
      hubert/                                    (optional: a transformers HubertModel folder)

The JSON holds {"class": "<registered model name>", "config": {...dataclass fields...}, "dawn_version"}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dawn import DawnError, __version__
from dawn.config import checkpoint_classes, resolve

# The registry's classes (dawn.config): only these can be built from a checkpoint's JSON.
MODEL_CLASSES = checkpoint_classes()
# Config fields older checkpoints may hold that no longer exist; ignored on load.
RETIRED_FIELDS = {"A2VFDM": ("reference_mode",)}


def _resolve(class_name: str):
    if class_name not in MODEL_CLASSES:
        raise DawnError(f"unknown model class {class_name!r} (known: {sorted(MODEL_CLASSES)})")
    return resolve(MODEL_CLASSES[class_name])


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path) then rename onto `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: torch.nn.Module, directory: str | Path, name: str, extra: dict | None = None) -> Path:
    """Write `name`.safetensors and `name`.json for a model that has a dataclass `.config`."""
    directory = Path(directory)
    class_name = type(model).__name__
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"{class_name} is not a registered checkpoint class")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"class": class_name, "config": dataclasses.asdict(model.config), "dawn_version": __version__}
    if extra:
        meta.update(extra)
    atomic_write_bytes(directory / f"{name}.safetensors", lambda p: save_file(state, p))
    atomic_write_bytes(directory / f"{name}.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return directory / f"{name}.safetensors"


def load_model(directory: str | Path, name: str, map_location: str = "cpu") -> torch.nn.Module:
    """Build the model from `name`.json and load `name`.safetensors into it (strict)."""
    directory = Path(directory)
    meta_path, weights_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise DawnError(f"checkpoint file missing: {p}")
    try:
        meta = json.loads(meta_path.read_text())
        cls = _resolve(meta["class"])
        fields = {k: v for k, v in meta["config"].items() if k not in RETIRED_FIELDS.get(meta["class"], ())}
        config = cls.config_class(**fields)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DawnError(f"checkpoint config {meta_path} is not a dawn model config: {e}") from None
    model = cls(config)
    try:
        state = load_file(str(weights_path), device=map_location)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise DawnError(f"checkpoint weights {weights_path} cannot be read: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DawnError(
            f"checkpoint {weights_path} does not match its config {meta_path}: "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in model.state_dict().items() if v.shape != state[k].shape]
    if bad:
        raise DawnError(f"checkpoint {weights_path} has wrong shapes for {bad[:5]}")
    return model.to(map_location).eval()
