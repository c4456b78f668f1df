"""Face analysis with mediapipe's face mesh (478 landmarks, model bundled in the mediapipe 0.10.14 wheel).

Landmark arrays are (478, 3) float32 — (T, 478, 3) for a video — in pixels of the analysed image:
x to the right, y down, z = mediapipe's relative depth scaled by the image width (smaller = nearer).
Every measure has a batched twin over a leading T axis (no Python loop over frames).

The measures replace the reference's FaceBoxes + 3DDFA_V2 analysis (ARCHITECTURE.md §7.2, §7.3):
- pose (6,) = (yaw, pitch, roll in degrees, scale, tx, ty), 3DDFA conventions, see `head_pose_batch`;
- eye ratios (2,) = (left, right) eyelid gap / eye width with the 68-point definition (§7.3, §9.3);
- face box (6,) = [x_min, x_max, y_min, y_max, H, W] of the 68-point extent (jaw contour + brows).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dawn import DawnError

NUM_LANDMARKS = 478  # 468 mesh points + 2 x 5 iris points (refine_landmarks=True)
NUM_MESH_POINTS = 468
DETECTION_MAX_SIDE = 1024  # the face detector sees a copy no larger than this
MESH_INPUT_SIDE = 256  # the face mesh runs on a square crop around the face, resized to at most this
MESH_CROP_MARGIN = 2.0  # that crop's side / the larger side of the detector's face box

# Crop (HDTF-like framing): box side = CROP_MARGIN x the larger side of the face mesh's extent (forehead to
# chin, cheek to cheek), so the face fills the central ~55% of the crop; the centre sits CROP_LIFT x the
# face height above the mesh centre to leave room for the hair.
CROP_MARGIN = 1.8
CROP_LIFT = 0.1

# Mediapipe indices standing in for the 68-point landmarks the reference uses (§7.3). "Left" is the
# subject's left (image right when frontal).
LEFT_EYE = dict(upper=385, lower=380, outer=263, inner=362)  # 68-pt 43, 47, 45, 42
RIGHT_EYE = dict(upper=160, lower=144, inner=133, outer=33)  # 68-pt 37, 41, 39, 36
INNER_LIP_UPPER, INNER_LIP_LOWER, MOUTH_LEFT, MOUTH_RIGHT = 13, 14, 291, 61
JAW_CONTOUR = (127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361,
               323, 454, 356)  # 68-pt 0-16 run along these face-oval points
EYEBROWS = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
FACE_BOX_POINTS = JAW_CONTOUR + EYEBROWS
LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270,
        291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)  # mediapipe FACEMESH_LIPS
EYE_CONTOURS = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246,  # FACEMESH_RIGHT_EYE
                249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)  # FACEMESH_LEFT_EYE
EYE_BOX_HEIGHT = 0.25  # the eye box's height as a fraction of its width (both eyes' corner-to-corner span)

# Head pose: rigid points only (nothing that moves with the jaw, lids or lips).
SYMMETRIC_PAIRS = ((33, 263), (133, 362), (234, 454), (127, 356), (98, 327), (70, 300))  # (right, left)
UPPER_MIDLINE = (10, 151, 9, 8, 168)  # forehead to glabella
LOWER_MIDLINE = (2, 98, 327)  # subnasale and the alar bases
EYE_CORNER_DISTANCE_UM = 90_000.0  # mean adult outer-canthus distance (~90 mm) in BFM units (micrometres)
ROI_SIZE = 120  # 3DDFA_V2 input crop side; pose scale and translation are measured in its pixels

_local = threading.local()  # mediapipe graphs are not thread-safe: one detector and one FaceMesh per thread


@dataclass
class FaceLandmarks:
    """The largest face in an image: `points` (478, 3) float32 pixels; `num_faces` faces were found."""

    points: np.ndarray
    num_faces: int


@dataclass
class PortraitAnalysis:
    """A portrait prepared for rendering and its analysis; all measures refer to `image`.

    image (S, S, 3) uint8 RGB; landmarks (478, 3); pose (6,); eye_ratios (2,); mouth_opening float;
    face_box, lip_box (6,) [x_min, x_max, y_min, y_max, S, S]; crop_box (x0, y0, x1, y1) in the input
    image's pixels (None without cropping); num_faces found in the input; notes for the user.
    """

    image: np.ndarray
    landmarks: np.ndarray
    pose: np.ndarray
    eye_ratios: np.ndarray
    mouth_opening: float
    face_box: np.ndarray
    lip_box: np.ndarray
    crop_box: tuple[int, int, int, int] | None
    num_faces: int
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Detection

_STDERR_LOCK = threading.Lock()
# mediapipe 0.10's own use of a deprecated protobuf call; nothing a user can change
warnings.filterwarnings("ignore", message=r"SymbolDatabase\.GetPrototype\(\) is deprecated", category=UserWarning)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null: mediapipe's C++ side writes start-up lines a user cannot act on
    ("Created TensorFlow Lite XNNPACK delegate", "Feedback manager requires a model with a single signature
    inference") straight to it when a graph is built and first run."""
    with _STDERR_LOCK:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _first_run(make_graph, image: np.ndarray):
    """(graph, its result on `image`): a new mediapipe graph and its first run, with the native start-up
    chatter silenced (later runs print nothing)."""
    with _native_stderr_silenced():
        graph = make_graph()
        return graph, graph.process(image)


