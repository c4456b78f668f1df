"""Synthetic talking-head corpus for demos and tests (not a substitute for real training data).

Real portraits that ship inside installed packages (skimage's astronaut, matplotlib's Grace Hopper photo)
are animated by warping them around their mediapipe landmarks (`dawn.face`):

- the mouth follows the speech: the RMS envelope per 40 ms frame (`dawn.audio.speech_envelope`), lightly
  smoothed and normalised, moves the lower lip and the chin down and the upper lip slightly up; the gap
  between the lips is filled with a dark mouth interior;
- the head moves smoothly: yaw, pitch and roll of a few degrees (an orthographic rotation of the portrait
  lifted by a depth map from the landmarks' z), a small scale change and translation, each a sum of slow
  random sinusoids, plus a small nod that follows the loudness of the speech;
- the eyes blink at a natural rate (0.2-0.4 blinks/s, 150-250 ms each): the upper lids come down onto the
  lower lids;
- the speech is espeak-ng (`dawn.data.tts`) with a random voice, rate, pitch and sentence order.

There are only two real faces, so the eight "identities" (IDENTITIES) are each portrait as it is, mirrored,
with a warm colour cast, and mirrored with a cool cast; they are not eight different people. Videos cycle
through them. Each video is an H.264 + AAC mp4 at 25 fps framed like `dawn.face.crop_box` (HDTF-like: whole
head visible, face about 55 % of the frame) plus a JSON sidecar with the per-frame ground truth, measured
with dawn.face's own definitions on the landmarks where the animation put them. docs/synthetic_corpus.md
describes the layout and the sidecar schema.

Geometry: everything happens in the "canonical" image, the portrait rotated so the eyes are level and
scaled to the output framing, with a margin of MARGIN x size on each side. A frame is rendered backwards
with two grid_sample passes over a batch of frames: output pixel -> inverse head pose -> inverse
expression (vertical displacements per image column) -> portrait colour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dawn import DawnError
from dawn.config import FPS

MARGIN = 0.25  # canonical image margin on each side, as a fraction of the output size
SIDECAR_VERSION = 1

# mediapipe face-mesh indices (left to right in the image).
UPPER_INNER_LIP = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER_LIP = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
UPPER_OUTER_LIP = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LOWER_OUTER_LIP = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
EYES = [  # (upper lid, lower lid), corner to corner; image-left eye first
    ([33, 246, 161, 160, 159, 158, 157, 173, 133], [33, 7, 163, 144, 145, 153, 154, 155, 133]),
    ([362, 398, 384, 385, 386, 387, 388, 466, 263], [362, 382, 381, 380, 374, 373, 390, 249, 263]),
]
IRISES = [468, 473]
FOREHEAD, CHIN, SUBNASALE = 10, 152, 2

# Animation constants (canonical pixels are relative to the face height H = chin - forehead).
JAW_DROP = 0.12  # lower-lip displacement at full opening, x H
OPENING_POWER = 0.6  # loudness -> opening compression
MOUTH_GAIN = (0.8, 1.0)  # per-video range of the largest opening
MOUTH_SPAN = 0.95  # the lips part over this fraction of the mouth width (outer corners)
JAW_SPAN = 0.7  # the chin drops over this fraction of the face width
UPPER_LIP_RISE = 0.25  # upper-lip displacement / lower-lip displacement
NECK_FALLOFF = 0.35  # below the chin the jaw displacement fades to zero over this, x H
MOUTH_COLOUR = (0.22, 0.06, 0.06)  # RGB of the mouth interior
MOUTH_DARKNESS = 0.85  # blend weight of MOUTH_COLOUR inside the opened mouth
LID_SKIN = 0.5  # skin above the upper lid that stretches during a blink, x eye width
POSE_AMPLITUDE = np.array([10.0, 6.0, 5.0, 0.04, 0.03, 0.03])  # yaw, pitch, roll (deg), scale, tx, ty (x size)
POSE_FREQUENCIES = (0.08, 0.6)  # Hz, range of the sinusoids summed per pose component
NOD_DEGREES = 2.0  # extra pitch following the slow loudness of the speech
BLINK_RATE = (0.2, 0.4)  # blinks per second
BLINK_DURATION = (0.15, 0.25)  # seconds
SPEECH_RATE = (130, 190)  # espeak words per minute
SPEECH_PITCH = (30, 70)  # espeak pitch 0-99


@dataclass(frozen=True)
class Identity:
    """One animated face: a packaged portrait, optionally mirrored, with a colour cast (RGB gains)."""

    name: str
    portrait: str
    mirrored: bool
    colour: tuple[float, float, float]


_WARM, _COOL, _NATURAL = (1.08, 1.0, 0.88), (0.9, 1.0, 1.1), (1.0, 1.0, 1.0)
IDENTITIES = [  # the two portraits alternate, so that any two consecutive videos show different people
    Identity(f"{portrait}{suffix}", portrait, mirrored, colour)
    for suffix, mirrored, colour in (("", False, _NATURAL), ("-mirrored", True, _NATURAL), ("-warm", False, _WARM),
                                     ("-mirrored-cool", True, _COOL))
    for portrait in ("astronaut", "grace_hopper")
]


def load_portrait(identity: Identity) -> np.ndarray:
    """The identity's portrait as RGB uint8 (H, W, 3)."""
    if identity.portrait == "astronaut":
        from skimage import data

        image = data.astronaut()
    elif identity.portrait == "grace_hopper":
        import matplotlib
        from PIL import Image

        image = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
                           .convert("RGB"))
    else:
        raise DawnError(f"unknown portrait {identity.portrait!r}")
    if identity.mirrored:
        image = image[:, ::-1]
    image = image.astype(np.float32) * np.array(identity.colour, dtype=np.float32)
    return np.ascontiguousarray(np.clip(image, 0, 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------
# The rig: a portrait prepared for animation at one output size.


@dataclass
class FaceRig:
    """A portrait in canonical pixels (x right, y down; pixel i spans [i, i + 1)); the output frame at rest
    is the centre [margin, margin + size)^2 of the (P, P) canonical image, P = size + 2 * margin.

    `columns` holds the expression curves sampled at every canonical column: "seam" (P,) y of the line
    between the lips, "lip_profile" / "jaw_profile" (P,) how much the lips part / the chin drops (1 at the
    mouth centre), "lid_top" / "lid_gap" (2, P) the upper lid's y and the gap to the lower lid per eye (0
    outside the eye). `depth` (P, P) is each pixel's height in front of the head's rotation axis (pixels).
    """

    size: int
    margin: int
    image: torch.Tensor  # (3, P, P) float in [0, 1]
    landmarks: np.ndarray  # (478, 3) float32, canonical pixels (z like dawn.face: smaller = nearer)
    centre: np.ndarray  # (2,) pivot of the head pose (centre of the face mesh)
    depth: torch.Tensor  # (P, P)
    columns: dict[str, torch.Tensor]
    jaw_drop: float  # lower-lip displacement at opening 1, pixels
    subnasale_y: float
    chin_y: float
    neck_falloff: float
    lid_skin: tuple[float, float]  # height of the skin band above each upper lid that stretches in a blink

    def columns_at(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        """The expression curves at arbitrary canonical x (L,): (L,) or (2, L) tensors."""
        centres = np.arange(self.image.shape[-1]) + 0.5
        sample = lambda curve: torch.tensor(np.interp(x, centres, curve.numpy()), dtype=torch.float32)  # noqa: E731
        return {name: torch.stack([sample(c) for c in curve]) if curve.ndim == 2 else sample(curve)
                for name, curve in self.columns.items()}


def _rotation_2d(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _column_curve(xs: np.ndarray, ys: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Piecewise-linear y(x) through the points, evaluated at every column (flat beyond the ends)."""
    order = np.argsort(xs)
    return np.interp(columns, xs[order], ys[order])


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def _depth_map(points: np.ndarray, side: int) -> torch.Tensor:
    """Dense (side, side) height in front of the rotation axis: the landmarks' depth (axis at the 98th
    percentile of their z, near the ears) interpolated with normalised Gaussian weights on a 4x coarser grid,
    fading to 0 between 1x and 1.5x the face oval, then upsampled."""
    heights = np.clip(np.percentile(points[:, 2], 98) - points[:, 2], 0, None)
    coarse = side // 4
    grid = (np.arange(coarse) + 0.5) * side / coarse
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    cells = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    low, high = points[:, :2].min(0), points[:, :2].max(0)
    sigma = 0.06 * (high - low)[0]
    weights = torch.exp(-torch.cdist(cells, torch.tensor(points[:, :2])) ** 2 / (2 * sigma ** 2)) + 1e-12
    values = (weights @ torch.tensor(heights)) / weights.sum(1)
    centre, axes = (low + high) / 2, (high - low) / 2
    radius = torch.tensor(np.hypot((gx.ravel() - centre[0]) / axes[0], (gy.ravel() - centre[1]) / axes[1]))
    values = values * (1 - _smoothstep((radius.float() - 1.0) / 0.5))
    return F.interpolate(values.reshape(1, 1, coarse, coarse), size=(side, side), mode="bilinear",
                         align_corners=False)[0, 0]


def build_rig(portrait: np.ndarray, size: int) -> FaceRig:
    """Detect the face (dawn.face), frame it like dawn.face.crop_box at `size` with the eyes level, and
    precompute the expression curves and the depth map."""
    import cv2

    from dawn.face import CROP_LIFT, CROP_MARGIN, NUM_MESH_POINTS, detect_face_landmarks

    found = detect_face_landmarks(portrait)
    if found is None:
        raise DawnError("no face found in the portrait")
    points = found.points.astype(np.float64)
    # Similarity portrait -> canonical: eyes level, framing of dawn.face.crop_box, face centred.
    eye_delta = points[IRISES[1], :2] - points[IRISES[0], :2]
    level = _rotation_2d(-math.atan2(eye_delta[1], eye_delta[0]))
    aligned = points[:NUM_MESH_POINTS, :2] @ level.T
    low, high = aligned.min(0), aligned.max(0)
    scale = size / (CROP_MARGIN * (high - low).max())
    margin = round(MARGIN * size)
    side = size + 2 * margin
    face_centre = (low + high) / 2 - np.array([0.0, CROP_LIFT * (high - low)[1]])
    linear = scale * level
    offset = np.full(2, side / 2) - linear @ face_centre
    # Area-average when shrinking, then the small rotation with bilinear interpolation.
    height, width = portrait.shape[:2]
    resized = cv2.resize(portrait, (round(width * scale), round(height * scale)),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    pre_scale = np.array([resized.shape[1] / width, resized.shape[0] / height])
    affine = np.concatenate([linear / pre_scale[None, :], offset[:, None]], 1)  # resized pixels -> canonical
    canonical = cv2.warpAffine(resized, affine.astype(np.float32), (side, side), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    landmarks = np.concatenate([points[:, :2] @ linear.T + offset, points[:, 2:] * scale], 1).astype(np.float32)

    centres = np.arange(side) + 0.5
    x, y = landmarks[:, 0], landmarks[:, 1]
    mesh = landmarks[:NUM_MESH_POINTS, :2]
    face_height = y[CHIN] - y[FOREHEAD]
    mouth_centre = (x[13] + x[14]) / 2
    raised_cosine = lambda half_width: np.cos(  # noqa: E731
        np.clip((centres - mouth_centre) / half_width, -1, 1) * np.pi / 2) ** 2
    lid_top, lid_gap = [], []
    for upper, lower in EYES:
        top = _column_curve(x[upper], y[upper], centres)
        inside = (centres > x[upper].min()) & (centres < x[upper].max())
        lid_top.append(top)
        lid_gap.append(np.where(inside, np.clip(_column_curve(x[lower], y[lower], centres) - top, 0, None), 0.0))
    columns = {
        "seam": _column_curve((x[UPPER_INNER_LIP] + x[LOWER_INNER_LIP]) / 2,
                              (y[UPPER_INNER_LIP] + y[LOWER_INNER_LIP]) / 2, centres),
        "lip_profile": raised_cosine(MOUTH_SPAN * (x[291] - x[61]) / 2),
        "jaw_profile": raised_cosine(JAW_SPAN * np.ptp(mesh[:, 0]) / 2),
        "lid_top": np.stack(lid_top), "lid_gap": np.stack(lid_gap),
    }
    return FaceRig(
        size=size, margin=margin, image=torch.from_numpy(canonical).permute(2, 0, 1).float() / 255,
        landmarks=landmarks, centre=(mesh.min(0) + mesh.max(0)) / 2,
        depth=_depth_map(landmarks[:NUM_MESH_POINTS], side),
        columns={name: torch.tensor(curve, dtype=torch.float32) for name, curve in columns.items()},
        jaw_drop=float(JAW_DROP * face_height), subnasale_y=float(y[SUBNASALE]), chin_y=float(y[CHIN]),
        neck_falloff=float(NECK_FALLOFF * face_height),
        lid_skin=tuple(float(LID_SKIN * (x[upper].max() - x[upper].min())) for upper, _ in EYES),
    )


# ---------------------------------------------------------------------------------------------------------
# Expression: vertical displacements per canonical column.


def source_rows(rig: FaceRig, columns: dict[str, torch.Tensor], y: torch.Tensor, opening: torch.Tensor,
                closure: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the portrait is seen from canonical points after the expression (a backward map).

    columns: curves at C columns (rig.columns or rig.columns_at(x)); y (B, R, C) rows; opening, closure (B,)
    in [0, 1]. Returns (source y (B, R, C), mouth-interior weight (B, R, C) in [0, 1]); x never changes.

    Per column, with seam s, lower-lip drop d = opening * jaw_drop * lip_profile and upper-lip rise
    r = UPPER_LIP_RISE * d: rows below s + d show the portrait d higher (d widening to the jaw profile at the
    chin, fading out below it), rows above s - r show it up to r lower (fading out at the nose), and rows in
    between are the opened mouth (they show the seam, darkened by the caller). For each eye the upper lid
    comes down by closure * gap and the skin band above it stretches over the eye.
    """
    opening, closure = opening.view(-1, 1, 1), closure.view(-1, 1, 1)
    seam = columns["seam"]
    drop = opening * rig.jaw_drop * columns["lip_profile"]
    rise = UPPER_LIP_RISE * drop
    below = y - (seam + drop)  # >= 0 under the lower lip
    above = (seam - rise) - y  # >= 0 over the upper lip
    jaw_drop = opening * rig.jaw_drop * columns["jaw_profile"]
    lower_drop = drop + (below / (rig.chin_y - seam).clamp(min=1)).clamp(0, 1) * (jaw_drop - drop)
    lower = y - lower_drop * (1 - (y - rig.chin_y - jaw_drop) / rig.neck_falloff).clamp(0, 1)
    upper = y + rise * ((y - rig.subnasale_y) / (seam - rise - rig.subnasale_y).clamp(min=1)).clamp(0, 1)
    source = torch.where(below >= 0, lower, torch.where(above >= 0, upper, seam.expand_as(y)))
    # Anti-aliased interior weight, never more than the gap itself (no dark line on a closed mouth).
    mouth = torch.minimum(0.5 - torch.maximum(below, above), drop + rise).clamp(0, 1)
    for eye in range(2):
        top, gap, skin = columns["lid_top"][eye], columns["lid_gap"][eye], rig.lid_skin[eye]
        lid, brow = top + closure * gap, top - skin
        stretched = brow + (y - brow) * skin / (lid - brow)  # rows [brow, lid] show [brow, top]
        source = source + torch.where((y >= brow) & (y <= lid), stretched - y, 0.0)  # away from the mouth
    return source, mouth


def expression_field(rig: FaceRig, opening: torch.Tensor, closure: torch.Tensor) -> torch.Tensor:
    """(B, 2, P, P) on the canonical grid: [vertical source offset in pixels, mouth-interior weight]."""
    side = rig.image.shape[-1]
    y = (torch.arange(side, dtype=torch.float32) + 0.5).view(1, side, 1).expand(len(opening), side, side)
    source, mouth = source_rows(rig, rig.columns, y, opening, closure)
    return torch.stack([source - y, mouth], 1)


def expression_landmarks(rig: FaceRig, opening: torch.Tensor, closure: torch.Tensor) -> torch.Tensor:
    """Canonical landmarks after the expression (B, 478, 2): the inverse of `source_rows` per landmark, by
    bisection. Where several rows show the same portrait row (the lip seam), upper-lip landmarks take the
    top-most and lower-lip ones the bottom-most."""
    x, y = (torch.tensor(rig.landmarks[:, i]) for i in range(2))
    columns = rig.columns_at(rig.landmarks[:, 0])
    lower_lip = torch.zeros(len(x), dtype=torch.bool)
    lower_lip[LOWER_INNER_LIP[1:-1] + LOWER_OUTER_LIP[1:-1]] = True
    upper_lip = torch.zeros(len(x), dtype=torch.bool)
    upper_lip[UPPER_INNER_LIP + UPPER_OUTER_LIP] = True
    take_bottom = lower_lip | ((y > columns["seam"]) & ~upper_lip)
    # A lip landmark's row is clamped to its side of the seam (the inner lips may cross on a closed mouth).
    seam = columns["seam"]
    y = torch.where(lower_lip, torch.maximum(y, seam), torch.where(upper_lip, torch.minimum(y, seam), y))
    reach = 0.5 * (rig.chin_y - rig.landmarks[FOREHEAD, 1])
    low = (y - reach).expand(len(opening), -1).clone()
    high = (y + reach).expand(len(opening), -1).clone()
    for _ in range(30):
        middle = (low + high) / 2
        source = source_rows(rig, columns, middle[:, None], opening, closure)[0][:, 0]
        # top-most: smallest row whose source >= y; bottom-most: largest row whose source <= y
        go_up = torch.where(take_bottom, source > y, source >= y)
        high, low = torch.where(go_up, middle, high), torch.where(go_up, low, middle)
    return torch.stack([x.expand_as(low), (low + high) / 2], -1)


# ---------------------------------------------------------------------------------------------------------
# Head pose: an orthographic rotation of the portrait lifted by its depth map, then scale and translation.


def rotation_matrices(pose: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations in camera axes (x right, y up, z towards the camera) for pose (B, >=3) = yaw,
    pitch, roll in degrees, such that dawn.face.rotation_to_angles gives them back (3DDFA conventions:
    yaw > 0 turns the subject's left side towards the camera, roll > 0 tilts counter-clockwise)."""
    yaw, pitch, roll = torch.deg2rad(pose[:, :3].double()).T
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    stack = lambda rows: torch.stack([torch.stack(r, -1) for r in rows], -2)  # noqa: E731
    about_z = stack([[roll.cos(), -roll.sin(), zero], [roll.sin(), roll.cos(), zero], [zero, zero, one]])
    about_y = stack([[yaw.cos(), zero, -yaw.sin()], [zero, one, zero], [yaw.sin(), zero, yaw.cos()]])
    about_x = stack([[one, zero, zero], [zero, pitch.cos(), -pitch.sin()], [zero, pitch.sin(), pitch.cos()]])
    return (about_z @ about_y @ about_x).float()


def posed_landmarks(rig: FaceRig, points: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Canonical landmarks after the expression (B, L, 2) -> landmarks in output pixels (B, L, 3) after the
    head pose (B, 6) = yaw, pitch, roll (deg), scale, tx, ty (output pixels); z like dawn.face."""
    side = rig.image.shape[-1]
    height = F.grid_sample(rig.depth.expand(len(pose), 1, side, side), _normalised(points[:, None], side),
                           mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0, 0]
    cx, cy = (float(c) for c in rig.centre)
    u, w = points[..., 0] - cx, cy - points[..., 1]  # (B, L), y up
    rotation = pose[:, 3, None, None] * rotation_matrices(pose)
    # x, y move with the depth map like the image; z rotates the landmarks' own depth (towards the camera),
    # so that the rest pose measures exactly like the portrait's.
    moved = torch.stack([u, w, height], -1) @ rotation[:, :2].transpose(1, 2)
    depth = (torch.stack([u, w, -torch.tensor(rig.landmarks[:, 2]).expand_as(u)], -1)
             @ rotation[:, 2:].transpose(1, 2))[..., 0]
    return torch.stack([cx + pose[:, 4, None] + moved[..., 0] - rig.margin,
                        cy + pose[:, 5, None] - moved[..., 1] - rig.margin, -depth], -1)


def _normalised(points: torch.Tensor, side: int) -> torch.Tensor:
    """Canonical pixel coordinates -> grid_sample's [-1, 1] (align_corners=False)."""
    return points * (2.0 / side) - 1.0


def pose_grid(rig: FaceRig, pose: torch.Tensor) -> torch.Tensor:
    """Canonical point (B, S, S, 2) seen at each output pixel: the inverse of `posed_landmarks`' projection.

    With a = ((X - cx - tx) / s, (cy + ty - Y) / s) and R the rotation: a = R[:2, :2] (x - cx, cy - y) +
    R[:2, 2] depth(x, y), solved for (x, y) by two fixed-point steps on the depth."""
    size, side = rig.size, rig.image.shape[-1]
    rotation = rotation_matrices(pose)
    in_plane = torch.linalg.inv(rotation[:, :2, :2])  # (B, 2, 2)
    pixels = torch.arange(size, dtype=torch.float32) + 0.5 + rig.margin
    cx, cy = (float(c) for c in rig.centre)
    scale, tx, ty = (pose[:, i].view(-1, 1, 1) for i in (3, 4, 5))
    a = torch.stack(torch.broadcast_tensors((pixels.view(1, 1, size) - cx - tx) / scale,
                                            (cy + ty - pixels.view(1, size, 1)) / scale), -1)  # (B, S, S, 2)
    flat = a @ in_plane.transpose(1, 2)[:, None]
    tilt = (in_plane @ rotation[:, :2, 2:])[:, None, None, :, 0]  # (B, 1, 1, 2): depth's share
    depth = rig.depth.expand(len(pose), 1, side, side)
    to_image = lambda v: torch.stack([cx + v[..., 0], cy - v[..., 1]], -1)  # noqa: E731
    points = to_image(flat)
    for _ in range(2):
        height = F.grid_sample(depth, _normalised(points, side), mode="bilinear", padding_mode="zeros",
                               align_corners=False)[:, 0, :, :, None]
        points = to_image(flat - height * tilt)
    return points


# ---------------------------------------------------------------------------------------------------------
# Rendering and ground truth, all frames of a batch at once.


def render_frames(rig: FaceRig, opening: np.ndarray, closure: np.ndarray, pose: np.ndarray,
                  batch_size: int = 16) -> np.ndarray:
    """Frames (T, S, S, 3) uint8 RGB for per-frame opening (T,), eye closure (T,) and pose (T, 6)."""
    side = rig.image.shape[-1]
    mouth_colour = torch.tensor(MOUTH_COLOUR).view(1, 3, 1, 1)
    frames = []
    for start in range(0, len(opening), batch_size):
        stop = min(start + batch_size, len(opening))
        chunk = lambda a: torch.as_tensor(np.asarray(a[start:stop]), dtype=torch.float32)  # noqa: E731
        points = pose_grid(rig, chunk(pose))
        field = F.grid_sample(expression_field(rig, chunk(opening), chunk(closure)), _normalised(points, side),
                              mode="bilinear", padding_mode="border", align_corners=False)
        source = points + torch.stack([torch.zeros_like(field[:, 0]), field[:, 0]], -1)
        colour = F.grid_sample(rig.image.expand(stop - start, 3, side, side), _normalised(source, side),
                               mode="bilinear", padding_mode="border", align_corners=False)
        weight = MOUTH_DARKNESS * field[:, 1:2]
        colour = colour * (1 - weight) + mouth_colour * weight
        frames.append((colour.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(frames)


def ground_truth_landmarks(rig: FaceRig, opening: np.ndarray, closure: np.ndarray,
                           pose: np.ndarray) -> np.ndarray:
    """Where the rig puts the portrait's 478 landmarks in each output frame: (T, 478, 3) float32 pixels."""
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    points = expression_landmarks(rig, as_tensor(opening), as_tensor(closure))
    return posed_landmarks(rig, points, as_tensor(pose)).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Driving signals, one value per 40 ms frame.


def mouth_opening(envelope: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Mouth opening (T,) in [0, gain] from the speech RMS envelope (T,): lightly smoothed over 3 frames,
    a noise floor removed (10 % of the loud level), the loud level (95th percentile) mapped to 1, then
    compressed (power OPENING_POWER < 1, so that medium-loud syllables open the mouth visibly) and scaled
    by `gain`."""
    smoothed = np.convolve(np.pad(envelope, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    loud = max(float(np.percentile(smoothed, 95)), 1e-6)
    floor = 0.1 * loud
    return (gain * np.clip((smoothed - floor) / (loud - floor), 0, 1) ** OPENING_POWER).astype(np.float32)


def _slow_sinusoids(rng: np.random.Generator, seconds: np.ndarray, components: int,
                    waves: int = 3) -> np.ndarray:
    """(T, components) sums of `waves` random slow sinusoids each, peak |value| <= 1."""
    low, high = POSE_FREQUENCIES
    frequency = np.exp(rng.uniform(np.log(low), np.log(high), (components, waves)))
    phase = rng.uniform(0, 2 * np.pi, (components, waves))
    weight = rng.uniform(0.5, 1.0, (components, waves))
    weight /= weight.sum(1, keepdims=True)
    waves_t = np.sin(2 * np.pi * frequency[None] * seconds[:, None, None] + phase[None])  # (T, C, W)
    return (waves_t * weight[None]).sum(-1)


def head_motion(rng: np.random.Generator, opening: np.ndarray, size: int) -> np.ndarray:
    """Smooth random head pose (T, 6): yaw, pitch, roll (deg), scale, tx, ty (output pixels), plus a small
    nod that follows the loudness of the speech averaged over ~1 s."""
    seconds = np.arange(len(opening)) / FPS
    pose = _slow_sinusoids(rng, seconds, 6) * POSE_AMPLITUDE
    window = np.hanning(FPS + 2)[1:-1]
    loudness = np.convolve(np.pad(opening, FPS // 2, mode="edge"), window / window.sum(), mode="valid")
    pose[:, 1] += NOD_DEGREES * (loudness - loudness.mean())
    pose[:, 3] += 1.0
    pose[:, 4:] *= size
    return pose.astype(np.float32)


def blinks(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Eye closure (T,) in [0, 1]: blinks at a random rate of BLINK_RATE per second (gaps of at least 0.6 s
    plus a gamma-distributed part, more regular than a Poisson process), each lasting BLINK_DURATION,
    closing in 40 % of it and reopening in the rest."""
    rate = rng.uniform(*BLINK_RATE)
    duration = num_frames / FPS
    shape = 3.0
    gaps = 0.6 + rng.gamma(shape, (1 / rate - 0.6) / shape, size=int(duration * BLINK_RATE[1] * 3) + 2)
    starts = np.cumsum(gaps) - rng.uniform(0, gaps[0])
    starts = starts[starts < duration]
    lengths = rng.uniform(*BLINK_DURATION, size=len(starts))
    phase = (np.arange(num_frames)[None] / FPS - starts[:, None]) / lengths[:, None]  # (blinks, T)
    closing = np.clip(phase / 0.4, 0, 1)
    opening = np.clip((1 - phase) / 0.6, 0, 1)
    ease = lambda x: x * x * (3 - 2 * x)  # noqa: E731
    closure = np.where(phase < 0.4, ease(closing), ease(opening)) * ((phase >= 0) & (phase <= 1))
    return closure.max(0, initial=0.0).astype(np.float32)


def speech_track(rng: np.random.Generator, seconds: float, workdir: Path) -> dict:
    """About `seconds` of espeak-ng speech: random voice, rate and pitch, sentences in random order until
    the target is reached; the last sentence is cut at a word boundary (its shortest word prefix that
    reaches the target), then silence pads to whole 40 ms frames.

    Returns {"audio": float32 (T * 640,) at 16 kHz, "text", "voice", "words_per_minute", "pitch"}.
    """
    from dawn.audio import SAMPLE_RATE, SAMPLES_PER_FRAME, load_audio
    from dawn.data.tts import SENTENCES, VOICES, synthesize_speech

    voice = str(rng.choice(VOICES))
    words_per_minute = int(rng.integers(SPEECH_RATE[0], SPEECH_RATE[1] + 1))
    pitch = int(rng.integers(SPEECH_PITCH[0], SPEECH_PITCH[1] + 1))
    order = rng.permutation(len(SENTENCES))
    wanted = int(seconds * SAMPLE_RATE)

    def speak(text: str) -> np.ndarray:
        path = synthesize_speech(text, workdir / "speech.wav", voice, words_per_minute, pitch)
        return load_audio(path, SAMPLE_RATE)

    pieces, spoken, total = [], [], 0
    while total < wanted:
        if pieces:  # a pause between sentences
            pieces.append(np.zeros(int(rng.uniform(0.1, 0.35) * SAMPLE_RATE), dtype=np.float32))
            total += len(pieces[-1])
            if total >= wanted:
                break
        sentence = SENTENCES[order[len(spoken) % len(order)]]
        audio = speak(sentence)
        missing = wanted - total
        if len(audio) > missing + SAMPLE_RATE // 2:  # too long: binary search the shortest word prefix
            words = sentence.split()
            low, high = 1, len(words)  # the whole sentence reaches the target
            while low < high:
                middle = (low + high) // 2
                if len(speak(" ".join(words[:middle]))) >= missing:
                    high = middle
                else:
                    low = middle + 1
            sentence = " ".join(words[:high])
            audio = speak(sentence) if high < len(words) else audio
        pieces.append(audio)
        spoken.append(sentence)
        total += len(audio)
    audio = np.concatenate(pieces)
    frames = -(-len(audio) // SAMPLES_PER_FRAME)
    audio = np.pad(audio, (0, frames * SAMPLES_PER_FRAME - len(audio)))
    return {"audio": audio, "text": " ".join(spoken), "voice": voice, "words_per_minute": words_per_minute,
            "pitch": pitch}


# ---------------------------------------------------------------------------------------------------------
# Videos and the corpus.


def video_paths(out_dir: str | Path, index: int) -> tuple[Path, Path]:
    """(mp4, sidecar json) of video `index`: OUT/<identity>/synth_<index>.mp4 (+ .json)."""
    identity = IDENTITIES[index % len(IDENTITIES)]
    stem = Path(out_dir) / identity.name / f"synth_{index:05d}"
    return stem.with_suffix(".mp4"), stem.with_suffix(".json")


_rigs: dict[tuple[str, int], FaceRig] = {}  # per process: building a rig runs the face mesh


def _rig(identity: Identity, size: int) -> FaceRig:
    key = (identity.name, size)
    if key not in _rigs:
        _rigs[key] = build_rig(load_portrait(identity), size)
    return _rigs[key]


def _rounded(values: np.ndarray, decimals: int = 5) -> list:
    return np.round(np.asarray(values, dtype=np.float64), decimals).tolist()


def _write_json_atomic(path: Path, payload: dict) -> None:
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.json", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file, separators=(",", ":"))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def generate_video(out_dir: str | Path, index: int, seed: int, seconds: float, size: int = 256) -> Path:
    """Write video `index` of the corpus (mp4 + sidecar, see `video_paths`) and return the mp4's path.

    Deterministic in (seed, index); does nothing when both files exist. The mp4 appears first and the
    sidecar last, each atomically, so a present sidecar marks a finished video.
    """
    from dawn import face
    from dawn.audio import SAMPLES_PER_FRAME, speech_envelope
    from dawn.video import write_mp4

    mp4, sidecar = video_paths(out_dir, index)
    if mp4.is_file() and sidecar.is_file():
        return mp4
    identity = IDENTITIES[index % len(IDENTITIES)]
    rng = np.random.default_rng([seed, index])
    with tempfile.TemporaryDirectory(prefix="dawn-synth-") as workdir:
        speech = speech_track(rng, seconds, Path(workdir))
    num_frames = len(speech["audio"]) // SAMPLES_PER_FRAME
    envelope = speech_envelope(speech["audio"], num_frames)
    gain = float(rng.uniform(*MOUTH_GAIN))
    opening = mouth_opening(envelope, gain)
    closure = blinks(rng, num_frames)
    pose = head_motion(rng, opening, size)
    rig = _rig(identity, size)
    write_mp4(mp4, render_frames(rig, opening, closure, pose), fps=FPS, audio=speech["audio"])
    landmarks = ground_truth_landmarks(rig, opening, closure, pose)
    _write_json_atomic(sidecar, {
        "format": "dawn-synthetic-talking-head", "version": SIDECAR_VERSION, "video": mp4.name,
        "identity": identity.name, "portrait": identity.portrait, "mirrored": identity.mirrored,
        "colour_gains": list(identity.colour), "text": speech["text"], "voice": speech["voice"],
        "words_per_minute": speech["words_per_minute"], "pitch": speech["pitch"], "seed": seed, "index": index,
        "fps": FPS, "size": size, "num_frames": num_frames, "duration": num_frames / FPS, "mouth_gain": gain,
        "frames": {
            "speech_envelope": _rounded(envelope, 6),
            "mouth_drive": _rounded(opening),
            "eye_closure": _rounded(closure),
            "pose_applied": _rounded(pose),
            "mouth_opening": _rounded(face.mouth_opening_batch(landmarks)),
            "eye_ratios": _rounded(face.eye_ratios_batch(landmarks)),
            "pose": _rounded(face.head_pose_batch(landmarks)),
            "face_box": _rounded(face.face_box_batch(landmarks, (size, size)), 2),
        },
    })
    return mp4


def _generate_one(job: tuple) -> Path:
    torch.set_num_threads(1)  # one video per worker process
    return generate_video(*job)


def generate_corpus(out_dir: str | Path, videos: int, seconds: float, seed: int = 0, size: int = 256,
                    workers: int = 1, progress: bool = True) -> list[Path]:
    """Generate `videos` synthetic talking-head videos into `out_dir` (mp4 + JSON sidecar each, identities
    cycling through IDENTITIES) plus OUT/manifest.jsonl ({"path", "identity"} per line, the manifest format
    of the preprocessing job); returns the mp4 paths in index order. Finished videos are skipped, so a rerun
    continues an interrupted run. `workers` > 1 renders videos in parallel processes."""
    if videos < 1:
        raise DawnError(f"--videos must be at least 1, got {videos}")
    if not seconds > 0:
        raise DawnError(f"--seconds must be positive, got {seconds}")
    if size < 64 or size % 4:
        raise DawnError(f"--size must be a multiple of 4 and at least 64, got {size}")
    if workers < 1:
        raise DawnError(f"--workers must be at least 1, got {workers}")
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, index, seed, seconds, size) for index in range(videos)]
    paths = []
    with tqdm(total=videos, desc="synthetic videos", unit="video", disable=not progress) as bar:
        if workers == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small tensors: one thread is fastest; parallelism comes from workers
            try:
                for job in jobs:
                    paths.append(generate_video(*job))
                    bar.update()
            finally:
                torch.set_num_threads(threads)
        else:
            with get_context("spawn").Pool(min(workers, videos)) as pool:
                for path in pool.imap(_generate_one, jobs):
                    paths.append(path)
                    bar.update()
    manifest = "".join(json.dumps({"path": str(p.relative_to(out_dir)), "identity": p.parent.name}) + "\n"
                       for p in paths)
    handle, temp_name = tempfile.mkstemp(prefix=".manifest.", suffix=".part", dir=out_dir)
    with os.fdopen(handle, "w") as file:
        file.write(manifest)
    os.replace(temp_name, out_dir / "manifest.jsonl")
    return paths


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth-corpus", help="generate a synthetic talking-head corpus (demo and test data)",
        description="Animate packaged real portraits with espeak-ng speech: mp4 (H.264 + AAC, 25 fps) and a "
                    "JSON sidecar with per-frame ground truth per video. See docs/synthetic_corpus.md.")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--videos", required=True, type=int, help="number of videos")
    parser.add_argument("--seconds", required=True, type=float, help="target duration of each video")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    paths = generate_corpus(args.out, args.videos, args.seconds, args.seed, args.size, args.workers)
    print(f"{len(paths)} videos in {args.out} (manifest: {args.out / 'manifest.jsonl'})")
    return 0
