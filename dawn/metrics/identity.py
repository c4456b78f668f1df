"""Identity preservation (paper §4.1): CSIM with ArcFace, and an offline identity similarity needing no weights.

CSIM = cosine similarity of ArcFace embeddings (Deng et al. 2019) of a generated frame and its reference (the
ground-truth frame, or the source portrait). The network is insightface's IResNet-50 (arcface_torch
`backbone.pth` of ms1mv3_arcface_r50 / glint360k_r50); faces are aligned to the 112 x 112 ArcFace 5-point
template with a similarity transform fitted to mediapipe landmarks (eye centres, nose tip, mouth corners).

`offline_identity_similarity` compares two faces without any downloaded weights. It combines, each in [0, 1]:
- geometry: facial proportions. The 3-D face-mesh landmarks that move little with expression (eye corners,
  brows, nose, upper face contour) give 300 pairwise distances, divided by their mean, so the descriptor does
  not change with head rotation, translation or scale. Similarity = exp(-rms(log ratio of the two faces'
  distances) / GEOMETRY_SCALE).
- colour: the RGB histogram (8 bins per channel) of the skin/face region of the aligned face (an ellipse in
  the ArcFace template), compared with the Bhattacharyya coefficient.
- texture: uniform LBP histograms (P=8, R=1) of the lightly smoothed grey aligned face in a 7 x 7 grid of cells
  (Ahonen et al. 2006), compared by histogram intersection averaged over cells.
identity = mean of the three.

What it measures and its limits: it reacts to face shape, skin colour and coarse texture, so it separates
clearly different people (e.g. skimage's astronaut vs matplotlib's Grace Hopper) and is stable under small
warps, noise and mouth/eye motion. It is not a face recogniser: look-alikes, relatives or two people of similar
build and complexion score high; a change of lighting, white balance or make-up lowers the colour and texture
terms for the same person; strong expressions and large head turns (beyond ~30 degrees, where mediapipe's depth
is unreliable) lower the geometry term; values are comparable between runs of this code, not with ArcFace CSIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dawn import DawnError
from dawn.metrics.weights import load_weights

ARCFACE_FILE = ("an insightface arcface_torch IResNet-50 state dict backbone.pth (e.g. ms1mv3_arcface_r50_fp16 "
                "from https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch)")
ARCFACE_SIZE = 112
# ArcFace 5-point template in 112 x 112 pixels (cv2 convention: pixel centres at integers): image-left eye,
# image-right eye, nose tip, image-left and image-right mouth corners.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float64)
# mediapipe face-mesh indices of those points (iris centres 468 / 473, nose tip 4, mouth corners 61 / 291).
FIVE_POINTS = (468, 473, 4, 61, 291)
MIN_DETECTION_SIDE = 192  # smaller frames are upscaled before landmark detection


# ----------------------------------------------------------------------------------------------------
# Face alignment (batched)

def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(..., 478, 3) mediapipe landmarks -> (..., 5, 2) ArcFace alignment points (pixels)."""
    return np.asarray(landmarks)[..., list(FIVE_POINTS), :2]