def _face_mesh(static_image_mode: bool, max_num_faces: int):
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(static_image_mode=static_image_mode, max_num_faces=max_num_faces,
                                           refine_landmarks=True, min_detection_confidence=0.5,
                                           min_tracking_confidence=0.5)


def _to_pixels(face_landmarks, height: int, width: int) -> np.ndarray:
    """mediapipe NormalizedLandmarkList -> (478, 3) float32 pixels (z scaled by the width, like x)."""
    points = np.array([(p.x, p.y, p.z) for p in face_landmarks.landmark], dtype=np.float32)
    return points * np.array([width, height, width], dtype=np.float32)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")
    return np.ascontiguousarray(image)


def _face_boxes(image: np.ndarray) -> np.ndarray:
    """Faces found by mediapipe's full-range face detector: (F, 4) [x0, y0, x1, y1] in `image`'s pixels."""
    import mediapipe as mp

    height, width = image.shape[:2]
    factor = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    small = image if factor == 1.0 else cv2.resize(image, (max(1, round(width * factor)),
                                                           max(1, round(height * factor))),
                                                   interpolation=cv2.INTER_AREA)
    if hasattr(_local, "detector"):
        result = _local.detector.process(small)
    else:
        _local.detector, result = _first_run(
            lambda: mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5), small)
    boxes = [d.location_data.relative_bounding_box for d in result.detections or []]
    return np.array([[b.xmin * width, b.ymin * height, (b.xmin + b.width) * width, (b.ymin + b.height) * height]
                     for b in boxes], dtype=np.float32).reshape(-1, 4)


def _mesh_points(image: np.ndarray) -> np.ndarray | None:
    """(478, 3) pixel landmarks of the most prominent face in `image` (static-mode face mesh), or None."""
    image = np.ascontiguousarray(image)
    if hasattr(_local, "static_mesh"):
        result = _local.static_mesh.process(image)
    else:
        _local.static_mesh, result = _first_run(lambda: _face_mesh(static_image_mode=True, max_num_faces=1), image)
    faces = result.multi_face_landmarks
    return _to_pixels(faces[0], *image.shape[:2]) if faces else None


def detect_face_landmarks(image: np.ndarray) -> FaceLandmarks | None:
    """Landmarks of the largest face in an RGB uint8 (H, W, 3) image, or None when no face is found.

    The full-range face detector finds and counts the faces (any size, any image size); the face mesh then
    runs on a square crop around the largest one (MESH_CROP_MARGIN x its box, at most MESH_INPUT_SIDE px),
    which also handles faces too small for the mesh's own short-range detector. When the detector finds
    nothing, the mesh gets the whole image.
    """
    image = _check_rgb(image)
    boxes = _face_boxes(image)
    if len(boxes) == 0:
        points = _mesh_points(image)
        return None if points is None else FaceLandmarks(points=points, num_faces=1)
    largest = boxes[np.argmax(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1))]
    side = max(2, int(round(MESH_CROP_MARGIN * max(largest[2:] - largest[:2]))))
    x0, y0 = (np.round((largest[:2] + largest[2:]) / 2 - side / 2)).astype(int)
    work = min(side, MESH_INPUT_SIDE)
    points = _mesh_points(crop_and_resize(image, (x0, y0, x0 + side, y0 + side), work))
    if points is None:
        return None
    points = points * np.float32(side / work) + np.float32([x0, y0, 0])
    return FaceLandmarks(points=points.astype(np.float32), num_faces=len(boxes))


