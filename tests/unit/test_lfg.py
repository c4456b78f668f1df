"""LFG: released layout (manifest), reference test vector, batched decoding, tiny training step, adapter."""

import json

import pytest
import torch

from dawn import DawnError
from dawn.adapters.lfg import (
    config_from_reference,
    from_reference,
    load_official_lfg,
    official_preset_name,
    to_reference,
)
from dawn.checkpoint import load_model, save_model
from dawn.models.lfg import LFG, FlowPredictor, LFGConfig, coordinate_grid, warp

REFERENCE_PARAMS = {"generator": 45_575_391, "region_predictor": 14_146_728, "bg_predictor": 6_282_438}


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "manifest_lfg_128.json").read_text())


@pytest.fixture(scope="module")
def vector(reference_vector):
    return reference_vector("lfg_small")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LFG(LFGConfig.preset("tiny")).eval()


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_hdtf128_layout_matches_manifest(manifest):
    config = LFGConfig.preset("hdtf128")
    assert config_from_reference(manifest["config"]) == config
    with torch.device("meta"):
        model = LFG(config)
    ours = model.state_dict()
    reference = to_reference(ours, config)
    expected = {name: (tuple(shape), dtype) for name, shape, dtype, _ in manifest["entries"]}
    assert len(reference) == len(ours) == len(expected) == 306
    assert reference.keys() == expected.keys()
    for name, tensor in reference.items():
        assert (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) == expected[name], name
    # Parameters vs buffers as in the manifest, counts as released.
    params = {k for k, _ in model.named_parameters()}
    assert {k for k, *_, kind in manifest["entries"] if kind == "param"} == set(to_reference(dict.fromkeys(params)))
    for net, count in REFERENCE_PARAMS.items():
        assert _count(getattr(model, net)) == count == manifest["networks"][net]["num_params"]
    assert _count(model) == 66_004_557 == manifest["num_params"]
    with torch.device("meta"):
        model_256 = LFG(LFGConfig.preset("hdtf256"))
    assert model_256.config.image_size == 256 and model_256.config.latent_size == 64
    assert {k: v.shape for k, v in model_256.state_dict().items()} == {k: v.shape for k, v in ours.items()}


def test_adapter_round_trip_and_strictness(vector):
    config = config_from_reference(vector.config)
    reference = vector.weights
    ours = from_reference(reference, config)
    back = to_reference(ours, config)
    assert list(back) == list(reference) and all(back[k] is reference[k] for k in reference)
    again = from_reference(to_reference(ours))
    assert list(again) == list(ours) and all(again[k] is ours[k] for k in ours)
    with pytest.raises(DawnError, match="generator.extra.weight"):
        from_reference({**reference, "generator.extra.weight": torch.zeros(1)})
    incomplete = dict(reference)
    del incomplete["bg_predictor.fc.bias"]
    with pytest.raises(DawnError, match="bg_predictor.affine_head.bias"):
        from_reference(incomplete, config)
    with pytest.raises(DawnError, match="wrong shapes"):
        from_reference({**reference, "bg_predictor.fc.bias": torch.zeros(7)}, config)


def test_reference_vector(vector):
    """Every stored output of the vector, from an LFG built from the sidecar's config."""
    config = config_from_reference(vector.config)
    model = LFG(config)
    model.load_state_dict(from_reference(vector.weights, config))
    model.eval()
    source, driving = vector.input("source"), vector.input("driving")
    flow, occlusion = vector.input("flow"), vector.input("occlusion")
    with torch.no_grad():
        out = model(source, driving)
        targets = model.flow_targets(source, driving)
        latent = model.source_latent(source)
        decoded = model.decode(model.encode_source(source), source, flow, occlusion)
    got = {"bg_params": out["bg_params"]}
    for side in ("source", "driving"):
        got.update({f"{side}_region.{k}": v for k, v in out[f"{side}_regions"].items()})
    got.update({
        "recon.optical_flow": out["flow"], "recon.occlusion_map": out["occlusion"], "recon.deformed": out["deformed"],
        "recon.prediction": out["prediction"], "recon.bottle_neck_feat": out["source_latent"],
        "decode.deformed": warp(source, flow), "decode.prediction": decoded,
    })  # fmt: skip
    vector.check_outputs(got)
    # The target-only and latent-only paths give the same numbers as the full reconstruction.
    assert torch.equal(targets[0], out["flow"]) and torch.equal(targets[1], out["occlusion"])
    assert torch.equal(latent, out["source_latent"])
    # The fixed anti-alias kernels we build equal the stored ones.
    fresh = LFG(config).state_dict()
    for key in ("generator.flow_predictor.downsample.kernel", "region_predictor.downsample.kernel"):
        assert torch.allclose(fresh[key], model.state_dict()[key], atol=1e-7)


def _random_motion(n, side, seed):
    g = torch.Generator().manual_seed(seed)
    flow = coordinate_grid(side, side).expand(n, side, side, 2) + 0.1 * torch.randn(n, side, side, 2, generator=g)
    return flow, torch.rand(n, 1, side, side, generator=g)


