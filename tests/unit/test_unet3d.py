"""A2V-FDM denoiser: reference layout, prepared/windowed paths, adapter, checkpoints (the unet_small reference
vector: test_diffusion_vectors.py)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dawn.models.unet3d as unet3d
from dawn import DawnError
from dawn.adapters.a2v import FACE_ENCODER_SEED1234, from_reference, load_official_a2v, to_reference
from dawn.checkpoint import load_model, save_model
from dawn.models.unet3d import A2VConfig, A2VFDM


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "manifest_a2v_128.json").read_text())


def random_model(seed=0, **changes) -> A2VFDM:
    """Tiny preset at 32x32 images (8x8 latents, keeps the tests fast), random weights."""
    torch.manual_seed(seed)
    model = A2VFDM(dataclasses.replace(A2VConfig.preset("tiny"), image_size=32, **changes))
    with torch.no_grad():  # non-trivial norms and relative bias (fresh modules have ones / zeros)
        for name, p in model.named_parameters():
            if name.endswith(("gamma", ".g", "q_scale", "k_scale", "norm.weight")):
                p.uniform_(0.5, 1.5)
    return model.eval()


def random_inputs(config: A2VConfig, batch=2, frames=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config.latent_size
    return (torch.randn(batch, 3, frames, size, size, generator=g),
            torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, config.source_channels + config.face_channels, size, size, generator=g),
            torch.randn(batch, frames, config.cond_dim, generator=g))


# --- layout ----------------------------------------------------------------------------------------

def test_hdtf128_layout_is_the_reference_manifest(manifest):
    with torch.device("meta"):
        model = A2VFDM(A2VConfig.preset("hdtf128"))
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("face_encoder.")}
    ref = to_reference(ours)
    expected = {name: tuple(shape) for name, shape, *_ in manifest["entries"]}
    assert {k: tuple(v.shape) for k, v in ref.items()} == expected
    # and back: every manifest entry lands on exactly one of our tensors with our shape
    back = from_reference({k: torch.empty(s, device="meta") for k, s in expected.items()})
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    # the reference counts its one shared RoPE frequency vector (16 values, stored under 10 paths) once
    params = sum(p.numel() for p in model.unet.parameters())
    assert params + model.unet.init_temporal_attn.rotary_emb.freqs.numel() == manifest["unet_num_params"] == 49_857_555
    assert sum(v.numel() for v in ours.values()) == manifest["state_dict_numel"]


def test_adapter_is_strict_and_round_trips():
    model = random_model()
    ref = to_reference(model.state_dict())
    assert "face_loc_emb.conv1.weight" in ref and "denoise_fn.init_conv.weight" in ref
    assert ref["denoise_fn.init_conv.weight"].shape[2] == 1  # Conv3d (out, in, 1, k, k)
    back = from_reference(ref)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())

    missing = dict(ref)
    del missing["denoise_fn.mid_block1.block1.proj.bias"]
    with pytest.raises(DawnError, match="missing.*mid_block1.block1.proj.bias"):
        from_reference(missing)
    extra = dict(ref, **{"denoise_fn.extra.weight": torch.zeros(1)})
    with pytest.raises(DawnError, match="unexpected.*denoise_fn.extra.weight"):
        from_reference(extra)
    with pytest.raises(DawnError, match="init_conv"):
        from_reference({"betas": torch.zeros(1000)})


# --- fast paths against plain formulations --------------------------------------------------------

def test_prepared_context_is_reusable_and_equals_plain_forward():
    model = random_model()
    x_t, t, features, cond = random_inputs(model.config)
    with torch.no_grad():
        denoise = model.denoiser(features, cond)
        for step in range(2):
            x_step, t_step = x_t + step, (t + 100 * step) % 1000
            assert torch.equal(denoise(x_step, t_step), model(x_step, t_step, features, cond))


def test_v_prediction_model_gives_samplers_eps():
    eps_model, v_model = random_model(), random_model(prediction="v")  # same seed: the same weights
    x_t, t, features, cond = random_inputs(v_model.config)
    with torch.no_grad():
        v = v_model(x_t, t, features, cond)
        torch.testing.assert_close(v, eps_model(x_t, t, features, cond))
        torch.testing.assert_close(v_model.denoiser(features, cond)(x_t, t), v_model.schedule.eps_from_v(x_t, t, v))
    with pytest.raises(ValueError, match="prediction"):
        A2VConfig(prediction="x0")


def test_offset_motion_target_is_the_scaled_displacement_and_round_trips():
    from dawn.models.lfg import coordinate_grid

    grid_model, offset_model = random_model(), random_model(motion_target="offset", offset_scale=0.05)
    g = torch.Generator().manual_seed(0)
    identity = coordinate_grid(8, 8).permute(2, 0, 1)[None, :, None]  # (1, 2, 1, 8, 8)
    flows = torch.cat([identity.expand(2, 2, 5, 8, 8) + 0.05 * torch.randn(2, 2, 5, 8, 8, generator=g),
                       torch.rand(2, 1, 5, 8, 8, generator=g) * 2 - 1], dim=1)
    motion = offset_model.motion_from_flows(flows)
    torch.testing.assert_close(motion[:, :2], (flows[:, :2] - identity) / 0.05)  # unit-scale displacement
    assert 0.5 < motion[:, :2].std() < 2 and torch.equal(motion[:, 2:], flows[:, 2:])
    torch.testing.assert_close(offset_model.flows_from_motion(motion), flows)
    assert offset_model.flows_from_motion(motion * 3)[:, 2:].abs().max() <= 1  # occlusion stays in range
    assert torch.equal(grid_model.motion_from_flows(flows), flows)  # the reference's absolute grid
    assert grid_model.clip_samples and not offset_model.clip_samples
    with pytest.raises(ValueError, match="motion_target"):
        A2VConfig(motion_target="flow")


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: cross-attention accumulates into the activation in place
def test_chunked_inference_equals_plain_forward(monkeypatch, batch):
    """Inference (no gradients) in chunks of 3 frames, in place, with GroupNorm statistics over the whole
    clip, equals the plain forward that training runs."""
    model = random_model(window=4)
    x_t, t, features, cond = random_inputs(model.config, batch=batch, frames=11)
    plain = model(x_t, t, features, cond)  # gradients on: the plain path
    assert plain.requires_grad
    monkeypatch.setattr(unet3d, "FRAME_CHUNK_ELEMENTS", 3 * 16 * 8 * 8)  # 3 frames per chunk at the top level
    monkeypatch.setattr(unet3d, "TEMPORAL_TOKENS_PER_CHUNK", 11 * 24)  # 24 of 64 positions at a time
    assert len(unet3d.frame_chunks(torch.empty(batch, 16, 11, 8, 8))) == 4
    with torch.no_grad():
        chunked = model(x_t, t, features, cond)
    assert (chunked - plain).abs().max() < 1e-5 * plain.abs().max()


def test_bf16_autocast_inference_follows_float32():
    """The bf16 path `dawn render --dtype bf16` takes (autocast; on CUDA in practice): chunked buffers take
    the autocast dtype and stay close to float32."""
    model = random_model(window=4)
    x_t, t, features, cond = random_inputs(model.config, batch=1, frames=11)
    with torch.no_grad():
        full = model(x_t, t, features, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x_t, t, features, cond)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_cross_attention_closed_form_equals_softmax_attention():
    """The prepared cross-attention equals the reference's generic formulation (§4.3), per block."""
    model = random_model()
    block = model.unet.downs[1].res1  # cin 16 -> cout 32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 5, 6, 6, generator=g) * 3 + 1
    cond = torch.randn(2, 5, model.config.cond_dim, generator=g)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        ours = block.cross_attention(x.contiguous(memory_format=torch.channels_last_3d), block.prepare(cond))

        def gain_norm(v, gain):
            return (v - v.mean(-1, keepdim=True)) * (v.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt() * gain

        tokens = x.permute(0, 2, 3, 4, 1).reshape(10, 36, 16)
        audio, pose, eye = cond.split([1024, 6, 2], dim=-1)
        expected = 0
        for attn, mlp, c in ((block.cross_attn_aud, block.audio_mlp, audio), (block.cross_attn_pose, block.pose_mlp, pose),
                             (block.cross_attn_eye, block.eye_mlp, eye)):
            context = mlp(c).reshape(10, 1, -1)
            q = attn.to_q(gain_norm(tokens, attn.norm.g)).view(10, 36, 8, 8).transpose(1, 2)
            k, v = (y.view(10, 1, 8, 8).transpose(1, 2) for y in attn.to_kv(context).chunk(2, dim=-1))
            k = torch.cat([attn.null_kv[0].expand(10, 8, 1, 8), k], dim=2)
            v = torch.cat([attn.null_kv[1].expand(10, 8, 1, 8), v], dim=2)
            q, k = F.normalize(q, dim=-1) * attn.q_scale, F.normalize(k, dim=-1) * attn.k_scale
            out = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
            expected = expected + gain_norm(attn.to_out[0](out.transpose(1, 2).reshape(10, 36, 64)), attn.to_out[1].g)
    expected = expected.view(2, 5, 6, 6, 32).permute(0, 4, 1, 2, 3)
    assert (ours - expected).abs().max() < 1e-5


def test_windowed_equals_reference_mode_full_mask(monkeypatch):
    """window 4 over 30 frames: local_attention's blocks (and several spatial chunks) vs the T x T mask."""
    model = random_model(window=4)
    torch.nn.init.normal_(model.unet.time_rel_pos_bias.relative_attention_bias.weight)
    reference = random_model(window=4).use_reference_attention()
    reference.load_state_dict(model.state_dict())
    x_t, t, features, cond = random_inputs(model.config, batch=1, frames=30)
    monkeypatch.setattr(unet3d, "TEMPORAL_TOKENS_PER_CHUNK", 30 * 24)  # 24 of 64 positions per chunk
    with torch.no_grad():
        ours = model(x_t, t, features, cond)
        full = reference(x_t, t, features, cond)
        unwindowed = random_model(window=None)
        unwindowed.load_state_dict(model.state_dict())
        assert (unwindowed(x_t, t, features, cond) - full).abs().max() > 1e-3  # the window matters here
    assert (ours - full).abs().max() < 1e-5


def test_tiny_forward_backward_finite():
    model = random_model(window=None).train()
    x_t, t, features, cond = random_inputs(model.config, frames=6)
    eps = model(x_t, t, model.source_features(features[:, :32], torch.tensor([[10., 20, 8, 30, 32, 32]] * 2)), cond)
    assert eps.shape == x_t.shape
    eps.square().mean().backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in trained.values()), \
        [n for n, g in trained.items() if g is None]
    assert trained["face_encoder.conv1.weight"].abs().sum() > 0  # the face encoder is trained (§9.1)
    unused = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert unused and all("_head.res.cross_attn" in n for n in unused)


