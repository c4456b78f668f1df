"""Face analysis with mediapipe's face mesh (478 landmarks, model bundled in the mediapipe 0.10.14 wheel).

Landmark arrays are (478, 3) float32 — or (T, 478, 3) for a video — in pixels of the analysed image:
x to the right, y down, z = mediapipe's relative depth scaled by the image width (smaller = nearer).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from dawn import DawnError

NUM_LANDMARKS = 478  # 468 mesh points + 2 x 5 iris points (refine_landmarks=True)
MAX_FACES = 5  # faces the detector looks for; more faces than this are still reported as MAX_FACES

_local = threading.local()  # mediapipe graphs are not thread-safe: one static-mode FaceMesh per thread


@dataclass
class FaceLandmarks:
    """The largest face in an image: `points` (478, 3) float32 pixels; `num_faces` faces were found."""

    points: np.ndarray
    num_faces: int


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


def detect_face_landmarks(image: np.ndarray) -> FaceLandmarks | None:
    """Landmarks of the largest face in an RGB uint8 (H, W, 3) image, or None when no face is found."""
    image = _check_rgb(image)
    if not hasattr(_local, "static_mesh"):
        _local.static_mesh = _face_mesh(static_image_mode=True, max_num_faces=MAX_FACES)
    result = _local.static_mesh.process(image)
    faces = result.multi_face_landmarks or []
    if not faces:
        return None
    height, width = image.shape[:2]
    all_points = [_to_pixels(face, height, width) for face in faces]
    areas = [np.prod(p[:, :2].max(0) - p[:, :2].min(0)) for p in all_points]
    return FaceLandmarks(points=all_points[int(np.argmax(areas))], num_faces=len(faces))
