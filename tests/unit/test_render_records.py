"""The records every render entry point shares: RenderOptions checks itself, RenderState crosses processes as
bytes without pickles, and the model registry builds networks that fit together."""

import dataclasses

import numpy as np
import pytest

from dawn import DawnError
from dawn.pipeline import STAGES, Media, Motion, OptionError, Portrait, RenderOptions, RenderState


def test_options_check_themselves_with_one_line_reasons():
    assert RenderOptions() == RenderOptions(steps=20, eta=1.0, seed=0, sampler="ddim", crop="face")
    for changes, message in (
            ({"eta": 7}, "eta must be between 0 and 1, got 7"),
            ({"eta": float("nan")}, "eta must be between 0 and 1, got nan"),
            ({"steps": 0}, "steps must be at least 1, got 0"),
            ({"sampler": "euler"}, "sampler must be one of ddim, dpm-solver++, got 'euler'"),
            ({"crop": "chin"}, "crop must be one of face, none, got 'chin'"),
            ({"seed": -3}, "seed must be between 0 and 2**63 - 1, got -3"),
            ({"steps": 2.5}, "steps must be an integer, got 2.5"),
            ({"steps": True}, "steps must be an integer, got True"),
            ({"decode_batch": 0}, "decode_batch must be at least 1, got 0"),
            ({"motion_smoothing": -1}, "motion_smoothing must be between 0 and 10 frames, got -1")):
        with pytest.raises(OptionError) as info:
            RenderOptions(**changes)
        assert str(info.value) == message and "\n" not in str(info.value)
    assert isinstance(OptionError("x"), DawnError)  # every entry point reports DawnErrors as user errors


