import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dawn import DawnError
from dawn.adapters.pbnet import config_from_reference, from_reference, load_official_pbnet, to_reference
from dawn.checkpoint import load_model, save_model
from dawn.config import POSE_MAX, POSE_MIN
from dawn.models.pbnet import (
    STATE_DIMS,
    PatchDiscriminator1d,
    PatchDiscriminatorConfig,
    PBNet,
    PBNetConfig,
    prior_latents,
    to_model_units,
    to_raw_units,
)


def pbnet_config(config: dict) -> PBNetConfig:
    """PBNetConfig from a PBNet vector's sidecar `config` (the reference's hyper-parameter names)."""
    kinds = [kind for kind, key in (("pose", "pos_dim"), ("blink", "eye_dim")) if config[key]]
    assert len(kinds) == 1, f"exactly one of pos_dim, eye_dim must be set: {config}"
    kind = kinds[0]
    assert config["pos_dim" if kind == "pose" else "eye_dim"] == STATE_DIMS[kind]
    assert (config["archiname"], config["activation"]) == ("transformerreemb5", "gelu")
    latent, width = config["audio_latent_dim"], config["pose_latent_dim"]
    assert config["cvae_latent_dim"] == latent and config["decoder_d_model"] == width
    assert config["encoder_d_model"] == latent + 2 * width
    rotary_dim = config["rotary_dim"]
    return PBNetConfig(
        kind=kind, audio_dim=config["audio_dim"], audio_latent_dim=latent, pose_latent_dim=width,
        num_layers=config["num_layers"], num_heads=config["num_heads"], head_dim=config["attention_dim_head"],
        ff_size=config["ff_size"], dropout=config["dropout"], num_buckets=config["num_buckets"],
        max_distance=config["max_distance"], rotary_dim=rotary_dim,
        rotary_freqs=tuple(10000 ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)),  # RoPE defaults
    )


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind,learnable", [("pose", 2_347_018), ("blink", 2_231_046)])
def test_state_dict_maps_one_to_one_to_manifest(reference_dir, kind, learnable):
    manifest = json.loads((reference_dir / f"manifest_pbnet_{kind}.json").read_text())
    model = PBNet(PBNetConfig.preset(kind))
    ref = to_reference(model.state_dict())
    assert {k: list(v.shape) for k, v in ref.items()} == {k: shape for k, shape, _, _ in manifest["entries"]}
    assert sum(v.numel() for v in ref.values()) == manifest["state_dict_numel"]
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable == manifest["num_params_trainable"]
    # The reference counts its two (non-trainable) rotary frequency tensors as parameters, once each.
    assert trainable + 2 * len(model.config.rotary_freqs) == manifest["num_params"] == learnable
    # Our own checkpoints carry no positional tables: the state dict is the reference minus the two pe.
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["state_dict_param_numel"]
    back = from_reference(ref)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert PBNetConfig.preset("hdtf256", kind=kind) == PBNetConfig.preset(kind) == config_from_reference(ref)


def test_from_reference_is_strict(reference_vector):
    weights = reference_vector("pbnet_small").weights
    missing = {k: v for k, v in weights.items() if k != "decoder.init_proj.bias"}
    with pytest.raises(DawnError, match="decoder.query_init.bias"):
        from_reference(missing)
    with pytest.raises(DawnError, match="decoder.extra"):
        from_reference({**weights, "decoder.extra.weight": torch.zeros(1)})
    bad_pe = {**weights, "encoder.sequence_pos_encoder.pe": torch.zeros(20000, 1, 64)}
    with pytest.raises(DawnError, match="sinusoidal"):
        from_reference(bad_pe)
    with pytest.raises(DawnError, match="expected a blink"):
        config_from_reference(weights, kind="blink")


