"""Paste-back (`--paste-back`): the rendered face crop composited into the whole portrait at its resolution.

The models see a square box of the portrait resized to S x S (`dawn.face.crop_box`; with crop "none" the
whole image). Each rendered frame is resized back onto that box and blended into the portrait with a soft
mask that is

- 0 outside the box and on its edge: there the output is the portrait itself;
- rising to 1 across a band inside the box (`WIDE_BAND` of its side), so no edge shows where the render and
  the portrait differ slightly;
- closer to the edge where the head moved in that frame (pixels around the face, `HEAD_EXTENT` x its box,
  that differ from the source crop by more than `MOTION_THRESHOLD`): a head that turns or nods is followed up
  to a narrow band (`NARROW_BAND`) instead of being faded out at a fixed box, while the rest of the crop (the
  background, the shoulders) fades into the portrait over the wide band.

The work is batched in torch (resize, mask, blend), `batch` frames at a time, so a long video is never held
at full resolution.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

WIDE_BAND = 0.2  # share of the crop side over which the mask rises where nothing moved
NARROW_BAND = 0.04  # the same where the head moved
MOTION_THRESHOLD = 0.08  # mean |frame - source| (0-1) above which a crop pixel counts as moved
MOTION_SPREAD = 0.06  # moved regions are widened by this share of the crop side (soft dilation)
HEAD_EXTENT = 1.6  # where head motion is looked for: the face box scaled by this about its centre


def output_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) of the composited video: the portrait's, scaled down so that its longer side is at
    most `max_side`, rounded to even numbers (H.264 4:2:0)."""
    scale = min(1.0, max_side / max(height, width))
    return max(2, int(round(height * scale / 2)) * 2), max(2, int(round(width * scale / 2)) * 2)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def blend_masks(frames: torch.Tensor, source: torch.Tensor, face_box=None) -> torch.Tensor:
    """Soft masks (B, 1, S, S) in [0, 1] for rendered crops `frames` (B, 3, S, S) and the source crop `source`
    (1, 3, S, S), both float in [0, 1]: 0 on the crop's edge, 1 inside, the band narrower where the head moved.
    face_box [x_min, x_max, y_min, y_max, ...] in crop pixels (None: the whole crop may hold the head)."""
    size = frames.shape[-1]
    index = torch.arange(size, dtype=torch.float32, device=frames.device) + 0.5
    edge = torch.minimum(index, size - index) - 0.5  # distance to the nearest edge (0 on the edge pixels)
    distance = torch.minimum(edge[:, None], edge[None, :])[None, None]  # (1, 1, S, S)
    wide = _smoothstep(distance / (WIDE_BAND * size))
    narrow = _smoothstep(distance / (NARROW_BAND * size))
    moved = ((frames - source).abs().mean(1, keepdim=True) > MOTION_THRESHOLD).float()
    if face_box is not None:
        x_min, x_max, y_min, y_max = (float(v) for v in face_box[:4])
        cx, cy = (x_min + x_max) / 2, (y_min + y_max) / 2
        hx, hy = HEAD_EXTENT * (x_max - x_min) / 2, HEAD_EXTENT * (y_max - y_min) / 2
        inside_x = ((index - cx).abs() <= hx).float()
        inside_y = ((index - cy).abs() <= hy).float()
        moved = moved * (inside_y[:, None] * inside_x[None, :])
    radius = max(1, int(round(MOTION_SPREAD * size)))
    moved = (F.avg_pool2d(moved, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False) * 3).clamp(0, 1)
    return torch.maximum(wide, moved * narrow)


def paste_back(image: np.ndarray, frames: np.ndarray, source: np.ndarray, box: tuple[int, int, int, int] | None,
               max_side: int, face_box=None, batch: int = 16, device: str | torch.device = "cpu"
               ) -> Iterator[np.ndarray]:
    """The rendered crops `frames` (T, S, S, 3) uint8 composited into the portrait `image` (H, W, 3) uint8,
    yielded as batches (b, h, w, 3) uint8 at `output_size(H, W, max_side)`.

    source (S, S, 3): the crop the models saw (frame 0's reference for the motion part of the mask), face_box
    its face box (see blend_masks);
    box (x0, y0, x1, y1): where that crop lies in `image` (None: the whole image, crop "none"); it may extend
    past the image (the crop padded it), the part outside is dropped.
    """
    height, width = image.shape[:2]
    out_h, out_w = output_size(height, width, max_side)
    scale_x, scale_y = out_w / width, out_h / height
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    # the box in output pixels, and its part inside the output
    bx0, by0 = int(round(x0 * scale_x)), int(round(y0 * scale_y))
    bw, bh = max(1, int(round((x1 - x0) * scale_x))), max(1, int(round((y1 - y0) * scale_y)))
    ox0, oy0, ox1, oy1 = max(0, bx0), max(0, by0), min(out_w, bx0 + bw), min(out_h, by0 + bh)

    def to_tensor(array: np.ndarray) -> torch.Tensor:  # (..., H, W, 3) uint8 -> (N, 3, H, W) float 0-1
        tensor = torch.tensor(array, device=device)  # a copy: the arrays may be read-only
        return tensor.reshape(-1, *tensor.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0

    portrait = to_tensor(image)
    if (out_h, out_w) != (height, width):
        portrait = F.interpolate(portrait, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    background = (portrait * 255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)  # (h, w, 3)
    region = portrait[:, :, oy0:oy1, ox0:ox1]
    source_tensor = to_tensor(source)
    for start in range(0, len(frames), batch):
        crops = to_tensor(frames[start:start + batch])
        masks = blend_masks(crops, source_tensor, face_box)
        resized = F.interpolate(torch.cat([crops, masks], 1), size=(bh, bw), mode="bicubic", align_corners=False)
        resized = resized[:, :, oy0 - by0:oy1 - by0, ox0 - bx0:ox1 - bx0]
        render, mask = resized[:, :3].clamp(0, 1), resized[:, 3:].clamp(0, 1)
        blended = ((region + mask * (render - region)) * 255).round().clamp(0, 255).to(torch.uint8)
        out = background.expand(len(crops), -1, -1, -1).clone()
        out[:, oy0:oy1, ox0:ox1] = blended.permute(0, 2, 3, 1)
        yield out.cpu().numpy()
