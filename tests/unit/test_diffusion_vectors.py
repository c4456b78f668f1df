"""The unet_small reference vector, every stored output: face-box mask and encoder, one A2V-FDM U-Net forward at
two window sizes, 3-step DDIM with stored noise; the network built from the sidecar's config."""

import dataclasses
import re

import pytest
import torch

from dawn.adapters.a2v import from_reference
from dawn.models.diffusion import ddim_sample
from dawn.models.unet3d import A2VConfig, A2VFDM

# Switches of the reference U-Net that dawn's A2V-FDM hard-wires (a vector with other values cannot be built).
FIXED_UNET = {"use_sparse_linear_attn": True, "use_deconv": True, "use_final_activation": False,
              "learn_null_cond": False, "padding_mode": "zeros", "out_grid_dim": 2, "out_conf_dim": 1}
SCHEDULE = "cosine, s=0.008"  # dawn.models.diffusion.CosineSchedule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def a2v_config(config: dict) -> A2VConfig:
    """A2VConfig from the unet_small sidecar's `config` (reference hyper-parameter names)."""
    unet, diffusion = config["unet"], config["diffusion"]
    assert {k: unet[k] for k in FIXED_UNET} == FIXED_UNET
    assert diffusion["schedule"] == SCHEDULE and diffusion["image_size"] == config["latent_hw"]
    assert unet["rotary_dim"] == unet["attn_dim_head"]  # RoPE over each whole temporal-attention head
    assert unet["cond_dim"] == unet["cond_aud"] + unet["cond_pose"] + unet["cond_eye"]
    defaults = A2VConfig()
    return A2VConfig(
        image_size=4 * config["latent_hw"], dim=unet["dim"], dim_mults=tuple(unet["dim_mults"]),
        source_channels=unet["channels"] - defaults.motion_channels - defaults.face_channels,
        cond_audio=unet["cond_aud"], cond_pose=unet["cond_pose"], cond_eye=unet["cond_eye"],
        heads=unet["attn_heads"], dim_head=unet["attn_dim_head"], cross_heads=unet["cross_attention"]["heads"],
        cross_dim_head=unet["cross_attention"]["dim_head"], cross_scale=unet["cross_attention"]["scale"],
        init_kernel=unet["init_kernel_size"], groups=unet["resnet_groups"],
        rel_pos_buckets=unet["time_rel_pos_bias"]["num_buckets"],
        rel_pos_max_distance=unet["time_rel_pos_bias"]["max_distance"],
        timesteps=diffusion["timesteps"], window=unet["win_width"],
    )  # fmt: skip


def call_window(meta: dict, output: str) -> int:
    """The temporal window width of the call that produced `output` (stated in the sidecar's `calls`)."""
    calls = [c for c in meta["calls"] if c.startswith(output)]
    found = re.search(r"window_width=(\d+)", calls[0]) if calls else None
    assert found, f"no window_width in the sidecar call for {output}"
    return int(found[1])


@pytest.fixture(scope="module")
def vector(reference_vector):
    return reference_vector("unet_small")


@pytest.fixture(scope="module")
def model(vector):
    config = a2v_config(vector.config)
    model = A2VFDM(config)
    model.load_state_dict(from_reference(vector.weights, config))
    return model.eval()


def variant(model: A2VFDM, **changes) -> A2VFDM:
    """The same weights under a changed config."""
    other = A2VFDM(dataclasses.replace(model.config, **changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_reference_vector(vector, model):
    config, meta = vector.config, vector.meta
    got = {}

    # face-box mask at 4x the latent size, the reference's (x/H, y/W) convention and the corrected one
    bbox, size = vector.input("bbox")[..., 0], config["image_size_for_face_mask"]  # stored (B, 6, 1)
    reference_convention = variant(model, reference_bbox_convention=True)
    got["face.bbox_mask"] = reference_convention.face_mask(bbox, size)
    got["face.bbox_mask_corrected_xW_yH"] = model.face_mask(bbox, size)
    with torch.no_grad():
        got["face.embedding"] = model.face_encoder(got["face.bbox_mask"])
        features = reference_convention.source_features(vector.input("z_src"), bbox)
    assert torch.equal(got["face.bbox_mask"], vector.output("face.bbox_mask"))  # 0/1 masks: exact
    assert torch.equal(got["face.bbox_mask_corrected_xW_yH"], vector.output("face.bbox_mask_corrected_xW_yH"))
    assert torch.equal(features[:, : model.config.source_channels], vector.input("z_src"))
    assert torch.equal(features[:, model.config.source_channels :], got["face.embedding"])

    # one U-Net forward (with the stored embedding, as the reference call) at the config's window and a small one
    features = torch.cat([vector.input("z_src"), vector.output("face.embedding")], dim=1)
    for output, network in (("unet.eps_win", model),
                            ("unet.eps_smallwin", variant(model, window=call_window(meta, "unet.eps_smallwin")))):
        with torch.no_grad():
            got[output] = network(vector.input("x_t"), vector.input("t"), features, vector.input("cond"))

    # DDIM with the stored noise (x_T first, then one draw per step whose next time is > 0)
    steps_seen = []

    def recorded(x_t, t):
        i = len(steps_seen)
        steps_seen.append(t.tolist())
        got[f"ddim.step{i}.x_in"] = x_t
        got[f"ddim.step{i}.eps"] = eps = denoise(x_t, t)
        return eps

    diffusion = config["diffusion"]
    batch = config["batch_ddim"]
    features = torch.cat([vector.input("ddim_z_src"), vector.output("face.embedding")[:batch]], dim=1)
    denoise = model.denoiser(features, vector.input("ddim_cond"))
    noise = vector.input("ddim_noise")
    got["ddim.sample"] = ddim_sample(model.schedule, recorded, tuple(noise.shape[1:]),
                                     steps=diffusion["sampling_timesteps"], eta=diffusion["ddim_sampling_eta"],
                                     noise=noise, dynamic_threshold=diffusion["use_dynamic_thres"],
                                     percentile=diffusion["dynamic_thres_percentile"], clip=model.clip_samples)
    assert steps_seen == [[t] * batch for t in meta["ddim"]["timesteps_fed_to_unet"]]
    vector.check_outputs(got)
