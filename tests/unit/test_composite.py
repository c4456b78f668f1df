"""Paste-back: the rendered head blended into the whole portrait, at its resolution, without a seam."""

import numpy as np
import pytest

from dawn.composite import blend_masks, output_size, paste_back


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from dawn.render import init_checkpoints

    return init_checkpoints(tmp_path_factory.mktemp("ckpt"), preset="tiny", seed=0)


@pytest.fixture(scope="module")
def textured_portrait(astronaut):
    """1024 x 768 (W x H): the astronaut's head on a textured background (stripes + fine noise)."""
    import cv2

    height, width = 768, 1024
    y, x = np.mgrid[:height, :width]
    stripes = 127 + 60 * np.sin(x / 9.0) * np.cos(y / 13.0)
    noise = np.random.default_rng(0).normal(0, 12, (height, width, 3))
    image = np.clip(stripes[..., None] + noise + np.array([10, -5, 20]), 0, 255).astype(np.uint8)
    head = cv2.resize(astronaut[:300, 100:400], (400, 400), interpolation=cv2.INTER_AREA)
    image[200:600, 300:700] = head
    return image


@pytest.fixture(scope="module")
def rendered(checkpoints, textured_portrait, speech_wav):
    """A real render of the textured portrait (tiny random checkpoints, 1 s of speech)."""
    from dawn.audio import load_audio
    from dawn.pipeline import RenderOptions, RenderPipeline, RenderState

    pipeline = RenderPipeline.from_checkpoints(checkpoints)
    state = RenderState(options=RenderOptions(steps=1, paste_back=True), image=textured_portrait,
                        waveform=load_audio(speech_wav)[8000:24000])
    return pipeline.render(state)


def _composite(state, **kwargs):
    box = tuple(int(v) for v in state.portrait.crop_box)
    return np.concatenate(list(paste_back(state.image, state.frames, state.portrait.image, box, 1920,
                                          face_box=state.portrait.face_box, **kwargs))), box


def test_output_size_keeps_the_portrait_and_caps_the_longer_side():
    assert output_size(768, 1024, 1920) == (768, 1024)
    assert output_size(3000, 4000, 1920) == (1440, 1920)
    assert output_size(767, 1023, 4000) == (768, 1024)  # even sides for H.264 4:2:0 (never upscaled beyond rounding)