# --- official checkpoints and dawn checkpoints -----------------------------------------------------

def test_load_official_a2v(tmp_path):
    model = random_model()
    diffusion = {k: v for k, v in to_reference(model.state_dict()).items() if not k.startswith("face_loc_emb.")}
    path = tmp_path / "DAWN_128.pth"
    torch.save({"example": 3, "diffusion": diffusion, "optimizer_diff": {"state": {}, "param_groups": []}}, path)

    loaded = load_official_a2v(path)
    assert loaded.config.image_size == 128 and loaded.config.source_channels == 32 and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items()
               if not k.startswith("face_encoder."))
    candidate = load_file(str(FACE_ENCODER_SEED1234))
    assert torch.equal(loaded.face_encoder.conv2.weight, candidate["face_loc_emb.conv2.weight"])

    torch.manual_seed(5)
    fresh = load_official_a2v(path, face_encoder="random", image_size=256)
    assert fresh.config.image_size == 256
    assert not torch.equal(fresh.face_encoder.conv2.weight, candidate["face_loc_emb.conv2.weight"])

    with pytest.raises(DawnError, match="image size"):
        load_official_a2v(path.rename(tmp_path / "diffusion.pth"))
    torch.save({"generator": {}}, tmp_path / "LFG_128.pth")
    with pytest.raises(DawnError, match="diffusion"):
        load_official_a2v(tmp_path / "LFG_128.pth")
    with pytest.raises(DawnError, match="not found"):
        load_official_a2v(tmp_path / "missing_128.pth")