@pytest.mark.parametrize("name", ["pbnet_small", "pbnet_small_blink"])
def test_reference_vectors(reference_vector, name):
    """Every stored output of the vector, from a PBNet built from the sidecar's config."""
    vector = reference_vector(name)
    model = PBNet(pbnet_config(vector.config))
    model.load_state_dict(from_reference(vector.weights, model.config))
    model.eval()
    x, audio, mask = vector.input("x"), vector.input("audio"), vector.input("mask")  # x: model units
    z = vector.input("z").transpose(0, 1)  # reference latents are (T, B, A)
    with torch.no_grad():
        mu, logvar = model.encode(x, audio, mask)
        target_delta = model({"x": model.to_raw_units(x), "audio": audio, "mask": mask})["target_delta"]
        delta = model.decode(x[:, 0], z, audio, mask)
        raw = model.generate(model.to_raw_units(x[:, 0]), audio, z=z)
    got = {
        "encoder.mu": mu.transpose(0, 1), "encoder.logvar": logvar.transpose(0, 1), "encoder.x_delta": target_delta,
        "decoder.output": delta,
        "generate.output": model.to_model_units(raw) - x[:, :1],  # the reference returns the delta
        f"pipeline.{model.config.kind}_raw": raw,
    }  # fmt: skip
    if vector.config.get("T_long"):
        # the first audio sequence tiled to T_long frames; eval mode: the inference window is active
        n = vector.config["T_long"]
        assert n == vector.input("long_z").shape[0] > model.config.inference_window + 1
        long_audio = audio[:1].repeat(1, math.ceil(n / x.shape[1]), 1)[:, :n]
        x0, long_z = vector.input("long_x0")[:, 0], vector.input("long_z").transpose(0, 1)
        with torch.no_grad():
            got["decoder_long.output"] = model.decode(x0, long_z, long_audio)
            got["decoder_long.output_without_window_mask"] = model.decode(x0, long_z, long_audio, window=None)
        windowed, unmasked = (vector.output(f"decoder_long.{k}") for k in ("output", "output_without_window_mask"))
        assert max_err(windowed, unmasked) > 100 * vector.atol["decoder_long.output"]  # the window matters
    vector.check_outputs(got)


def tiny_model(kind="pose", **overrides) -> PBNet:
    torch.manual_seed(0)
    config = PBNetConfig.preset(f"tiny-{kind}")
    for k, v in overrides.items():
        setattr(config, k, v)
    return PBNet(config)


def test_windowed_decoder_equals_masked_full_attention():
    blocked = tiny_model(dropout=0.0).eval()  # block = window: the sliding-window path
    full = tiny_model(dropout=0.0, attention_block=10_000).eval()  # one block: masked full attention
    full.load_state_dict(blocked.state_dict())
    g = torch.Generator().manual_seed(1)
    t, window = 70, 6
    x0, z = torch.rand(2, 6, generator=g), torch.randn(2, t, 32, generator=g)
    audio = torch.randn(2, t, 1024, generator=g)
    with torch.no_grad():
        a, b = blocked.decode(x0, z, audio, window=window), full.decode(x0, z, audio, window=window)
        unwindowed = full.decode(x0, z, audio, window=None)
    assert max_err(a, b) < 1e-5
    assert max_err(a, unwindowed) > 1e-3
    # Train mode: no window at all, like the reference (dropout is 0 here, so the pass is deterministic).
    full.config.inference_window = window
    assert max_err(full.decode(x0, z, audio), b) < 1e-6
    full.train()
    assert max_err(full.decode(x0, z, audio), unwindowed) < 1e-6


