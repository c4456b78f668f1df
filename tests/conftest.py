"""Shared test fixtures: real speech (espeak-ng), a real portrait (skimage's astronaut) and the reference
manifests and numeric test vectors (tests/assets/reference)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import numpy as np
import pytest
import torch

# Manifests (manifest_*.json) and numeric test vectors (vectors/NAME.safetensors + sidecar NAME.json) of the
# official implementation; DAWN_REFERENCE_DIR points the tests at another folder of the same layout.
REFERENCE_DIR = Path(__file__).resolve().parent / "assets" / "reference"
REFERENCE_DIR_ENV = "DAWN_REFERENCE_DIR"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """tests/assets/reference, or the folder $DAWN_REFERENCE_DIR names."""
    override = os.environ.get(REFERENCE_DIR_ENV)
    path = Path(override).expanduser().resolve() if override else REFERENCE_DIR
    if not path.is_dir():
        pytest.fail(f"reference data not found at {path}" + (f" (from ${REFERENCE_DIR_ENV})" if override else ""))
    return path


class ReferenceVector:
    """One numeric test vector: NAME.safetensors (reference weights, `input.*`, `output.*`) and the sidecar
    NAME.json (`config`, `calls`, `outputs`, `tolerance`; vectors/README.md)."""

    def __init__(self, directory: Path, name: str):
        from safetensors.torch import load_file

        self.name = name
        self.tensors = load_file(str(directory / f"{name}.safetensors"))
        self.meta = json.loads((directory / f"{name}.json").read_text())
        self.config = self.meta["config"]
        self.weights = {k: v for k, v in self.tensors.items() if not k.startswith(("input.", "output."))}
        self.outputs = [entry[0].removeprefix("output.") for entry in self.meta["outputs"]]
        self.atol = self.meta["tolerance"]["recommended_atol_float32"]

    def input(self, name: str) -> torch.Tensor:
        return self.tensors[f"input.{name}"]

    def output(self, name: str) -> torch.Tensor:
        return self.tensors[f"output.{name}"]

    def check_outputs(self, got: dict[str, torch.Tensor], excluded: dict[str, str] | None = None) -> None:
        """Every output the sidecar lists is either in `got` (compared: max |ours - reference| <= the sidecar's
        recommended float32 atol for it) or in `excluded` (name -> why our code cannot produce it); anything
        else (a new output, a stale exclusion, a tensor the sidecar does not list) fails."""
        excluded = excluded or {}
        listed = set(self.outputs)
        stored = {k.removeprefix("output.") for k in self.tensors if k.startswith("output.")}
        problems = []
        if stored != listed:
            problems.append(f"sidecar outputs and stored output.* tensors differ: only listed "
                            f"{sorted(listed - stored)}, only stored {sorted(stored - listed)}")
        if listed - self.atol.keys():
            problems.append(f"no recommended_atol_float32 for {sorted(listed - self.atol.keys())}")
        if got.keys() - listed:
            problems.append(f"computed outputs the vector does not have: {sorted(got.keys() - listed)}")
        if excluded.keys() - listed:
            problems.append(f"excluded outputs the vector does not have: {sorted(excluded.keys() - listed)}")
        if got.keys() & excluded.keys():
            problems.append(f"outputs both compared and excluded: {sorted(got.keys() & excluded.keys())}")
        if listed - got.keys() - excluded.keys():
            problems.append(f"outputs neither compared nor excluded: {sorted(listed - got.keys() - excluded.keys())}")
        for name in [n for n in self.outputs if n in got and n in stored and n in self.atol]:
            ours, want = got[name], self.output(name)
            if tuple(ours.shape) != tuple(want.shape):
                problems.append(f"{name}: shape {tuple(ours.shape)} != reference {tuple(want.shape)}")
                continue
            error = (ours.detach().float() - want.float()).abs().max().item()
            if not error <= self.atol[name]:  # NaN fails too
                problems.append(f"{name}: max|ours - reference| = {error:.3e} > atol {self.atol[name]:.3e}")
        if problems:
            pytest.fail(f"reference vector {self.name}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def reference_vector(reference_dir):
    """reference_vector(name) -> the ReferenceVector vectors/name.* (loaded once per session)."""
    loaded = {}

    def load(name: str) -> ReferenceVector:
        if name not in loaded:
            loaded[name] = ReferenceVector(reference_dir / "vectors", name)
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """About 3 s of English speech synthesised by espeak-ng (22.05 kHz mono WAV)."""
    from dawn.data.tts import synthesize_speech

    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    return synthesize_speech("Hello there, this is a short test of the talking head.", path)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """skimage's astronaut portrait, (512, 512, 3) uint8 RGB."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory, astronaut) -> Path:
    import cv2

    path = tmp_path_factory.mktemp("portrait") / "astronaut.png"
    cv2.imwrite(str(path), astronaut[:, :, ::-1])
    return path


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with pytest.mark.usefixtures): spinning OpenMP threads
    are slow on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
