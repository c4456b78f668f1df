"""The DDIM part of the unet_small reference vector: A2V-FDM U-Net + 3-step DDIM with stored noise."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dawn.adapters.a2v import from_reference, infer_config
from dawn.models.diffusion import ddim_sample
from dawn.models.unet3d import A2VFDM


@pytest.fixture(scope="module")
def vector(reference_dir):
    tensors = load_file(str(reference_dir / "vectors" / "unet_small.safetensors"))
    meta = json.loads((reference_dir / "vectors" / "unet_small.json").read_text())
    return tensors, meta


def test_ddim_three_steps_match_reference(vector):
    tensors, meta = vector
    atol = meta["tolerance"]["recommended_atol_float32"]
    state = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    config = infer_config(state, image_size=4 * meta["config"]["latent_hw"])
    model = A2VFDM(config)
    model.load_state_dict(from_reference(state, config))
    model.eval()

    # the sampler's U-Net input: [x_t, z_src, face embedding] (the embedding as the reference computed it)
    features = torch.cat([tensors["input.ddim_z_src"], tensors["output.face.embedding"][:1]], dim=1)
    denoise = model.denoiser(features, tensors["input.ddim_cond"])
    steps_seen = []

    def checked(x_t, t):
        i = len(steps_seen)
        steps_seen.append(t.tolist())
        torch.testing.assert_close(x_t, tensors[f"output.ddim.step{i}.x_in"], rtol=0,
                                   atol=atol[f"ddim.step{i}.x_in"])
        eps = denoise(x_t, t)
        torch.testing.assert_close(eps, tensors[f"output.ddim.step{i}.eps"], rtol=0,
                                   atol=atol[f"ddim.step{i}.eps"])
        return eps

    shape = tuple(tensors["output.ddim.sample"].shape)  # (1, 3, T, L, L)
    sample = ddim_sample(model.schedule, checked, shape, steps=meta["config"]["diffusion"]["sampling_timesteps"],
                         eta=meta["config"]["diffusion"]["ddim_sampling_eta"],
                         noise=tensors["input.ddim_noise"])
    assert steps_seen == [[t] for t in meta["ddim"]["timesteps_fed_to_unet"]]
    torch.testing.assert_close(sample, tensors["output.ddim.sample"], rtol=0, atol=atol["ddim.sample"])
    assert sample.abs().max() <= 1
