"""Training objectives without Ray or DeepSpeed: each loss is finite and goes down on a fixed batch under
plain torch AdamW; the KL and LR schedules, the MRAA transform, the lip mask, VGG-19 loading and its
fallback, the DeepSpeed config and the lock-step batch feed."""

import logging

import numpy as np
import pytest
import torch

from dawn import DawnError
from dawn.checkpoint import save_model
from dawn.train.config import TrainConfig, deepspeed_config, lr_multiplier
from dawn.train.objective import torch_engines


def fit(objective, batch, steps):
    """Loss dicts of `steps` plain-torch training steps on one batch."""
    torch.manual_seed(0)
    engines = torch_engines(objective)
    return [objective.train_step(engines, batch, step) for step in range(steps)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_lfg_loss_goes_down_and_falls_back_without_vgg(caplog):
    from dawn.train.lfg import FALLBACK_MESSAGE, LFGObjective, PyramidL1Loss

    torch.manual_seed(0)
    config = TrainConfig(model="lfg", data="unused", batch_size=2, lr=2e-3, overfit_batches=1)
    with caplog.at_level(logging.WARNING, logger="dawn.train.lfg"):
        objective = LFGObjective(config, torch.device("cpu"))
    assert FALLBACK_MESSAGE.format(reason="no --vgg19 path given") in caplog.text
    assert isinstance(objective.reconstruction, PyramidL1Loss) and not objective.uses_vgg
    source = torch.rand(2, 3, 64, 64)
    batch = {"source": source, "driving": torch.roll(source, 4, dims=3)}
    losses = fit(objective, batch, 5)
    assert all(np.isfinite(l["loss"]) for l in losses)
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert {"reconstruction", "equivariance_shift", "equivariance_affine"} <= set(losses[0])


def test_lfg_augmentation_transforms_both_frames_of_a_pair_alike():
    from dawn.train.lfg import LFGObjective

    config = TrainConfig(model="lfg", data="unused", batch_size=2,
                         objective_options={"flip_probability": 1.0, "colour_jitter": 0.0})
    objective = LFGObjective(config, torch.device("cpu"))
    source, driving = torch.rand(64, 3, 16, 16), torch.rand(64, 3, 16, 16)
    flipped = objective.augment(source, driving)
    assert torch.equal(flipped[0], source.flip(-1)) and torch.equal(flipped[1], driving.flip(-1))
    objective.options.flip_probability, objective.options.colour_jitter = 0.5, 0.1
    same = torch.ones(64, 3, 16, 16) * 0.5
    ramp = torch.linspace(0, 1, 16).expand(64, 3, 16, 16)  # flips visibly
    a, b, no_mask = objective.augment(same, ramp, torch.Generator().manual_seed(0))
    assert no_mask is None
    gain = a[:, :, 0, 0] / 0.5  # per pair and channel
    assert (gain - 1).abs().max() <= 0.1 + 1e-6 and gain.std() > 0.02
    flips = ~torch.isclose(b[:, 0, 0, 0], ramp[:, 0, 0, 0] * gain[:, 0])
    assert 10 < flips.sum() < 54  # about half the pairs
    torch.testing.assert_close(b[:, :, :, :], (torch.where(flips.view(-1, 1, 1, 1), ramp.flip(-1), ramp)
                                               * gain[:, :, None, None]).clamp(0, 1))  # same gain on both frames


def test_lfg_lip_and_eye_terms_weigh_their_boxes_and_flip_with_the_pair():
    from dawn.train.lfg import LFGObjective

    options = {"flip_probability": 0.0, "colour_jitter": 0.0}
    plain = LFGObjective(TrainConfig(model="lfg", data="unused", objective_options=options), torch.device("cpu"))
    regions = LFGObjective(TrainConfig(model="lfg", data="unused", objective_options={
        **options, "lip_weight": 5.0, "eye_weight": 2.0}), torch.device("cpu"))
    regions.lfg.load_state_dict(plain.lfg.state_dict())
    source = torch.rand(2, 3, 64, 64)
    # the second frame's boxes are all zeros (no face found in that frame): they add nothing
    lip_boxes = torch.tensor([[20.0, 40.0, 40.0, 50.0, 64.0, 64.0], [0.0] * 6])
    eye_boxes = torch.tensor([[10.0, 50.0, 20.0, 26.0, 64.0, 64.0], [0.0] * 6])
    batch = {"source": source, "driving": source.roll(3, dims=2), "driving_lip_box": lip_boxes,
             "driving_eye_box": eye_boxes}
    for objective in (plain, regions):
        objective.lfg.train(False)  # no augmentation
    with torch.no_grad():
        base, weighted = plain.loss(batch, 0), regions.loss(batch, 0)
        prediction = regions.lfg(batch["source"], batch["driving"])["prediction"]
    lips = (prediction[0, :, 40:52, 20:42] - batch["driving"][0, :, 40:52, 20:42]).abs().mean()
    eyes = (prediction[0, :, 20:28, 10:52] - batch["driving"][0, :, 20:28, 10:52]).abs().mean()
    torch.testing.assert_close(weighted["lip_l1"], lips)
    torch.testing.assert_close(weighted["eye_l1"], eyes)
    torch.testing.assert_close(weighted["reconstruction"], base["reconstruction"])
    rest = weighted["reconstruction"] + 10 * (weighted["equivariance_shift"] + weighted["equivariance_affine"])
    torch.testing.assert_close(weighted["loss"], rest + 5.0 * lips + 2.0 * eyes)
    assert "lip_l1" not in base and "eye_l1" not in base
    # a flipped pair flips its masks too: the training loss with flip probability 1 is the loss of the
    # mirrored pair with mirrored boxes
    regions.options.flip_probability = 1.0
    masks = regions.region_masks(batch)
    _, _, flipped = regions.augment(source, batch["driving"], mask=torch.cat([masks["lip"], masks["eye"]], 1))
    assert torch.equal(flipped[:, :1], masks["lip"].flip(-1)) and flipped[0, 0, 45, 64 - 1 - 30] == 1
    assert torch.equal(flipped[:, 1:], masks["eye"].flip(-1))
    with pytest.raises(DawnError, match="lip_box"):
        regions.loss({"source": source, "driving": source}, 0)
    with pytest.raises(DawnError, match="eye_box"):
        regions.loss({"source": source, "driving": source, "driving_lip_box": lip_boxes}, 0)


def test_vgg19_loads_a_torchvision_state_dict_and_rejects_others(tmp_path):
    from safetensors.torch import save_file

    from dawn.train.lfg import LFGObjective, PerceptualLoss, VGG19Features

    reference = VGG19Features()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    # torchvision's vgg19 has more layers (features.30+) and a classifier: those keys are ignored
    state.update({"features.30.weight": torch.zeros(512, 512, 3, 3), "classifier.0.weight": torch.zeros(4, 4)})
    torch.save(state, tmp_path / "vgg19.pth")
    loaded = VGG19Features.from_file(tmp_path / "vgg19.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())
    image = torch.rand(1, 3, 32, 32)
    taps = loaded(image)
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512] and taps[-1].shape[-1] == 2
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(DawnError, match="not a torchvision vgg19"):
        VGG19Features.from_file(tmp_path / "partial.safetensors")
    with pytest.raises(DawnError, match="not found"):
        VGG19Features.from_file(tmp_path / "missing.pth")
    config = TrainConfig(model="lfg", data="unused", vgg19=str(tmp_path / "vgg19.pth"))
    objective = LFGObjective(config, torch.device("cpu"))
    assert objective.uses_vgg and isinstance(objective.reconstruction, PerceptualLoss)
    assert objective.reconstruction.pyramid.scales == (1.0, 0.5)  # 64 px: 16 and 8 px are too small for VGG


def test_random_tps_jacobian_and_identity():
    from dawn.train.lfg import RandomTPS

    tps = RandomTPS(2, 0.05, 0.005, 5, "cpu", generator=torch.Generator().manual_seed(0))
    points = torch.rand(2, 7, 2) * 2 - 1
    full = torch.autograd.functional.jacobian(tps, points)  # (2, 7, 2, 2, 7, 2)
    expected = torch.stack([torch.stack([full[b, n, :, b, n, :] for n in range(7)]) for b in range(2)])
    torch.testing.assert_close(tps.jacobian(points), expected, atol=1e-5, rtol=1e-4)
    identity = RandomTPS(1, 0.0, 0.0, 5, "cpu")
    image = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(identity.warp_image(image), image, atol=1e-5, rtol=0)


def test_pbnet_losses_kl_schedule_and_discriminator_isolation():
    from dawn.train.pbnet import PBNetObjective, kl_weight

    assert [kl_weight(s, 1600) for s in (0, 399)] == [0.0, 0.0]  # A.2: no KL for the first 400 of 1600
    assert kl_weight(1599, 1600) == pytest.approx(0.01)
    assert kl_weight(999, 1600) == pytest.approx(0.01 * 599 / 1199)  # linear ramp 400 -> 1599
    torch.manual_seed(0)
    config = TrainConfig(model="pbnet_blink", data="unused", batch_size=2, lr=1e-3, steps=100,
                         objective_options={"window": 24})
    objective = PBNetObjective(config, torch.device("cpu"))
    t = torch.linspace(0, 6, 24)
    eyes = torch.stack([0.3 + 0.05 * torch.sin(t), 0.3 + 0.05 * torch.cos(t)], -1)
    batch = {"x": eyes[None].repeat(2, 1, 1), "audio": torch.randn(2, 24, 1024),
             "mask": torch.tensor([[True] * 24, [True] * 18 + [False] * 6])}
    before = [p.clone() for p in objective.discriminator.parameters()]
    losses = fit(objective, batch, 10)
    assert all(np.isfinite(v) for l in losses for v in l.values())
    assert np.mean([l["rec"] for l in losses[-3:]]) < losses[0]["rec"]  # the GAN term makes it bumpy
    assert losses[0]["kl_weight"] == 0.0 and {"kl", "gan", "d_loss"} <= set(losses[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.discriminator.parameters()))
    assert all(p.requires_grad for p in objective.discriminator.parameters())
    # the generator step sends no gradient into the discriminator
    out, valid = objective._forward(batch)
    objective.discriminator.requires_grad_(False)
    objective.generator_loss(out, valid, 0)["loss"].backward()
    objective.discriminator.requires_grad_(True)
    assert all(p.grad is None for p in objective.discriminator.parameters())


def test_pbnet_latent_scale_is_fitted_only_when_asked_and_exported(tmp_path):
    from dawn.checkpoint import load_model
    from dawn.train.pbnet import LATENT_SCALE_FIT_BATCHES, PBNetObjective

    torch.manual_seed(0)
    t = torch.linspace(0, 6, 24)[None, :, None]
    pose = torch.cat([10 * torch.sin(t + torch.arange(3.0)[None, None]), torch.ones(1, 24, 1),
                      torch.zeros(1, 24, 2)], -1).repeat(2, 1, 1)
    batch = {"x": pose, "audio": torch.randn(2, 24, 1024), "mask": torch.ones(2, 24, dtype=torch.bool)}
    plain = PBNetObjective(TrainConfig(model="pbnet_pose", data="unused", preset="tiny"), torch.device("cpu"))
    assert plain.fit_batches == 0 and plain.fit_to_data([batch]) == {}  # the paper's prior: nothing fitted
    assert plain.pbnet.config.latent_scale == 1.0
    config = TrainConfig(model="pbnet_pose", data="unused", preset="tiny", objective_options={"fit_latent_scale": True})
    objective = PBNetObjective(config, torch.device("cpu"))
    assert objective.fit_batches == LATENT_SCALE_FIT_BATCHES
    fitted = objective.fit_to_data([batch])
    assert set(fitted) == {"latent_scale"} and fitted["latent_scale"] != 1.0
    objective.export(tmp_path, {})
    assert load_model(tmp_path, "pbnet_pose").config.latent_scale == fitted["latent_scale"]  # in the JSON config


@pytest.fixture
def tiny_lfg_dir(tmp_path):
    from dawn.models.lfg import LFG, LFGConfig

    torch.manual_seed(0)
    save_model(LFG(LFGConfig.preset("tiny")), tmp_path / "lfg", "lfg")
    return tmp_path / "lfg"


def toy_rows(frames=44):
    from dawn.data.schema import decode_row, encode_segment
    from dawn.train.toy_shards import toy_video

    arrays = toy_video(np.random.default_rng(0), frames, 64, np.random.default_rng(1).standard_normal(1024))
    segment = {"video_id": "v", "identity": "i", "split": "train", "source_path": "toy", "segment": 0,
               "start_frame": 0, "num_frames": frames, "resolution": 64, **arrays}
    return [decode_row(encode_segment(segment))]


def test_a2v_loss_goes_down_on_lfg_targets(tiny_lfg_dir):
    from dawn.train.a2v import A2VObjective

    torch.manual_seed(0)
    config = TrainConfig(model="a2v", data="unused", lfg=str(tiny_lfg_dir), batch_size=1, lr=2e-3,
                         overfit_batches=1)
    objective = A2VObjective(config, torch.device("cpu"))
    batch = next(iter(objective.batches(toy_rows(), np.random.default_rng(0))))
    assert batch["frames"].shape == (1, 3, 20, 64, 64)  # stage 1: K' = 20
    x0 = objective.motion_targets(batch["frames"], batch["source"])
    assert x0.shape == (1, 3, 20, 16, 16) and x0[:, 2].abs().max() <= 1
    flow, occlusion = objective.lfg.flow_targets(batch["source"], batch["frames"][:, :, 7])
    torch.testing.assert_close(x0[:, :2, 7], flow.permute(0, 3, 1, 2))
    torch.testing.assert_close(x0[:, 2:, 7], 2 * occlusion - 1)
    lfg_before = {k: v.clone() for k, v in objective.lfg.state_dict().items()}
    losses = fit(objective, batch, 4)
    assert all(np.isfinite(l["loss"]) for l in losses) and losses[-1]["loss"] < losses[0]["loss"]
    assert losses[0]["lip_mse"] > 0 and losses[0]["clip_frames"] == 20
    assert all(torch.equal(v, objective.lfg.state_dict()[k]) for k, v in lfg_before.items())  # frozen


def test_a2v_eye_term_adds_the_eye_boxes_error(tiny_lfg_dir):
    from dawn.train.a2v import A2VObjective

    def objective(**options):
        torch.manual_seed(0)  # the same initial weights
        config = TrainConfig(model="a2v", data="unused", lfg=str(tiny_lfg_dir), batch_size=1, overfit_batches=1,
                             objective_options=options)
        return A2VObjective(config, torch.device("cpu"))

    plain, eyes = objective(), objective(w_eye=5.0)
    batch = next(iter(plain.batches(toy_rows(), np.random.default_rng(0))))
    assert batch["eye_box"].shape == (1, 20, 6)
    with torch.no_grad():
        base, weighted = plain.loss(batch, 0), eyes.loss(batch, 0)  # the same noise: overfit_batches
    assert "eye_mse" not in base and weighted["eye_mse"] > 0
    torch.testing.assert_close(weighted["lip_mse"], base["lip_mse"])
    torch.testing.assert_close(weighted["loss"], base["loss"] + 5.0 * weighted["eye_mse"])
    # the term covers the eye boxes' latent cells only: moving the boxes changes it
    moved = dict(batch, eye_box=batch["eye_box"] + torch.tensor([0.0, 0.0, 20.0, 20.0, 0.0, 0.0]))
    with torch.no_grad():
        assert not torch.isclose(eyes.loss(moved, 0)["eye_mse"], weighted["eye_mse"])


def test_a2v_stage2_clips_and_condition_dropout(tiny_lfg_dir):
    from dawn.train.a2v import A2VObjective

    config = TrainConfig(model="a2v", data="unused", stage=2, lfg=str(tiny_lfg_dir), init_from=str(tiny_lfg_dir),
                         batch_size=1)
    with pytest.raises(DawnError, match="a2v.json"):
        A2VObjective(config, torch.device("cpu"))  # init_from must hold an A2V-FDM
    objective = A2VObjective(TrainConfig(model="a2v", data="unused", lfg=str(tiny_lfg_dir), batch_size=1),
                             torch.device("cpu"))
    objective.config.stage = 2
    rng = np.random.default_rng(0)
    lengths = {b["num_frames"] for _ in range(8) for b in objective.batches(toy_rows(), rng)}
    assert lengths <= set(range(30, 41)) and len(lengths) > 1
    batch = next(iter(objective.batches(toy_rows(), rng)))
    cond = objective.condition(batch, 0.5, torch.Generator().manual_seed(0))
    dropped = (cond == 0).all(-1)
    assert cond.shape[-1] == 1032 and 0 < dropped.sum() < dropped.numel()
    torch.testing.assert_close(cond[~dropped][:, 1024:1030], batch["pose_delta"][~dropped])


def test_box_mask_matches_face_mask_rule():
    from dawn.models.unet3d import A2VFDM, A2VConfig
    from dawn.train.objective import box_mask

    boxes = torch.tensor([[10.0, 30.0, 20.0, 50.0, 64.0, 64.0], [0.0, 63.0, 0.0, 63.0, 64.0, 64.0]])
    mask = box_mask(boxes, 16)
    assert mask.shape == (2, 16, 16)
    assert not box_mask(torch.zeros(3, 6), 16).any()  # frames without a face: empty masks
    assert mask[0].nonzero()[:, 0].tolist()[0] == 5 and mask[0].nonzero()[:, 1].min() == 2  # rows y, cols x
    assert mask[1].all()
    a2v = A2VFDM(A2VConfig.preset("tiny"))
    torch.testing.assert_close(mask, a2v.face_mask(boxes, 16)[:, 0])  # square images: same rule


def test_lr_schedule_and_deepspeed_config(tmp_path):
    config = TrainConfig(model="lfg", data="unused", steps=100, warmup_steps=10, lr_min_ratio=0.1)
    assert lr_multiplier(0, config) == pytest.approx(0.1) and lr_multiplier(9, config) == pytest.approx(1.0)
    assert lr_multiplier(10, config) == pytest.approx(1.0) and lr_multiplier(100, config) == pytest.approx(0.1)
    assert lr_multiplier(55, config) == pytest.approx(0.55)
    constant = TrainConfig(model="lfg", data="unused", lr_schedule="constant")
    assert lr_multiplier(500, constant) == 1.0
    cpu = deepspeed_config(TrainConfig(model="lfg", data="unused", batch_size=3, grad_accum=2), on_gpu=False)
    assert cpu["zero_optimization"]["stage"] == 2 and not cpu["torch_autocast"]["enabled"]
    assert cpu["train_micro_batch_size_per_gpu"] == 3 and cpu["gradient_accumulation_steps"] == 2
    assert deepspeed_config(TrainConfig(model="lfg", data="unused"), on_gpu=True)["torch_autocast"]["enabled"]
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1}, "train_batch_size": 99}')
    user = deepspeed_config(TrainConfig(model="lfg", data="unused", deepspeed_config=str(path)).resolved(), False)
    assert user["zero_optimization"]["stage"] == 1 and "train_batch_size" not in user
    path.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(DawnError, match="optimizer"):
        deepspeed_config(TrainConfig(model="lfg", data="unused", deepspeed_config=str(path)).resolved(), False)
    with pytest.raises(DawnError, match="--lfg"):
        TrainConfig(model="a2v", data="unused")
    resolved = TrainConfig(model="a2v", data="d", stage=2, lfg="l", init_from="s1", storage_path=str(tmp_path)).resolved()
    assert resolved.run_name == "a2v-s2-tiny" and resolved.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolved.export_dir == str(tmp_path / "a2v-s2-tiny" / "export")


