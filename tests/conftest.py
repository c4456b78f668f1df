"""Shared test fixtures: real speech (espeak-ng) and a real portrait (skimage's astronaut)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference (manifests and numeric test vectors of the official implementation)."""
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE_DIR} (the checkout must sit beside shared/)")
    return REFERENCE_DIR


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