def test_generate_denormalisation_round_trip():
    raw = torch.tensor([[-30.0, 12.5, 80.0, 4.8e-4, 56.5, 64.9], [0.0, -89.0, 5.0, 0.9, 700.0, 10.0]])
    units = to_model_units(raw, "pose")
    assert torch.allclose(units[0, :3], (raw[0, :3] + 90) / 180)
    assert torch.allclose(units[:, 5], raw[:, 5] / 1080)
    assert torch.allclose(to_raw_units(units, "pose"), raw, atol=1e-4)
    assert torch.equal(to_model_units(raw[:, :2], "blink"), raw[:, :2])
    lo, hi = torch.tensor(POSE_MIN), torch.tensor(POSE_MAX)
    assert torch.allclose(to_model_units(lo, "pose"), torch.zeros(6))
    assert torch.allclose(to_model_units(hi, "pose"), torch.ones(6))

    audio = torch.randn(2, 40, 1024)
    for kind, source in (("pose", raw), ("blink", torch.tensor([[0.3, 0.28], [0.1, 0.2]]))):
        model = tiny_model(kind).eval()
        with torch.no_grad():  # a decoder that predicts zero deltas: the source state, repeated, in raw units
            model.decoder.out_proj.weight.zero_()
            model.decoder.out_proj.bias.zero_()
        out = model.generate(source, audio, generator=torch.Generator().manual_seed(3))
        assert out.shape == (2, 40, source.shape[1])
        assert torch.allclose(out, source[:, None].expand_as(out), rtol=1e-5, atol=1e-4)

    model = tiny_model("pose").eval()
    first = model.generate(raw, audio, generator=torch.Generator().manual_seed(3))
    again = model.generate(raw, audio, generator=torch.Generator().manual_seed(3))
    other = model.generate(raw, audio, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and max_err(first, other) > 1e-3


def test_prior_latents_independent_by_default_and_correlated_with_smoothing():
    # sigma 0 is the paper's prior: exactly torch.randn's draws, no correlation between frames
    plain = prior_latents(2, 50, 8, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(3)))
    # smoothed: every frame still has unit variance (first and last included); the lag-d correlation of
    # Gaussian-filtered white noise is exp(-d^2 / (4 sigma^2))
    sigma = 3.0
    z = prior_latents(4000, 40, 4, sigma, torch.Generator().manual_seed(0)).double()
    per_frame_var = z.var(dim=(0, 2))
    assert per_frame_var.shape == (40,) and torch.allclose(per_frame_var, torch.ones(40, dtype=torch.double),
                                                           atol=0.05)
    for lag in (1, 3, 6):
        measured = (z[:, lag:] * z[:, :-lag]).mean().item()
        assert abs(measured - math.exp(-lag**2 / (4 * sigma**2))) < 0.03, lag
    assert (z[:, 1:] * z[:, :-1]).mean() > 0.9 > (plain[:, 1:] * plain[:, :-1]).mean().abs()
    # a model with latent_smoothing draws its latents that way: the same seed gives the same sequence
    model = PBNet(PBNetConfig.preset("tiny-pose", kind="pose")).eval()
    model.config.latent_smoothing = 2.0
    audio, source = torch.randn(1, 30, 1024), torch.tensor([[1.0, 2.0, -1.0, 1.0, 0.0, 0.0]])
    first = model.generate(source, audio, generator=torch.Generator().manual_seed(5))
    again = model.generate(source, audio, generator=torch.Generator().manual_seed(5))
    given = model.generate(source, audio, z=prior_latents(1, 30, model.config.audio_latent_dim, 2.0,
                                                        torch.Generator().manual_seed(5)))
    assert torch.equal(first, again) and torch.allclose(first, given)
    # latent_scale multiplies the prior's draws (1, the paper's prior, is the default)
    assert PBNetConfig().latent_scale == 1.0
    model.config.latent_scale = 2.5
    scaled = model.generate(source, audio, generator=torch.Generator().manual_seed(5))
    z = 2.5 * prior_latents(1, 30, model.config.audio_latent_dim, 2.0, torch.Generator().manual_seed(5))
    assert torch.allclose(scaled, model.generate(source, audio, z=z), atol=1e-6)


def sine_windows(amplitude: float, frames: int = 48) -> list[dict]:
    """One batch of 4 pose windows: yaw, pitch and roll move by sines of `amplitude` x (10, 5, 3) degrees,
    scale, tx and ty stay still."""
    seconds = torch.arange(frames) / 25.0
    x = torch.zeros(4, frames, 6)
    x[..., 3] = 1.0
    for b in range(4):
        x[b, :, 0] = amplitude * 10 * torch.sin(2 * math.pi * 0.3 * seconds + b)
        x[b, :, 1] = amplitude * 5 * torch.cos(2 * math.pi * 0.5 * seconds + b)
        x[b, :, 2] = amplitude * 3 * torch.sin(2 * math.pi * 0.2 * seconds + 2 * b)
    audio = torch.randn(4, frames, 1024, generator=torch.Generator().manual_seed(1))
    return [{"x": x, "audio": audio, "mask": torch.ones(4, frames, dtype=torch.bool)}]