# ----------------------------------------------------------------------------------------------------
# Measures (single face (478, 3) -> per-face values; *_batch: (T, 478, 3) -> (T, ...))

def _distance(landmarks: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.linalg.norm(landmarks[..., a, :] - landmarks[..., b, :], axis=-1)


def eye_ratios_batch(landmarks: np.ndarray) -> np.ndarray:
    """(T, 478, 3) -> (T, 2) float32 (left, right) eyelid gap / eye width, 3-D distances (§7.3)."""
    ratios = [_distance(landmarks, eye["upper"], eye["lower"]) / _distance(landmarks, eye["outer"], eye["inner"])
              for eye in (LEFT_EYE, RIGHT_EYE)]
    return np.stack(ratios, axis=-1).astype(np.float32)


def eye_ratios(landmarks: np.ndarray) -> np.ndarray:
    """(478, 3) -> (2,) float32 (left, right) eye opening ratios (subject's left first, as in §7.3)."""
    return eye_ratios_batch(landmarks[None])[0]


def mouth_opening_batch(landmarks: np.ndarray) -> np.ndarray:
    """(T, 478, 3) -> (T,) float32 inner-lip gap / mouth-corner distance."""
    gap = _distance(landmarks, INNER_LIP_UPPER, INNER_LIP_LOWER)
    return (gap / _distance(landmarks, MOUTH_LEFT, MOUTH_RIGHT)).astype(np.float32)


def mouth_opening(landmarks: np.ndarray) -> float:
    """(478, 3) -> inner-lip gap / mouth width (0 when closed, ~0.3-0.6 wide open)."""
    return float(mouth_opening_batch(landmarks[None])[0])


def _box_batch(landmarks: np.ndarray, indices: tuple[int, ...], image_shape) -> np.ndarray:
    xy = np.trunc(landmarks[..., list(indices), :2])  # integer-truncated like the reference (§7.3)
    height, width = image_shape[:2]
    sides = np.broadcast_to(np.array([height, width], dtype=np.float32), xy.shape[:-2] + (2,))
    return np.concatenate([xy[..., 0].min(-1, keepdims=True), xy[..., 0].max(-1, keepdims=True),
                           xy[..., 1].min(-1, keepdims=True), xy[..., 1].max(-1, keepdims=True), sides],
                          axis=-1).astype(np.float32)


def face_box_batch(landmarks: np.ndarray, image_shape) -> np.ndarray:
    """(T, 478, 3) -> (T, 6) [x_min, x_max, y_min, y_max, H, W] of the jaw contour and brows (68-pt extent)."""
    return _box_batch(landmarks, FACE_BOX_POINTS, image_shape)


def face_box(landmarks: np.ndarray, image_shape) -> np.ndarray:
    """(478, 3) -> (6,) [x_min, x_max, y_min, y_max, H, W] in pixels of the image of shape `image_shape`."""
    return face_box_batch(landmarks[None], image_shape)[0]


def lip_box_batch(landmarks: np.ndarray, image_shape) -> np.ndarray:
    """(T, 478, 3) -> (T, 6) [x_min, x_max, y_min, y_max, H, W] of the lips."""
    return _box_batch(landmarks, LIPS, image_shape)


def lip_box(landmarks: np.ndarray, image_shape) -> np.ndarray:
    """(478, 3) -> (6,) [x_min, x_max, y_min, y_max, H, W] of the lips."""
    return lip_box_batch(landmarks[None], image_shape)[0]


def eye_box_batch(landmarks: np.ndarray, image_shape) -> np.ndarray:
    """(T, 478, 3) -> (T, 6) [x_min, x_max, y_min, y_max, H, W] of both eyes: their corner-to-corner span, and
    EYE_BOX_HEIGHT x that span around the lids' mean height, so the box of a closed eye still covers where
    the open eye was (what a blink changes)."""
    box = _box_batch(landmarks, EYE_CONTOURS, image_shape)
    centre = np.trunc(landmarks[..., list(EYE_CONTOURS), 1]).mean(-1)
    half = 0.5 * EYE_BOX_HEIGHT * (box[..., 1] - box[..., 0])
    box[..., 2], box[..., 3] = np.floor(centre - half), np.ceil(centre + half)
    return box


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def rotation_to_angles(rotation: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotation matrices -> (T, 3) (yaw, pitch, roll) in degrees, 3DDFA's decomposition (§7.2)."""
    r20 = rotation[:, 2, 0]
    a0 = np.arcsin(np.clip(r20, -1, 1))
    cos_a0 = np.cos(a0)
    a1 = np.arctan2(rotation[:, 2, 1] / cos_a0, rotation[:, 2, 2] / cos_a0)
    a2 = np.arctan2(rotation[:, 1, 0] / cos_a0, rotation[:, 0, 0] / cos_a0)
    up, down = r20 > 0.998, r20 < -0.998  # gimbal lock branches of §7.2
    a0 = np.where(up, np.pi / 2, np.where(down, -np.pi / 2, a0))
    a1 = np.where(up, np.arctan2(-rotation[:, 0, 1], -rotation[:, 0, 2]),
                  np.where(down, np.arctan2(rotation[:, 0, 1], rotation[:, 0, 2]), a1))
    a2 = np.where(up | down, 0.0, a2)
    return np.degrees(np.stack([a0, a1, a2], axis=-1))


def head_pose_batch(landmarks: np.ndarray) -> np.ndarray:
    """(T, 478, 3) landmarks -> (T, 6) float32 (yaw, pitch, roll in degrees, scale, tx, ty), 3DDFA style.

    3DDFA (§7.2) fits P = s [R | t] mapping the BFM face (x to the subject's left, y up, z towards the camera,
    micrometres) into its 120 x 120 input crop (y up). Here R comes from the face's own axes in the 3-D
    landmarks (camera frame x right, y up, z towards the camera): x = mean direction right -> left over rigid
    symmetric pairs, y = lower -> upper midline orthogonalised, z = x cross y; the angles use §7.2's
    decomposition, so yaw > 0 when the subject's left side turns towards the camera and roll > 0 for a
    counter-clockwise head tilt in the image. Zero pitch = the forehead-subnasale line in the image plane.
    s = pixels of the 3DDFA crop per micrometre, from the outer eye corners' distance (assumed 90 mm);
    (tx, ty) = the mesh centroid in that crop, ty measured upwards (3DDFA flips y). The crop follows
    3DDFA_V2's box-to-roi rule (side 1.58 x the mean box side, centre lowered by 0.14 x it) applied to the
    mesh's extent. Differences to 3DDFA: no BFM fit (axes and scale from landmarks), a mesh-extent box
    instead of FaceBoxes', and an anthropometric constant for the scale, so (s, tx, ty) are close in range
    but not equal to what 3DDFA would report for the same image.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    camera = landmarks * np.array([1.0, -1.0, -1.0])  # y up, z towards the camera
    right = camera[:, [r for r, _ in SYMMETRIC_PAIRS]]
    left = camera[:, [l for _, l in SYMMETRIC_PAIRS]]
    x_axis = _normalize(_normalize(left - right).sum(1))
    up = camera[:, list(UPPER_MIDLINE)].mean(1) - camera[:, list(LOWER_MIDLINE)].mean(1)
    y_axis = _normalize(up - (up * x_axis).sum(-1, keepdims=True) * x_axis)
    rotation = np.stack([x_axis, y_axis, np.cross(x_axis, y_axis)], axis=-1)  # columns = face axes
    angles = rotation_to_angles(rotation)

    mesh = landmarks[:, :NUM_MESH_POINTS, :2]
    low, high = mesh.min(1), mesh.max(1)
    box_side = (high - low).sum(-1) / 2
    roi_side = 1.58 * box_side
    roi_origin = (low + high) / 2 + np.stack([np.zeros_like(box_side), 0.14 * box_side], -1) - roi_side[:, None] / 2
    crop_scale = ROI_SIZE / roi_side
    scale = _distance(landmarks, RIGHT_EYE["outer"], LEFT_EYE["outer"]) * crop_scale / EYE_CORNER_DISTANCE_UM
    centroid = (mesh.mean(1) - roi_origin) * crop_scale[:, None]
    translation = np.stack([centroid[:, 0] + 1, ROI_SIZE - centroid[:, 1]], -1)  # 3DDFA's pixel offsets
    return np.concatenate([angles, scale[:, None], translation], -1).astype(np.float32)


def head_pose(landmarks: np.ndarray) -> np.ndarray:
    """(478, 3) -> (6,) float32 (yaw, pitch, roll in degrees, scale, tx, ty); see `head_pose_batch`."""
    return head_pose_batch(landmarks[None])[0]


# ----------------------------------------------------------------------------------------------------
# Images in, crops

def to_rgb_uint8(image) -> np.ndarray:
    """Any PIL image or array (gray, gray+alpha, RGB, RGBA, 16-bit, float in [0, 1]) -> (H, W, 3) uint8 RGB.

    Transparency is composited on white; 16-bit values are scaled to 8 bits.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
            image = image.convert("RGBA")
        elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            image = np.asarray(image, dtype=np.uint16)
        elif image.mode == "I":
            image = np.asarray(image)
        elif image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
        image = np.asarray(image)
    array = np.asarray(image)
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype == np.int32 and array.max(initial=0) > 255:  # PIL "I" mode holds 16-bit data
        array = (np.clip(array, 0, 65535) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"not an image array: shape {array.shape}")
    if array.shape[2] in (2, 4):  # composite the alpha channel on white
        alpha = array[:, :, -1:].astype(np.float32) / 255.0
        array = (array[:, :, :-1] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file (any format Pillow knows, EXIF orientation applied) as (H, W, 3) uint8 RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DawnError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb_uint8(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DawnError(f"cannot read the image {path}: {error}") from error


def crop_box(landmarks: np.ndarray, image_shape, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """Square crop (x0, y0, x1, y1) around a face, HDTF-like framing.

    landmarks (478, 3), or (T, 478, 3) for one fixed box covering the face in every frame. Side = `margin`
    x the larger side of the mesh extent; centre lifted by CROP_LIFT x the face height. The box is shifted
    inside the image where it fits; a box larger than the image extends past it (crop_and_resize pads).
    """
    mesh = np.asarray(landmarks)[..., :NUM_MESH_POINTS, :2].reshape(-1, 2)
    low, high = mesh.min(0), mesh.max(0)
    face_w, face_h = high - low
    side = max(2, int(round(margin * max(face_w, face_h))))
    center_x, center_y = (low + high) / 2 - np.array([0.0, CROP_LIFT * face_h])
    height, width = image_shape[:2]

    def place(center: float, extent: int) -> int:
        start = int(round(center - side / 2))
        return min(max(start, 0), extent - side) if side <= extent else start

    x0, y0 = place(center_x, width), place(center_y, height)
    return x0, y0, x0 + side, y0 + side


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Cut `box` (x0, y0, x1, y1) out of (H, W, 3) or (T, H, W, 3) uint8 frames and resize to size x size.

    Parts of the box outside the image replicate the border pixels. cv2.INTER_AREA, one cv2 call per
    frame (cv2's area resampling takes at most 4 channels, so frames cannot be stacked).
    """
    frames = image[None] if image.ndim == 3 else image
    x0, y0, x1, y1 = box
    height, width = frames.shape[1:3]
    pad = ((0, 0), (max(0, -y0), max(0, y1 - height)), (max(0, -x0), max(0, x1 - width)), (0, 0))
    region = frames[:, max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    if any(before or after for before, after in pad[1:3]):
        region = np.pad(region, pad, mode="edge")
    out = np.stack([cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA) for frame in region])
    return np.ascontiguousarray(out[0] if image.ndim == 3 else out)


# ----------------------------------------------------------------------------------------------------
# Portraits and videos

def analyze_portrait(image, size: int, crop: str = "face", name: str | None = None) -> PortraitAnalysis:
    """Prepare a portrait (path, PIL image or array) for rendering and analyse the result.

    crop="face": HDTF-like square crop around the largest face (crop_box), resized to size x size;
    crop="none": the whole image resized to size x size like the reference (aspect not kept, §0).
    The landmarks, pose, eye ratios and boxes are measured on the returned (size, size, 3) image.
    Raises DawnError naming the input when no face is found.
    """
    if crop not in ("face", "none"):
        raise DawnError(f"unknown crop mode {crop!r}: use 'face' or 'none'")
    if isinstance(image, (str, Path)):
        name = name or str(image)
        rgb = load_image(image)
    else:
        rgb = to_rgb_uint8(image)
    name = name or "the portrait"
    found = detect_face_landmarks(rgb)
    if found is None:
        raise DawnError(f"no face found in {name}")
    notes = [f"{found.num_faces} faces found, using the largest"] if found.num_faces > 1 else []
    height, width = rgb.shape[:2]
    if crop == "face":
        box = crop_box(found.points, rgb.shape)
        out = crop_and_resize(rgb, box, size)
        factor = size / (box[2] - box[0])
        mapped = (found.points - np.float32([box[0], box[1], 0])) * factor
    else:
        box = None
        out = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        mapped = found.points * np.float32([size / width, size / height, size / width])
    again = detect_face_landmarks(out)
    if again is None:
        notes.append("the face was not re-detected after resizing; using the landmarks found before")
    points = mapped.astype(np.float32) if again is None else again.points
    return PortraitAnalysis(image=out, landmarks=points, pose=head_pose(points), eye_ratios=eye_ratios(points),
                            mouth_opening=mouth_opening(points), face_box=face_box(points, out.shape),
                            lip_box=lip_box(points, out.shape), crop_box=box, num_faces=found.num_faces,
                            notes=notes)


def analyze_video_frames(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Track one face through (T, H, W, 3) uint8 RGB frames (one FaceMesh in tracking mode).

    Returns float32 arrays: landmarks (T, 478, 3), pose (T, 6), eye_ratios (T, 2), mouth_opening (T,),
    face_box (T, 6), lip_box (T, 6), eye_box (T, 6), and found (T,) bool. Frames without a face repeat the nearest frame
    with one (found=False marks them). Raises DawnError when no frame shows a face.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
    num, height, width = frames.shape[:3]
    landmarks = np.zeros((num, NUM_LANDMARKS, 3), dtype=np.float32)
    found = np.zeros(num, dtype=bool)
    mesh, first = _first_run(lambda: _face_mesh(static_image_mode=False, max_num_faces=1),
                             np.ascontiguousarray(frames[0]))
    with mesh:
        for index in range(num):  # mediapipe tracks frame by frame
            result = first if index == 0 else mesh.process(np.ascontiguousarray(frames[index]))
            faces = result.multi_face_landmarks
            if faces:
                landmarks[index], found[index] = _to_pixels(faces[0], height, width), True
    if not found.any():
        raise DawnError(f"no face found in any of the {num} frames")
    found_at, index = np.flatnonzero(found), np.arange(num)
    after = np.searchsorted(found_at, index).clip(max=len(found_at) - 1)
    before = (after - 1).clip(min=0)
    closer_before = np.abs(index - found_at[before]) <= np.abs(found_at[after] - index)
    nearest = np.where(closer_before, found_at[before], found_at[after])
    landmarks = landmarks[nearest]
    return dict(landmarks=landmarks, pose=head_pose_batch(landmarks), eye_ratios=eye_ratios_batch(landmarks),
                mouth_opening=mouth_opening_batch(landmarks), face_box=face_box_batch(landmarks, (height, width)),
                lip_box=lip_box_batch(landmarks, (height, width)), eye_box=eye_box_batch(landmarks, (height, width)),
                found=found)
