"""Loading third-party metric networks' released weights (InceptionV3, I3D, SyncNet, ArcFace) from a user path.

The files are plain PyTorch state dicts (`.pth` / `.pt` / `.model`, read with `torch.load(weights_only=True)`,
which refuses arbitrary pickled objects) or `.safetensors`. Every problem is a DawnError that names the
expected file, so a user knows what to download and where to put it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dawn import DawnError


def read_state_dict(path: str | Path, expected: str) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file. `expected` describes the file for error messages (name + origin)."""
    path = Path(path)
    if not path.is_file():
        raise DawnError(f"weights file not found: {path} (expected {expected})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with objects, wrong format: all the user's file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DawnError(f"cannot read {path} as a PyTorch state dict ({reason}); expected {expected}") from error
    for wrapper in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DawnError(f"{path} does not hold a state dict of tensors; expected {expected}")
    return {k.removeprefix("module."): v for k, v in state.items()}  # nn.DataParallel saves add "module."


def load_weights(build: Callable[[], nn.Module], path: str | Path, expected: str) -> nn.Module:
    """Read `path`, build the network with `build()` and load the file into it strictly (every parameter and
    buffer, same shapes); returns the network in eval mode. BatchNorm `num_batches_tracked` counters are not
    required (old files predate them).
    """
    state = read_state_dict(path, expected)
    model = build()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise DawnError(f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}. Expected {expected}")
    model.load_state_dict(state, strict=False)
    return model.eval()