def test_batch_feed_overfit_cycles_and_empty_data_fails():
    from dawn.train.loop import _BatchFeed

    passes = []

    def make():
        passes.append(1)
        return iter([{"i": 0}, {"i": 1}, {"i": 2}])

    feed = _BatchFeed(make, overfit_batches=2)
    assert [feed.next()[0]["i"] for _ in range(5)] == [0, 1, 0, 1, 0]
    streaming = _BatchFeed(make)
    assert [streaming.next()[0]["i"] for _ in range(4)] == [0, 1, 2, 0]  # a new pass when one ends
    assert streaming.next(stop=True) == (None, True)
    with pytest.raises(DawnError, match="no batch"):
        _BatchFeed(lambda: iter([])).next()


def test_cached_row_passes_replay_the_first_complete_pass_in_new_orders():
    from dawn.train.loop import RowPasses

    streamed = []

    def stream():
        streamed.append(1)
        return iter([{"i": i} for i in range(6)])

    rows = RowPasses(stream, cache=True, rng=np.random.default_rng(0))
    partial = rows.next_pass()
    assert next(partial)["i"] == 0 and rows.rows is None  # an interrupted pass caches nothing
    orders = [[r["i"] for r in rows.next_pass()] for _ in range(4)]
    assert len(streamed) == 2 and orders[0] == list(range(6))  # streamed until one pass completed
    assert all(sorted(o) == list(range(6)) for o in orders[1:]) and len({tuple(o) for o in orders[1:]}) > 1
    uncached = RowPasses(stream, cache=False, rng=np.random.default_rng(0))
    assert [[r["i"] for r in uncached.next_pass()] for _ in range(2)] == [list(range(6))] * 2
    assert len(streamed) == 4 and uncached.rows is None


