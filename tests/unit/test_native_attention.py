"""The native CPU temporal attention (dawn/models/kernels/banded_attention.cpp) against the PyTorch formulation."""

import pytest
import torch

import dawn.models.unet3d as unet3d
from dawn.models import native
from dawn.models.attention import RelativePositionBias, RotaryEmbedding, local_attention


def torch_banded_attention(qkv, heads, window, rope, bias):
    """RoPE + local_attention, the path the U-Net takes without the kernel."""
    t, n, _ = qkv.shape
    q, k, v = qkv.reshape(t, n, 3, heads, -1).unbind(2)
    angles = rope.angles(torch.arange(t))
    q, k, v = (y.permute(1, 2, 0, 3) for y in (q, k, v))  # (n, heads, T, dh)
    q, k = rope.rotate(q, angles), rope.rotate(k, angles)
    return local_attention(q, k, v, window, bias).permute(2, 0, 1, 3).reshape(t, n, -1)


def rope_tables(rope, t):
    angles = rope.angles(torch.arange(t))[:, 0::2]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("frames,positions,heads,dim_head,window", [
    (200, 3, 8, 32, 40),  # hdtf presets: window 40, head dim 32
    (7, 2, 8, 32, 40),  # fewer frames than the window
    (97, 2, 4, 16, 10),  # frames not a multiple of the 4-query tile
    (133, 2, 2, 64, 54),  # the widest supported window
    (50, 3, 8, 32, 0),  # each frame attends to itself only
    (1, 2, 8, 32, 40),
])
def test_kernel_equals_rope_plus_local_attention(frames, positions, heads, dim_head, window):
    g = torch.Generator().manual_seed(frames)
    qkv = torch.randn(frames, positions, 3 * heads * dim_head, generator=g)
    rope = RotaryEmbedding(dim_head)
    bias = RelativePositionBias(heads, 32, 32)
    torch.nn.init.normal_(bias.relative_attention_bias.weight, generator=g)
    table = bias(torch.arange(-(frames - 1), frames))  # (heads, 2T - 1)
    with torch.no_grad():
        assert native.banded_attention_supported(qkv, dim_head, window)
        ours = native.banded_attention(qkv, heads, *rope_tables(rope, frames), table, window)
        expected = torch_banded_attention(qkv, heads, window, rope, bias)
    assert ours.shape == (frames, positions, heads * dim_head)
    assert (ours - expected).abs().max() < 1e-5


def test_kernel_reads_a_strided_chunk_of_positions():
    """The U-Net hands the kernel the projection of a chunk of positions: rows strided over a wider tensor."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(60, 9, 3 * 8 * 32, generator=g)
    chunk = wide[:, 2:6]
    rope, bias = RotaryEmbedding(32), RelativePositionBias(8, 32, 32)
    with torch.no_grad():
        ours = native.banded_attention(chunk, 8, *rope_tables(rope, 60), bias(torch.arange(-59, 60)), 40)
        expected = torch_banded_attention(chunk.contiguous(), 8, 40, rope, bias)
    assert (ours - expected).abs().max() < 1e-5


def test_unsupported_calls_fall_back():
    x = torch.randn(10, 2, 3 * 8 * 32)
    assert not native.banded_attention_supported(x, 32, None)  # full attention (training)
    assert not native.banded_attention_supported(x, 32, native.MAX_WINDOW + 1)
    assert not native.banded_attention_supported(x, 8, 40)  # head dim without a kernel
    assert not native.banded_attention_supported(x.bfloat16(), 32, 40)  # autocast
    assert not native.banded_attention_supported(x.requires_grad_(), 32, 40)  # training


def test_unet_output_is_the_same_with_and_without_the_kernel(monkeypatch):
    config = unet3d.A2VConfig.preset("tiny")
    torch.manual_seed(0)
    model = unet3d.A2VFDM(config).eval()
    torch.nn.init.normal_(model.unet.time_rel_pos_bias.relative_attention_bias.weight)
    c = model.config
    x_t = torch.randn(1, 3, 50, c.latent_size, c.latent_size)
    features = torch.randn(1, c.source_channels + c.face_channels, c.latent_size, c.latent_size)
    cond = torch.randn(1, 50, c.cond_dim)
    t = torch.tensor([300])
    calls = []
    kernel = native.banded_attention
    monkeypatch.setattr(native, "banded_attention", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        with_kernel = model(x_t, t, features, cond)
        assert calls, "the U-Net did not use the kernel"
        monkeypatch.setenv("DAWN_NATIVE_KERNELS", "0")
        calls.clear()
        without = model(x_t, t, features, cond)
        assert not calls
    assert (with_kernel - without).abs().max() < 1e-5


def test_build_is_cached_and_reports_compiler_errors(tmp_path, monkeypatch):
    path = native.build()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # built once per machine type

    monkeypatch.setenv("DAWN_KERNEL_CACHE", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f( {")
    with pytest.raises(RuntimeError, match="compiling broken.cpp failed"):
        native.build(broken)
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler'"):
        native.build()