def similarity_transforms(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity transforms (Umeyama) mapping points (N, K, 2) onto target (K, 2) or (N, K, 2):
    (N, 2, 3) matrices [s R | t] with target ~ s R source + t."""
    source = np.asarray(source, np.float64)
    target = np.broadcast_to(np.asarray(target, np.float64), source.shape)
    mu_s, mu_t = source.mean(1, keepdims=True), target.mean(1, keepdims=True)
    s, t = source - mu_s, target - mu_t
    covariance = np.einsum("nki,nkj->nij", t, s) / source.shape[1]
    u, sigma, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    flip = np.stack([np.ones_like(sign), sign], -1)
    rotation = (u * flip[:, None, :]) @ vt
    scale = (sigma * flip).sum(-1) / (s ** 2).sum((1, 2)) * source.shape[1]
    shift = mu_t[:, 0] - scale[:, None] * np.einsum("nij,nj->ni", rotation, mu_s[:, 0])
    return np.concatenate([scale[:, None, None] * rotation, shift[:, :, None]], axis=2)


def align_faces(frames: np.ndarray, points: np.ndarray, size: int = ARCFACE_SIZE,
                template: np.ndarray = ARCFACE_TEMPLATE) -> torch.Tensor:
    """Warp (N, H, W, 3) uint8 frames so their (N, K, 2) points land on `template` ((K, 2) or (N, K, 2), in
    pixels of a 112 x 112 output, scaled to `size`): (N, 3, size, size) float in [0, 1], bilinear, zeros outside."""
    frames = torch.tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    n, _, height, width = frames.shape
    # landmarks are continuous pixel coordinates (pixel i spans [i, i + 1)); the template uses pixel centres
    forward = similarity_transforms(points, template * (size / ARCFACE_SIZE) + 0.5)
    linear, shift = forward[:, :, :2], forward[:, :, 2]
    inverse = np.linalg.inv(linear)
    centres = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="xy"), -1).reshape(-1, 2)
    source = np.einsum("nij,npj->npi", inverse, centres[None] - shift[:, None])  # (N, size^2, 2) pixels
    grid = source / np.array([width, height]) * 2 - 1
    grid = torch.as_tensor(grid, dtype=torch.float32).reshape(n, size, size, 2)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def detect_landmarks(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Static mediapipe landmarks of each (N, H, W, 3) uint8 frame: ((N, 478, 3) pixels, (N,) found).

    Frames smaller than MIN_DETECTION_SIDE are upscaled for detection; landmarks are in the input's pixels.
    """
    import cv2

    from dawn.face import NUM_LANDMARKS, detect_face_landmarks

    frames = np.asarray(frames)
    landmarks = np.zeros((len(frames), NUM_LANDMARKS, 3), np.float32)
    found = np.zeros(len(frames), bool)
    factor = max(1.0, MIN_DETECTION_SIDE / min(frames.shape[1:3])) if len(frames) else 1.0
    for i, frame in enumerate(frames):  # mediapipe takes one image at a time
        if factor > 1:
            frame = cv2.resize(frame, (round(frame.shape[1] * factor), round(frame.shape[0] * factor)),
                               interpolation=cv2.INTER_CUBIC)
        face = detect_face_landmarks(np.ascontiguousarray(frame))
        if face is not None:
            landmarks[i], found[i] = face.points / np.float32([factor, factor, factor]), True
    return landmarks, found


# ----------------------------------------------------------------------------------------------------
# ArcFace IResNet-50 (insightface arcface_torch layout)

class IBasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet: aligned faces (N, 3, 112, 112), RGB scaled to [-1, 1] -> (N, 512) embeddings (not normalised)."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 14, 3), embedding_dim: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        channels = 64
        for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers), 1):
            stage = [IBasicBlock(channels, width, stride=2)] + [IBasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            channels = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-5)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(faces)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def iresnet50() -> IResNet:
    return IResNet((3, 4, 14, 3))


class ArcFaceEmbedder:
    """`embedder(frames (N, H, W, 3) uint8 RGB, landmarks (N, 478, 3) | None) -> ((N, 512) unit vectors, (N,) found)`.

    Faces are aligned with the 5-point template; frames where no face is found are resized whole (found=False).
    """

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 model: IResNet | None = None):
        if model is None:
            if weights is None:
                raise DawnError(f"CSIM needs {ARCFACE_FILE}")
            model = load_weights(iresnet50, weights, ARCFACE_FILE)
        self.model, self.batch_size = model.to(device).eval(), batch_size

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, landmarks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        if landmarks is None:
            landmarks, found = detect_landmarks(frames)
        else:
            found = np.ones(len(frames), bool)
        # no face found: the whole frame, resized
        height, width = frames.shape[1:3]
        corners = np.array([[0, 0], [width, 0], [width / 2, height / 2], [0, height], [width, height]])
        whole = np.array([[0, 0], [1, 0], [0.5, 0.5], [0, 1], [1, 1]]) * ARCFACE_SIZE - 0.5
        points = np.where(found[:, None, None], five_points(landmarks), corners)
        template = np.where(found[:, None, None], ARCFACE_TEMPLATE, whole)
        device, out = next(self.model.parameters()).device, []
        for i in range(0, len(frames), self.batch_size):
            batch = slice(i, i + self.batch_size)
            faces = align_faces(frames[batch], points[batch], template=template[batch]).to(device) * 2 - 1
            out.append(F.normalize(self.model(faces).float(), dim=1).cpu())
        return torch.cat(out).numpy(), found


