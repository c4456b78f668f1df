"""The fast render path computes what the reference's way of rendering computes.

- Sampling: `RenderPipeline.sample_flows` (U-Net prepared once per render, local temporal attention in
  blocks) equals DDIM run step by step with the plain forward of a reference-mode U-Net (explicit T x T
  logits with the window mask, nothing precomputed) holding the same weights, on the noise the pipeline
  documents (x_T, then one draw per noise-adding step, from a generator seeded with the render's seed).
- Decoding: the batched LFG decode (source encoded once) equals decoding frame by frame with the source
  encoded again for every frame, as the official code does.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from dawn.models.diffusion import ddim_sample, ddim_timesteps
from dawn.models.lfg import LFG, LFGConfig
from dawn.models.unet3d import A2VFDM, A2VConfig
from dawn.pipeline import Motion, Portrait, RenderOptions, RenderPipeline

FRAMES = 48  # > block 16 + 2 x window 4: local attention takes its blocked (windowed) path
WINDOW = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    lfg = LFG(LFGConfig.preset("tiny")).eval()
    config = dataclasses.replace(A2VConfig.preset("tiny"), window=WINDOW, source_channels=lfg.config.latent_channels)
    a2v = A2VFDM(config).eval()
    return lfg, a2v


def reference_unet(a2v: A2VFDM, **changes) -> A2VFDM:
    reference = A2VFDM(dataclasses.replace(a2v.config, **changes)).use_reference_attention().eval()
    reference.load_state_dict(a2v.state_dict())
    return reference


@pytest.fixture(scope="module")
def inputs(astronaut):
    import cv2

    rng = np.random.default_rng(1)
    image = cv2.resize(astronaut[20:320, 120:420], (64, 64), interpolation=cv2.INTER_AREA)
    portrait = Portrait(image=image, pose=np.array([0, 0, 0, 1, 0, 0], np.float32), eyes=np.full(2, 0.3, np.float32),
                        face_box=np.array([16, 48, 10, 52, 64, 64], np.float32))
    motion = Motion(pose=portrait.pose + np.cumsum(rng.normal(0, 0.1, (FRAMES, 6)), 0).astype(np.float32),
                    eyes=(0.3 + 0.05 * rng.standard_normal((FRAMES, 2))).astype(np.float32))
    return portrait, rng.standard_normal((FRAMES, 1024)).astype(np.float32), motion


def sample_reference_way(pipeline: RenderPipeline, reference: A2VFDM, portrait, hubert, motion, options):
    """DDIM with the plain forward of `reference` at every step, on the pipeline's documented noise."""
    cond = pipeline.condition(portrait, hubert, motion)
    box = torch.as_tensor(portrait.face_box)[None]
    features = reference.source_features(pipeline.lfg.source_latent(pipeline.source_tensor(portrait)), box)
    shape = (1, 3, FRAMES, 16, 16)
    generator = torch.Generator().manual_seed(options.seed)
    draws = 1 + sum(t_next > 0 for _, t_next in ddim_timesteps(options.steps))
    noise = [torch.randn(shape, generator=generator) for _ in range(draws)]
    with torch.no_grad():
        return ddim_sample(reference.schedule, lambda x, t: reference(x, t, features, cond), shape,
                           steps=options.steps, eta=options.eta, noise=noise)


def test_sampling_equals_the_reference_way(models, inputs):
    lfg, a2v = models
    pipeline = RenderPipeline(lfg=lfg, a2v=a2v)
    options = RenderOptions(steps=2, seed=5)
    flows = pipeline.sample_flows(*inputs, options)
    expected = sample_reference_way(pipeline, reference_unet(a2v), *inputs, options)
    assert flows.shape == (1, 3, FRAMES, 16, 16)
    assert (flows - expected).abs().max().item() < 1e-4
    # the comparison sees the window: the same weights without it sample something else
    unwindowed = sample_reference_way(pipeline, reference_unet(a2v, window=None), *inputs, options)
    assert (flows - unwindowed).abs().max().item() > 1e-2


def test_channels_last_weights_are_opt_in_and_render_the_same(models, inputs):
    """The constructor leaves a caller's model as it is (it may still be training under DeepSpeed);
    `use_channels_last` (what the checkpoint loaders call) converts the conv weights and samples the same."""
    lfg, a2v = models
    a2v = copy.deepcopy(a2v)
    weight = next(p for p in a2v.unet.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    options = RenderOptions(steps=2, seed=5)
    plain = RenderPipeline(lfg=lfg, a2v=a2v).sample_flows(*inputs, options)
    assert weight.is_contiguous()
    fast = RenderPipeline(lfg=lfg, a2v=a2v).use_channels_last()
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    torch.testing.assert_close(fast.sample_flows(*inputs, options), plain, rtol=0, atol=1e-5)


def test_offset_model_samples_unclipped_offsets_and_returns_grids(models, inputs):
    """A2VConfig.motion_target "offset": the pipeline samples without clipping and hands the decoder grids."""
    lfg, a2v = models
    offset = A2VFDM(dataclasses.replace(a2v.config, motion_target="offset")).eval()
    offset.load_state_dict(a2v.state_dict())
    pipeline, options = RenderPipeline(lfg=lfg, a2v=offset), RenderOptions(steps=2, seed=5)
    flows = pipeline.sample_flows(*inputs, options)
    shape = (1, 3, FRAMES, 16, 16)
    generator = torch.Generator().manual_seed(options.seed)
    noise = [torch.randn(shape, generator=generator) for _ in range(1 + sum(t > 0 for _, t in ddim_timesteps(2)))]
    cond = pipeline.condition(*inputs[:1], inputs[1], inputs[2])
    features = offset.source_features(lfg.source_latent(pipeline.source_tensor(inputs[0])),
                                      torch.as_tensor(inputs[0].face_box)[None])
    with torch.no_grad():
        motion = ddim_sample(offset.schedule, offset.denoiser(features, cond), shape, steps=2, noise=noise, clip=False)
    assert motion[:, :2].abs().max() > 1  # unclipped
    torch.testing.assert_close(flows, offset.flows_from_motion(motion), rtol=0, atol=1e-5)


def test_batched_decode_equals_per_frame_decode_with_the_source_encoded_again(models, inputs):
    lfg, _ = models
    portrait = inputs[0]
    pipeline = RenderPipeline(lfg=lfg)
    g = torch.Generator().manual_seed(2)
    frames = 10
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="xy"))
    flow_xy = (identity[:, None] + 0.2 * torch.randn(2, frames, 16, 16, generator=g)).clamp(-1, 1)
    occlusion = torch.rand(1, frames, 16, 16, generator=g)
    flows = torch.cat([flow_xy, 2 * occlusion - 1])[None]  # (1, 3, T, L, L) as A2V-FDM outputs it

    batched = pipeline.decode_frames(portrait, flows, batch_size=4)  # batches of 4, 4, 2

    source = pipeline.source_tensor(portrait)
    grids, masks = flow_xy.permute(1, 2, 3, 0), occlusion.transpose(0, 1)
    with torch.no_grad():
        per_frame = torch.cat([lfg.decode(lfg.encode_source(source), source, grids[i:i + 1], masks[i:i + 1])
                               for i in range(frames)])
        together = lfg.decode(lfg.encode_source(source), source, grids, masks)
    assert (together - per_frame).abs().max().item() < 1e-5
    expected = (per_frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert batched.shape == (frames, 64, 64, 3)
    assert np.abs(batched.astype(int) - expected).max() <= 1  # float rounding at .5 only
    assert (batched != expected).mean() < 1e-3
    assert len(np.unique(batched)) > 20  # real images, not a constant
