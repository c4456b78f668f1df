"""bench/reference_unet.py (the benchmark baseline computing the U-Net forward the official code's way)
gives dawn's forward: same eps within float32 rounding, window mask active."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dawn.models.unet3d import A2VConfig, A2VFDM

# bench/ is a folder of scripts, not a package: load the baseline from its file
_spec = importlib.util.spec_from_file_location(
    "bench_reference_unet", Path(__file__).resolve().parents[2] / "bench" / "reference_unet.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
reference_forward = _bench.reference_forward

FRAMES = 50  # > 2 x window 40 + 1: frames beyond the window are masked


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_reference_forward_equals_dawn_forward():
    torch.manual_seed(0)
    a2v = A2VFDM(A2VConfig.preset("tiny")).eval()
    assert a2v.config.window == 40
    with torch.no_grad():  # gains, biases, q/k scales away from their 1/0 initial values
        for name, p in a2v.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    c, size = a2v.config, a2v.config.latent_size
    x_t = torch.randn(1, 3, FRAMES, size, size)
    t = torch.tensor([500])
    features = torch.randn(1, c.source_channels + c.face_channels, size, size)
    cond = torch.randn(1, FRAMES, c.cond_dim)
    with torch.no_grad():
        ours = a2v(x_t, t, features, cond)
    reference = reference_forward(a2v, x_t, t, features, cond)
    assert reference.shape == ours.shape == (1, 3, FRAMES, size, size)
    assert (reference - ours).abs().max() <= 1e-5 * ours.abs().max()
