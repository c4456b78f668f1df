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
        native.build((broken,))
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler'"):
        native.build()


@pytest.mark.parametrize("frames,tokens", [(3, 37), (2, 16), (1, 5)])
def test_cross_attention_coefficients_equal_the_torch_formulation(monkeypatch, frames, tokens):
    """The block's cross-attention (all of it: q, logits, coefficients, output) with and without the kernel."""
    config = unet3d.A2VConfig.preset("tiny")
    torch.manual_seed(frames)
    block = unet3d.ResnetBlock(config, 24, 32).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    side = int(tokens**0.5) or 1
    x = torch.randn(1, 24, frames, side, tokens // side)  # tokens not a multiple of the kernel's 16 lanes
    with torch.no_grad():
        terms = block.prepare(torch.randn(1, frames, config.cond_dim))
        q = torch.randn(frames, tokens, 3 * 8 * 8)
        assert native.cross_attention_supported(q, 8, 8)
        assert not native.cross_attention_supported(q, 8, 16) and not native.cross_attention_supported(q, 4, 8)
        with_kernel = block.cross_attention(x, terms)
        monkeypatch.setenv("DAWN_NATIVE_KERNELS", "0")
        without = block.cross_attention(x, terms)
    assert (with_kernel - without).abs().max() < 1e-5 * without.abs().max().clamp_min(1)


def test_cross_attention_coefficients_of_extreme_logits_are_finite():
    """Saturated sigmoids (logits of +-1e4 over unit norms) and zero queries give finite coefficients."""
    q = torch.zeros(1, 4, 192)
    q[0, :2] = torch.randn(2, 192)
    logits = torch.tensor([[1e4] * 24, [-1e4] * 24, [0.0] * 24, [5.0] * 24])[None]
    gram = torch.eye(9).expand(1, 3, 9, 9).contiguous()
    with torch.no_grad():
        coef = native.cross_attention_coefficients(q, logits, gram, 1e-5)
    assert torch.isfinite(coef).all()
    s = coef.view(4, 3, 9)
    # with G = I the coefficients are c_a / |c_a|: c_a = (1, 1, ..., 1) for +1e4, (1, 0, ..., 0) for -1e4
    assert torch.allclose(s[0], torch.full((3, 9), 1 / 3.0), atol=1e-5)
    assert torch.allclose(s[1, :, 0], torch.ones(3), atol=1e-5) and s[1, :, 1:].abs().max() < 1e-6


def test_without_a_compiler_the_unet_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DAWN_KERNEL_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    native._library.cache_clear()
    try:
        qkv = torch.randn(20, 2, 3 * 8 * 32)
        with caplog.at_level("WARNING", logger="dawn.models.native"):
            assert not native.load()
            assert not native.banded_attention_supported(qkv, 32, 40)
        assert "no C++ compiler 'no-such-compiler'" in caplog.text
        model = unet3d.A2VFDM(unet3d.A2VConfig.preset("tiny")).eval()
        c = model.config
        with torch.no_grad():
            eps = model(torch.randn(1, 3, 6, c.latent_size, c.latent_size), torch.tensor([10]),
                        torch.randn(1, c.source_channels + c.face_channels, c.latent_size, c.latent_size),
                        torch.randn(1, 6, c.cond_dim))
        assert torch.isfinite(eps).all()
    finally:
        native._library.cache_clear()  # the next caller loads the real library again