def test_decode_broadcasts_one_source_over_frames(tiny):
    source = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    flow, occlusion = _random_motion(5, 16, seed=2)
    with torch.no_grad():
        features = tiny.encode_source(source)
        batched = tiny.decode(features, source, flow, occlusion)
        per_frame = torch.cat([tiny.decode(tiny.encode_source(source), source, flow[i : i + 1], occlusion[i : i + 1])
                               for i in range(5)])  # fmt: skip
        repeated = tiny.decode(tiny.encode_source(source.expand(5, -1, -1, -1)), source.expand(5, -1, -1, -1), flow, occlusion)
    assert batched.shape == (5, 3, 64, 64)
    assert torch.allclose(batched, per_frame, atol=1e-5) and torch.allclose(batched, repeated, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # frames really differ
    video = tiny.decode_video(source, flow.permute(3, 0, 1, 2)[None], occlusion.transpose(0, 1)[None], batch_size=2)
    assert video.shape == (5, 3, 64, 64) and torch.allclose(video, batched, atol=1e-5)
    with pytest.raises(ValueError):
        tiny.decode_video(source, flow[None], occlusion[None])


def test_same_frame_gives_identity_flow(tiny):
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        flow, occlusion = tiny.flow_targets(image, image)
    assert flow.shape == (2, 16, 16, 2) and occlusion.shape == (2, 1, 16, 16)
    assert torch.allclose(flow, coordinate_grid(16, 16).expand_as(flow), atol=1e-5)


def test_revert_axis_swap_flips_region_affine():
    config = LFGConfig.preset("tiny")
    grid = coordinate_grid(4, 4)
    source = {"shift": torch.zeros(1, 1, 2), "affine": torch.diag(torch.tensor([-1.0, 2.0]))[None, None]}
    driving = {"shift": torch.zeros(1, 1, 2), "affine": torch.eye(2)[None, None]}
    bg = torch.eye(3)[None]
    kept = FlowPredictor(config).sparse_motions(source, driving, bg, grid)
    config.revert_axis_swap = False
    raw = FlowPredictor(config).sparse_motions(source, driving, bg, grid)
    assert torch.allclose(kept[0, 0], grid) and torch.allclose(raw[0, 0], grid)  # background: identity
    assert torch.allclose(raw[0, 1], grid * torch.tensor([-1.0, 2.0]))
    assert torch.allclose(kept[0, 1], grid * torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("pca", [True, False])
def test_tiny_training_step_has_finite_gradients(pca):
    torch.manual_seed(0)
    config = LFGConfig.preset("tiny")
    config.pca = pca
    model = LFG(config).train()
    g = torch.Generator().manual_seed(4)
    source, driving = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    out = model(source, driving)
    assert out["prediction"].shape == (2, 3, 64, 64) and out["source_latent"].shape == (2, 64, 16, 16)
    (out["prediction"] - driving).abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Gradients reach the motion networks through the flow (heatmaps, PCA, background matrix).
    assert model.region_predictor.region_logits.weight.grad.abs().sum() > 0
    assert model.bg_predictor.affine_head.weight.grad.abs().sum() > 0
    assert 1e5 < _count(model) < 3e6


def test_hdtf128_source_latent_shape():
    model = LFG(LFGConfig.preset("hdtf128")).eval()
    with torch.no_grad():
        assert model.source_latent(torch.rand(1, 3, 128, 128)).shape == (1, 256, 32, 32)


def test_checkpoint_round_trip(tiny, tmp_path):
    save_model(tiny, tmp_path, "lfg")
    loaded = load_model(tmp_path, "lfg")
    assert loaded.config == tiny.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny.state_dict().items())


def test_load_official_checkpoint(tiny, tmp_path):
    reference = to_reference(tiny.state_dict())
    nets = {net: {k.split(".", 1)[1]: v for k, v in reference.items() if k.startswith(net + ".")}
            for net in ("generator", "region_predictor", "bg_predictor")}  # fmt: skip
    path = tmp_path / "LFG_tiny.pth"
    torch.save({"example": 1000, "epoch": 3, **nets, "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded = load_official_lfg(path, config="tiny")
    assert not loaded.training and loaded.config == tiny.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny.state_dict().items())
    with pytest.raises(DawnError, match="LFG_tiny.pth"):
        load_official_lfg(path)  # neither 128 nor 256 in the name
    with pytest.raises(DawnError, match="LFG_tiny.pth"):
        load_official_lfg(path, config="hdtf128")  # shapes do not match
    broken = tmp_path / "LFG_128_1000ep.pth"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(DawnError, match="LFG_128_1000ep.pth"):
        load_official_lfg(broken)
    torch.save({"diffusion": {}}, broken)
    with pytest.raises(DawnError, match="LFG_128_1000ep.pth"):
        load_official_lfg(broken)
    assert official_preset_name("ckpt/LFG_256_400ep.pth") == "hdtf256"
    assert official_preset_name("LFG_128_1000ep.pth") == "hdtf128"