def test_fit_latent_scale_makes_samples_move_as_much_as_the_training_windows():
    from dawn.train.pbnet import fit_latent_scale

    torch.manual_seed(0)
    model = PBNet(PBNetConfig.preset("tiny-pose")).train()
    batches = sine_windows(1.0)
    scale = fit_latent_scale(model, batches, rounds=4)
    assert model.training and model.config.latent_scale == scale  # left in its mode, with the scale set
    assert fit_latent_scale(model, batches, rounds=4) == scale  # seeded draws: the same answer
    # at that scale the samples' spread over the truth's, per state and weighted by the true variance (the
    # still scale / tx / ty count for nothing), is 1
    model.eval()
    x, audio = batches[0]["x"], batches[0]["audio"]
    sample = model.generate(x[:, 0], audio, generator=torch.Generator().manual_seed(0))
    true_var, sample_var = (model.to_model_units(s).var(dim=1, unbiased=False).sum(0) for s in (x, sample))
    weight = true_var / true_var.sum()
    assert float((weight[:3] * (sample_var[:3] / true_var[:3]).sqrt()).sum()) == pytest.approx(1.0, abs=0.03)
    assert weight[3:].sum() == 0
    # training windows that move twice as far need a latent about twice as large
    assert fit_latent_scale(model, sine_windows(2.0), rounds=4) > 1.8 * scale


def test_discriminator_output_shape_and_gradients():
    disc = PatchDiscriminator1d(PatchDiscriminatorConfig.preset("pose"))
    delta, source = torch.randn(3, 200, 6, requires_grad=True), torch.rand(3, 6)
    logits = disc(delta, source)
    assert logits.shape == (3, 23)  # 200 -> 100 -> 50 -> 25 (stride 2) -> 24 -> 23 (k4 s1 p1)
    logits.mean().backward()
    assert torch.isfinite(delta.grad).all() and delta.grad.abs().sum() > 0
    tiny = PatchDiscriminator1d(PatchDiscriminatorConfig.preset("tiny-blink"))
    assert tiny(torch.randn(2, 64, 2), torch.rand(2, 2)).shape == (2, 14)  # 64 -> 32 -> 16 -> 15 -> 14
    assert PatchDiscriminatorConfig.preset("hdtf128", kind="blink").state_dim == 2


def test_tiny_forward_backward_is_finite():
    model = tiny_model("pose").train()
    g = torch.Generator().manual_seed(2)
    lo, hi = torch.tensor(POSE_MIN), torch.tensor(POSE_MAX)
    x = lo + torch.rand(2, 24, 6, generator=g) * (hi - lo)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 20:] = False
    out = model({"x": x, "audio": torch.randn(2, 24, 1024, generator=g), "mask": mask})
    assert out["delta"].shape == out["target_delta"].shape == (2, 24, 6)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (2, 24, 32)
    assert torch.allclose(out["source"], to_model_units(x[:, 0], "pose"))
    assert (out["delta"][1, 20:] == 0).all()
    kl = -0.5 * (1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp()).mean()
    loss = ((out["delta"] - out["target_delta"]) ** 2).mean() + 0.01 * kl
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.decoder.layers[0].cross_attn.to_k.weight.grad.abs().sum() > 0


def test_official_checkpoint_and_dawn_checkpoint_round_trip(tmp_path):
    model = tiny_model("blink").eval()
    path = tmp_path / "checkpoint_0100.pth.tar"
    torch.save(to_reference(model.state_dict()), path)
    loaded = load_official_pbnet(path, "blink")
    assert not loaded.training and loaded.config == model.config
    with pytest.raises(DawnError, match="expected a pose"):
        load_official_pbnet(path, "pose")
    with pytest.raises(DawnError, match="not found"):
        load_official_pbnet(tmp_path / "missing.pth.tar", "pose")

    save_model(model, tmp_path / "ckpt", "pbnet_blink")
    assert not any("pe" in k.split(".") for k in load_file(str(tmp_path / "ckpt" / "pbnet_blink.safetensors")))
    restored = load_model(tmp_path / "ckpt", "pbnet_blink")
    source, audio = torch.tensor([[0.3, 0.25]]), torch.randn(1, 30, 1024)
    outs = [m.generate(source, audio, generator=torch.Generator().manual_seed(5)) for m in (model, loaded, restored)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