def test_dawn_checkpoint_round_trip(tmp_path):
    model = random_model()
    save_model(model, tmp_path, "a2v")
    loaded = load_model(tmp_path, "a2v")
    assert loaded.config == model.config
    x_t, t, features, cond = random_inputs(model.config, batch=1, frames=4)
    with torch.no_grad():
        assert torch.equal(loaded(x_t, t, features, cond), model(x_t, t, features, cond))


def test_in_place_rope_equals_rope():
    from dawn.models.attention import RelativePositionBias, RotaryEmbedding
    from dawn.models.unet3d import TemporalContext

    ctx = TemporalContext.build(RotaryEmbedding(32), RelativePositionBias(8, 32, 32), 30, 8, False, "cpu")
    qkv = torch.randn(30, 5, 3, 8, 32)
    expected = torch.stack([ctx.rotate(qkv[:, :, 0]), ctx.rotate(qkv[:, :, 1]), qkv[:, :, 2]], dim=2)
    ctx.rotate_(qkv[:, :, :2])
    assert (qkv - expected).abs().max() < 1e-6


def test_group_moments_of_a_channels_last_chunk_equal_the_native_group_norm_statistics():
    """The CUDA path's GroupNorm statistics (a reduction over a view; the CUDA kernel needs contiguous input)
    equal what the native kernel gives on CPU."""
    from dawn.models.unet3d import ConvBlock, group_moments

    block = ConvBlock(16, 32, 8)
    h = torch.randn(2, 32, 5, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    _, mean, var = block.moments(h)
    ours_mean, ours_var = group_moments(h, 8)
    torch.testing.assert_close(ours_mean, mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_var, var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size,bias,channels_last_weight", [(4, True, True), (3, False, False), (2, True, False)])
def test_small_frame_convolution_as_matmul_equals_the_convolution(monkeypatch, size, bias, channels_last_weight):
    """3x3 convolutions of 4x4 (or smaller) frames run as one product over unfolded patches at inference."""
    conv = torch.nn.Conv2d(24, 40, 3, padding=1, bias=bias)
    if channels_last_weight:
        conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 24, 5, size, size).contiguous(memory_format=torch.channels_last_3d)
    calls = []
    as_matmul = unet3d.conv3x3_as_matmul
    monkeypatch.setattr(unet3d, "conv3x3_as_matmul", lambda *a: calls.append(1) or as_matmul(*a))
    with torch.no_grad():
        ours = unet3d.per_frame(conv, x)
    assert calls and ours.is_contiguous(memory_format=torch.channels_last_3d)
    expected = F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))
    assert (ours - expected).abs().max() < 1e-5
    calls.clear()
    unet3d.per_frame(conv, x)  # with gradients: the convolution itself
    assert not calls