def test_options_from_text_fields_replace_a_base():
    base = RenderOptions(steps=7, eta=0.0)
    got = RenderOptions.from_fields({"seed": " 5 ", "eta": "", "sampler": "dpm-solver++", "id": "row-1"}, base=base)
    assert got == RenderOptions(steps=7, eta=0.0, seed=5, sampler="dpm-solver++")
    assert RenderOptions.from_fields({"steps": np.int64(3)}).steps == 3  # numbers from a parsed table
    with pytest.raises(OptionError, match=r"^seed must be an integer, got 'x'$"):
        RenderOptions.from_fields({"seed": "x"})
    with pytest.raises(OptionError, match=r"^eta must be a number, got 'high'$"):
        RenderOptions.from_fields({"eta": "high"})
    with pytest.raises(OptionError, match=r"^eta must be between 0 and 1, got 7$"):
        RenderOptions.from_fields({"eta": "7"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.steps = 1
    for text, flag in (("true", True), ("1", True), ("On", True), ("false", False), ("0", False), ("no", False)):
        assert RenderOptions.from_fields({"paste_back": text}).paste_back is flag
    with pytest.raises(OptionError, match=r"^paste_back must be true or false, got 'maybe'$"):
        RenderOptions.from_fields({"paste_back": "maybe"})
    with pytest.raises(OptionError, match=r"^max_side must be at least 16, got 8$"):
        RenderOptions(max_side=8)


def test_state_round_trips_through_bytes_without_pickles():
    rng = np.random.default_rng(0)
    portrait = Portrait(image=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), pose=rng.normal(size=6).astype(np.float32),
                        eyes=np.float32([0.3, 0.31]), face_box=np.float32([1, 6, 1, 6, 8, 8]),
                        crop_box=np.int64([10, 20, 110, 120]))
    state = RenderState(options=RenderOptions(steps=3, seed=9, crop="none"), name="clip",
                        inputs={"portrait": Media.from_path("portrait", "/data/p.png"),
                                "audio": Media(role="audio", name="s.wav", data=b"RIFF...")},
                        waveform=rng.normal(size=1600).astype(np.float32), portrait=portrait,
                        hubert=rng.normal(size=(2, 1024)).astype(np.float32),
                        motion=Motion(pose=np.zeros((2, 6), np.float32), eyes=np.zeros((2, 2), np.float32)),
                        notes=["2 faces: the largest is used"], timings={"inputs": 0.5})
    data = state.to_bytes()
    assert b"pickle" not in data[:200]
    again = RenderState.from_bytes(data)
    assert again.options == state.options and again.name == "clip" and again.notes == state.notes
    assert again.timings == {"inputs": 0.5} and again.num_frames == 2
    assert again.inputs["portrait"].path == "/data/p.png" and again.inputs["audio"].data == b"RIFF..."
    for name in ("image", "pose", "eyes", "face_box", "crop_box"):
        np.testing.assert_array_equal(getattr(again.portrait, name), getattr(portrait, name))
    np.testing.assert_array_equal(again.hubert, state.hubert)
    np.testing.assert_array_equal(again.motion.pose, state.motion.pose)
    assert again.frames is None and again.pose_track is None and again.image is None
    assert STAGES == ("inputs", "features", "motion", "frames")


def test_registry_builds_the_presets_and_every_checkpoint_class():
    from dawn.checkpoint import MODEL_CLASSES
    from dawn.config import MODELS, PRESETS, build_models, model_spec, preset_configs

    assert set(MODELS) == {"lfg", "a2v", "pbnet_pose", "pbnet_blink"}
    assert set(MODEL_CLASSES) == {"LFG", "A2VFDM", "PBNet", "PatchDiscriminator1d"}
    for preset in PRESETS:
        configs = preset_configs(preset)
        assert configs["a2v"].source_channels == configs["lfg"].latent_channels
        assert configs["a2v"].image_size == configs["lfg"].image_size
        assert (configs["pbnet_pose"].kind, configs["pbnet_blink"].kind) == ("pose", "blink")
    models = build_models("hdtf128", device="meta")
    assert models["a2v"].config.latent_size * 4 == models["lfg"].config.image_size == 128
    assert model_spec("pbnet_blink").objective_class().__name__ == "PBNetObjective"
    with pytest.raises(DawnError, match="unknown model"):
        model_spec("gan")
    with pytest.raises(DawnError, match="unknown preset"):
        MODELS["lfg"].preset_config("huge")


def test_saved_configs_hold_no_benchmark_fields_and_old_ones_still_load(tmp_path):
    """The reference-attention switch is a runtime choice: not in A2VConfig, and a checkpoint written with
    the old `reference_mode` field still loads."""
    import json

    from dawn.checkpoint import load_model, save_model
    from dawn.config import build_models
    from dawn.models.unet3d import A2VConfig

    assert "reference_mode" not in {f.name for f in dataclasses.fields(A2VConfig)}
    a2v = build_models("tiny")["a2v"]
    save_model(a2v, tmp_path, "a2v")
    meta = json.loads((tmp_path / "a2v.json").read_text())
    meta["config"]["reference_mode"] = False
    (tmp_path / "a2v.json").write_text(json.dumps(meta))
    assert load_model(tmp_path, "a2v").config == a2v.config
    assert not a2v.unet.reference_attention and a2v.use_reference_attention().unet.reference_attention


def test_production_training_config_has_no_test_hooks():
    from dawn.train.config import TrainConfig

    assert not {"fail_at_step", "reference_mode"} & {f.name for f in dataclasses.fields(TrainConfig)}


def test_motion_smoothing_filters_flows_over_time_only():
    """A Gaussian along T: constants and straight lines stay (up to the reflected ends), frame-to-frame
    noise shrinks by about the filter's gain, and nothing leaks between channels or pixels."""
    import torch

    from dawn.pipeline import smooth_over_time

    torch.manual_seed(0)
    t = torch.arange(40, dtype=torch.float32)
    ramp = t.view(1, 1, -1, 1, 1).expand(2, 3, 40, 4, 4).clone()
    smoothed = smooth_over_time(ramp, 1.25)
    assert smoothed.shape == ramp.shape
    torch.testing.assert_close(smoothed[:, :, 4:-4], ramp[:, :, 4:-4], atol=1e-4, rtol=0)  # a line is kept
    noise = torch.randn(1, 3, 400, 2, 2)
    gain = float(smooth_over_time(noise, 1.25).std() / noise.std())
    assert 0.4 < gain < 0.55  # white noise through a Gaussian of sigma 1.25: sqrt(1 / (2 sqrt(pi) 1.25)) = 0.48
    spike = torch.zeros(1, 2, 21, 2, 2)
    spike[0, 0, 10, 1, 1] = 1.0
    out = smooth_over_time(spike, 1.0)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5) and float(out[0, 1].abs().max()) == 0.0
    assert float(out[0, 0, :, 0, 0].abs().max()) == 0.0 and float(out[0, 0, 10, 1, 1]) == pytest.approx(0.399, abs=2e-3)