def test_outside_the_crop_box_the_portrait_is_unchanged(rendered):
    composite, (x0, y0, x1, y1) = _composite(rendered)
    portrait = rendered.image
    assert composite.shape == (25, 768, 1024, 3)
    outside = np.ones((768, 1024), bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    assert outside.sum() > 0.5 * outside.size
    assert (composite[:, outside] == portrait[outside]).all()
    inside = composite[:, y0 + (y1 - y0) // 3:y1 - (y1 - y0) // 3, x0 + (x1 - x0) // 3:x1 - (x1 - x0) // 3]
    assert np.abs(inside.astype(int) - portrait[y0 + (y1 - y0) // 3:y1 - (y1 - y0) // 3,
                                                x0 + (x1 - x0) // 3:x1 - (x1 - x0) // 3]).mean() > 1  # the head is the render's


def _seam_gradient(frames: np.ndarray, box) -> float:
    """Mean |difference between neighbouring pixels| across the four edges of the box (the seam direction)."""
    x0, y0, x1, y1 = box
    f = frames.astype(np.float32)
    left = np.abs(f[:, y0:y1, x0] - f[:, y0:y1, x0 - 1])
    right = np.abs(f[:, y0:y1, x1] - f[:, y0:y1, x1 - 1])
    top = np.abs(f[:, y0, x0:x1] - f[:, y0 - 1, x0:x1])
    bottom = np.abs(f[:, y1, x0:x1] - f[:, y1 - 1, x0:x1])
    return float(np.mean([left.mean(), right.mean(), top.mean(), bottom.mean()]))


def test_no_seam_across_the_blend_band(rendered):
    composite, box = _composite(rendered)
    portrait = rendered.image[None]
    own = _seam_gradient(portrait, box)
    assert _seam_gradient(composite, box) <= own + 2.0
    # across the band (every line parallel to the edge, up to the band's width): no step larger than the
    # portrait's own texture plus a small bound
    x0, y0, x1, y1 = box
    band = int(0.2 * (x1 - x0))
    for inset in range(0, band, 4):
        inner = (x0 + inset, y0 + inset, x1 - inset, y1 - inset)
        assert _seam_gradient(composite, inner) <= _seam_gradient(portrait, inner) + 6.0, inset
    # the measure sees seams: the crop pasted with a hard edge fails it
    import cv2

    hard = composite.copy()
    hard[:, y0:y1, x0:x1] = np.stack([cv2.resize(f, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
                                      for f in rendered.frames])
    assert _seam_gradient(hard, box) > own + 6.0


def test_the_mask_follows_the_moving_head():
    """Where a frame differs from the source crop, the mask reaches nearer to the crop's edge."""
    import torch

    source = torch.full((1, 3, 64, 64), 0.5)
    still = source.clone()
    moved = source.clone()
    moved[:, :, 20:44, 2:30] = 0.9  # the head swung to the left edge
    masks = blend_masks(torch.cat([still, moved]), source)
    assert masks.shape == (2, 1, 64, 64)
    assert masks[:, :, 0].max() == 0 and masks[:, :, :, 0].max() == 0  # 0 on the edge
    assert masks[0, 0, 32, 32] == 1 and masks[1, 0, 32, 32] == 1
    assert masks[1, 0, 32, 3] > masks[0, 0, 32, 3] + 0.3  # the moved head is kept near the edge
    assert torch.equal(masks[1, 0, 32, 40:], masks[0, 0, 32, 40:])  # where nothing moved, the same band
    # motion far from the face (the background, the shoulders) does not pull the mask to the edge
    far = blend_masks(moved, source, face_box=np.float32([36, 56, 20, 44, 64, 64]))
    assert torch.allclose(far[0, 0, 32, :10], masks[0, 0, 32, :10])
    near = blend_masks(moved, source, face_box=np.float32([8, 28, 20, 44, 64, 64]))
    assert near[0, 0, 32, 3] > masks[0, 0, 32, 3] + 0.3


def test_dawn_render_paste_back_writes_the_portrait_resolution(checkpoints, textured_portrait, speech_wav,
                                                               tmp_path):
    from PIL import Image

    from dawn.cli import main
    from dawn.video import probe, read_video, write_mp4

    portrait = tmp_path / "portrait.png"
    Image.fromarray(textured_portrait).save(portrait)
    out, crop_only = tmp_path / "full.mp4", tmp_path / "crop.mp4"
    common = ["render", "--checkpoints", str(checkpoints), "--portrait", str(portrait), "--audio", str(speech_wav),
              "--steps", "1", "--quiet"]
    assert main([*common, "--out", str(out), "--paste-back"]) == 0
    info = probe(out)
    assert (info["width"], info["height"]) == (1024, 768) and info["has_audio"]
    frames, _ = read_video(out)
    # far from the face (the corners) the video is the portrait, up to H.264 rounding: the error of the
    # same encoder on a still video of the portrait itself
    write_mp4(tmp_path / "still.mp4", np.repeat(textured_portrait[None], len(frames), 0))
    still, _ = read_video(tmp_path / "still.mp4")
    for ys, xs in ((slice(0, 150), slice(0, 200)), (slice(-150, None), slice(-200, None))):
        difference = np.abs(frames[:, ys, xs].astype(int) - textured_portrait[ys, xs].astype(int)).mean()
        rounding = np.abs(still[:, ys, xs].astype(int) - textured_portrait[ys, xs].astype(int)).mean()
        assert difference <= rounding + 1.0, (difference, rounding)
    # without --paste-back: the 64 x 64 crop, as before
    assert main([*common, "--out", str(crop_only)]) == 0
    assert (probe(crop_only)["width"], probe(crop_only)["height"]) == (64, 64)
    assert main([*common, "--out", str(tmp_path / "small.mp4"), "--paste-back", "--max-side", "512"]) == 0
    assert (probe(tmp_path / "small.mp4")["width"], probe(tmp_path / "small.mp4")["height"]) == (512, 384)