def csim(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity between (N, D) generated embeddings and (N, D) or (D,) reference embeddings."""
    generated = generated / np.linalg.norm(generated, axis=-1, keepdims=True)
    reference = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    return float(np.mean(np.sum(generated * reference, axis=-1)))


# ----------------------------------------------------------------------------------------------------
# Offline identity similarity (no weights)

RIGID_POINTS = (33, 133, 362, 263,  # eye corners
                70, 105, 107, 336, 334, 300,  # brows
                168, 6, 4, 1, 2, 98, 327,  # nose bridge, tip, base, alae
                10, 127, 356, 234, 454, 93, 323, 132)  # forehead and the upper face contour
GEOMETRY_SCALE = 0.05  # rms log-ratio of proportions at which geometry similarity = 1/e
COLOUR_BINS = 8
LBP_GRID = 7
LBP_POINTS = 8
FACE_ELLIPSE = ((56.0, 66.0), (34.0, 46.0))  # centre, half-axes in the 112 x 112 ArcFace template


@dataclass
class FaceDescriptor:
    geometry: np.ndarray  # (300,) log pairwise distances of RIGID_POINTS over their mean
    colour: np.ndarray  # (COLOUR_BINS^3,) RGB histogram of the face ellipse, sums to 1
    texture: np.ndarray  # (LBP_GRID^2, LBP_POINTS + 2) uniform LBP histograms per cell, rows sum to 1


def _face_mask(size: int = ARCFACE_SIZE) -> np.ndarray:
    (cx, cy), (ax, ay) = FACE_ELLIPSE
    y, x = np.mgrid[:size, :size]
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1


def face_descriptors(frames: np.ndarray, landmarks: np.ndarray) -> list[FaceDescriptor]:
    """Descriptors of the faces in (N, H, W, 3) uint8 frames with their (N, 478, 3) landmarks."""
    from scipy.ndimage import gaussian_filter
    from skimage.feature import local_binary_pattern

    points = np.asarray(landmarks, np.float64)[:, list(RIGID_POINTS)]
    i, j = np.triu_indices(len(RIGID_POINTS), k=1)
    distances = np.linalg.norm(points[:, i] - points[:, j], axis=-1)
    geometry = np.log(distances / distances.mean(1, keepdims=True))
    faces = (align_faces(frames, five_points(landmarks)).permute(0, 2, 3, 1).numpy() * 255)  # (N, 112, 112, 3)
    mask = _face_mask()
    out = []
    for face, shape in zip(faces, geometry):
        bins = np.clip(face[mask] * COLOUR_BINS / 256, 0, COLOUR_BINS - 1).astype(int)
        colour = np.bincount((bins[:, 0] * COLOUR_BINS + bins[:, 1]) * COLOUR_BINS + bins[:, 2],
                             minlength=COLOUR_BINS ** 3).astype(np.float64)
        grey = gaussian_filter(face @ np.array([0.299, 0.587, 0.114]), sigma=1.0).round().astype(np.uint8)
        codes = local_binary_pattern(grey, LBP_POINTS, 1, method="uniform").astype(int)
        cell = ARCFACE_SIZE // LBP_GRID
        cells = codes[:cell * LBP_GRID, :cell * LBP_GRID].reshape(LBP_GRID, cell, LBP_GRID, cell).swapaxes(1, 2)
        cells = cells.reshape(LBP_GRID * LBP_GRID, cell * cell)
        texture = np.stack([np.bincount(c, minlength=LBP_POINTS + 2) for c in cells]).astype(np.float64)
        out.append(FaceDescriptor(geometry=shape, colour=colour / colour.sum(),
                                  texture=texture / texture.sum(1, keepdims=True)))
    return out


def descriptor_similarity(a: FaceDescriptor, b: FaceDescriptor) -> dict[str, float]:
    """{"geometry", "colour", "texture", "identity"} similarities in [0, 1] (1 = same descriptor)."""
    geometry = float(np.exp(-np.sqrt(np.mean((a.geometry - b.geometry) ** 2)) / GEOMETRY_SCALE))
    colour = float(np.sum(np.sqrt(a.colour * b.colour)))
    texture = float(np.mean(np.minimum(a.texture, b.texture).sum(1)))
    return dict(geometry=geometry, colour=colour, texture=texture, identity=(geometry + colour + texture) / 3)


def _describe(image: np.ndarray, name: str) -> FaceDescriptor:
    landmarks, found = detect_landmarks(np.asarray(image)[None])
    if not found[0]:
        raise DawnError(f"no face found in {name}")
    return face_descriptors(np.asarray(image)[None], landmarks)[0]


def offline_identity_similarity(image_a: np.ndarray, image_b: np.ndarray) -> dict[str, float]:
    """Offline identity similarity of the faces in two RGB uint8 images (see the module docstring)."""
    return descriptor_similarity(_describe(image_a, "the first image"), _describe(image_b, "the second image"))


def video_identity_similarity(frames: np.ndarray, reference: np.ndarray, landmarks: np.ndarray | None = None,
                              found: np.ndarray | None = None, max_frames: int = 16) -> dict[str, float]:
    """Mean offline identity similarity of up to `max_frames` evenly spaced frames of a (T, H, W, 3) video
    to the reference image (e.g. the source portrait). `landmarks` (T, 478, 3) / `found` (T,) from an earlier
    analysis of the frames (e.g. dawn.face.analyze_video_frames) skip the detection."""
    frames = np.asarray(frames)
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    if landmarks is None:
        landmarks, found = detect_landmarks(frames[picks])
    else:
        landmarks = np.asarray(landmarks)[picks]
        found = np.ones(len(picks), bool) if found is None else np.asarray(found)[picks]
    if not found.any():
        raise DawnError("no face found in the sampled frames of the video")
    target = _describe(reference, "the reference image")
    scores = [descriptor_similarity(d, target)
              for d in face_descriptors(frames[picks][found], landmarks[found])]
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