def test_job_flags_build_the_config():
    import argparse

    from dawn.train.config import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, model_flags=("stage", "lfg"))
    args = parser.parse_args(["--data", "shards", "--preset", "hdtf128", "--stage", "2", "--lfg", "ckpt",
                              "--init-from", "s1", "--num-workers", "8", "--use-gpu", "--zero-stage", "3",
                              "--dtype", "bf16", "--steps", "50", "--lr-schedule", "constant", "--max-minutes", "90",
                              "--cache-rows", "--options", '{"w_lip": 2.0}'])
    config = from_arguments(args, "a2v")
    assert (config.model, config.stage, config.preset, config.lfg, config.init_from) == ("a2v", 2, "hdtf128", "ckpt", "s1")
    assert (config.num_workers, config.use_gpu, config.zero_stage, config.dtype) == (8, True, 3, "bf16")
    assert (config.steps, config.lr_schedule, config.max_minutes, config.cache_rows) == (50, "constant", 90.0, True)
    assert config.objective_options == {"w_lip": 2.0}
    with pytest.raises(DawnError, match="--options"):
        from_arguments(parser.parse_args(["--data", "d", "--lfg", "l", "--options", "{bad"]), "a2v")
    from dawn.train.pbnet import PBNetObjective

    with pytest.raises(DawnError, match="bogus"):
        PBNetObjective.parse_options(TrainConfig(model="pbnet_pose", data="d", objective_options={"bogus": 1}))
