"""dawn.face on skimage's astronaut: landmarks, pose conventions (§7.2), eye/mouth measures, crops, portraits."""

import cv2
import numpy as np
import pytest
from PIL import Image

from dawn import DawnError
from dawn.face import (LEFT_EYE, NUM_LANDMARKS, RIGHT_EYE, analyze_portrait, analyze_video_frames, crop_and_resize,
                       crop_box, detect_face_landmarks, eye_ratios, eye_ratios_batch, face_box, head_pose,
                       eye_box_batch, head_pose_batch, lip_box, load_image, mouth_opening, mouth_opening_batch)

pytestmark = pytest.mark.filterwarnings("ignore:SymbolDatabase.GetPrototype")  # mediapipe + protobuf 4.25


def landmarks_of(image: np.ndarray) -> np.ndarray:
    found = detect_face_landmarks(image)
    assert found is not None
    return found.points


def rotate_image(image: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise (as displayed) rotation about the image centre."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)


def turn_head(image: np.ndarray, points: np.ndarray, degrees: float) -> np.ndarray:
    """Cylinder warp that turns the face about a vertical axis: > 0 moves the subject's left side (image
    right) away, so the subject seems to look towards image right."""
    height, width = image.shape[:2]
    center = points[:, 0].mean()
    radius = points[:, 0].max() - points[:, 0].min()
    columns = np.arange(width, dtype=np.float64)
    angle = np.arcsin(np.clip((columns - center) / radius, -1, 1)) - np.radians(degrees)
    source = center + radius * np.sin(np.clip(angle, -np.pi / 2, np.pi / 2))
    outside = np.abs(columns - center) >= radius
    source[outside] = columns[outside]
    map_x = np.tile(source.astype(np.float32), (height, 1))
    map_y = np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width))
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def squash_vertically(image, center_x, center_y, half_width, half_height, factor):
    """Scale the content around (center_x, center_y) vertically by `factor` inside a smooth window."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    weight = (np.sin(np.pi / 2 * np.clip(1 - np.abs(xs - center_x) / half_width, 0, 1))
              * np.sin(np.pi / 2 * np.clip(1 - np.abs(ys - center_y) / half_height, 0, 1)))
    source_y = ys + weight * ((ys - center_y) / factor - (ys - center_y))
    return cv2.remap(image, xs, source_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def points(astronaut):
    return landmarks_of(astronaut)


def test_landmarks_on_the_astronaut(astronaut, points):
    found = detect_face_landmarks(astronaut)
    assert found.points.shape == (NUM_LANDMARKS, 3) and found.points.dtype == np.float32 and found.num_faces == 1
    x_min, x_max, y_min, y_max, height, width = face_box(points, astronaut.shape)
    assert (height, width) == (512, 512)
    assert 150 < x_min < 200 and 250 < x_max < 300 and 70 < y_min < 120 and 160 < y_max < 200  # her face
    # the subject's left eye is on the image's right; lips lie inside the face box, below the eyes
    assert points[LEFT_EYE["outer"], 0] > points[RIGHT_EYE["outer"], 0]
    lx0, lx1, ly0, ly1 = lip_box(points, astronaut.shape)[:4]
    assert x_min < lx0 < lx1 < x_max and points[LEFT_EYE["outer"], 1] < ly0 < ly1 < y_max
    # the eye box spans both eyes' corners, lies above the lips and holds both open eyes' lids
    ex0, ex1, ey0, ey1 = eye_box_batch(points[None], astronaut.shape)[0, :4]
    corners = points[[RIGHT_EYE["outer"], LEFT_EYE["outer"]]]
    assert ex0 <= corners[:, 0].min() and ex1 >= corners[:, 0].max() - 1 and ey1 < ly0
    lids = points[[RIGHT_EYE["upper"], RIGHT_EYE["lower"], LEFT_EYE["upper"], LEFT_EYE["lower"]], 1]
    assert ey0 < lids.min() and lids.max() < ey1
    assert ey1 - ey0 == pytest.approx(0.25 * (ex1 - ex0), abs=2)
    # closing the lids onto each other leaves the box where it was (it covers where the open eye was)
    closed = points.copy()
    for eye in (RIGHT_EYE, LEFT_EYE):
        closed[[eye["upper"], eye["lower"]], 1] = points[[eye["upper"], eye["lower"]], 1].mean()
    np.testing.assert_allclose(eye_box_batch(closed[None], astronaut.shape)[0, :4], [ex0, ex1, ey0, ey1], atol=1)
    assert detect_face_landmarks(np.zeros((256, 256, 3), np.uint8)) is None


def test_several_faces_take_the_largest(astronaut, points):
    canvas = np.full((700, 1100, 3), 200, np.uint8)
    canvas[:512, :512] = astronaut
    canvas[300:684, 600:984] = cv2.resize(astronaut, (384, 384), interpolation=cv2.INTER_AREA)
    found = detect_face_landmarks(canvas)
    assert found.num_faces == 2
    np.testing.assert_allclose(found.points[:, :2].mean(0), points[:, :2].mean(0), atol=3)


def test_roll_follows_an_image_rotation(astronaut, points):
    base = head_pose(points)
    rotated = head_pose(landmarks_of(rotate_image(astronaut, 15)))
    assert rotated[2] - base[2] == pytest.approx(15, abs=2)
    assert abs(rotated[0] - base[0]) < 3  # yaw barely moves


def test_flip_changes_the_sign_of_yaw_and_roll(astronaut, points):
    turned = turn_head(astronaut, points, -25)
    pose, flipped = head_pose(landmarks_of(turned)), head_pose(landmarks_of(turned[:, ::-1].copy()))
    assert pose[0] > 3 and flipped[0] < -3  # the turned head has a clear yaw that mirrors
    assert pose[2] < -1.5 and flipped[2] > 1.5  # her slight head tilt mirrors too
    assert abs(pose[0] + flipped[0]) < 0.5 * abs(pose[0])
    other_way = head_pose(landmarks_of(turn_head(astronaut, points, 25)))
    assert other_way[0] < head_pose(points)[0] < pose[0]


def test_pose_conventions_on_rotated_landmarks(points):
    """Rotating the 3-D landmarks themselves: yaw > 0 brings the subject's left side (image right) nearer
    (mediapipe z smaller), roll > 0 tilts the head counter-clockwise in the image (y down)."""
    center = points.mean(0)
    centred = points - center
    a = np.radians(20)
    yawed = centred.copy()
    yawed[:, 0] = centred[:, 0] * np.cos(a) + centred[:, 2] * np.sin(a)
    yawed[:, 2] = -centred[:, 0] * np.sin(a) + centred[:, 2] * np.cos(a)
    b = np.radians(15)
    rolled = centred.copy()  # counter-clockwise on screen = clockwise in y-down coordinates
    rolled[:, 0] = centred[:, 0] * np.cos(b) + centred[:, 1] * np.sin(b)
    rolled[:, 1] = -centred[:, 0] * np.sin(b) + centred[:, 1] * np.cos(b)
    poses = head_pose_batch(np.stack([centred, yawed, rolled]) + center)
    assert poses.shape == (3, 6) and poses.dtype == np.float32
    assert poses[1, 0] - poses[0, 0] == pytest.approx(20, abs=1.5)
    assert poses[2, 2] - poses[0, 2] == pytest.approx(15, abs=0.5)
    np.testing.assert_allclose(poses[2, [0, 1, 3]], poses[0, [0, 1, 3]], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(poses[0], head_pose(points), rtol=1e-5, atol=1e-5)


def test_scale_and_translation_are_in_3ddfa_crop_units(astronaut, points):
    pose = head_pose(points)
    # the range of 3DDFA's values (its fallback is s = 4.79e-4, t = (56.5, 64.9)) and PBNet's bounds (§5.3)
    assert 3e-4 < pose[3] < 8e-4 and 40 < pose[4] < 80 and 45 < pose[5] < 90
    doubled = head_pose(landmarks_of(cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)))
    np.testing.assert_allclose(doubled[3:], pose[3:], rtol=0.05)  # independent of the image size
    np.testing.assert_allclose(doubled[:3], pose[:3], atol=2.0)


def test_eye_and_mouth_measures_respond_to_warps(astronaut, points):
    eyes, mouth = eye_ratios(points), mouth_opening(points)
    assert eyes.shape == (2,) and np.all((0.2 < eyes) & (eyes < 0.45))
    assert 0.05 < mouth < 0.35  # her smile shows teeth
    squinting = astronaut
    for eye in (LEFT_EYE, RIGHT_EYE):
        center = (points[eye["outer"]] + points[eye["inner"]]) / 2
        width = abs(points[eye["outer"], 0] - points[eye["inner"], 0])
        squinting = squash_vertically(squinting, center[0], center[1], width, 0.8 * width, 0.4)
    assert np.all(eye_ratios(landmarks_of(squinting)) < eyes - 0.07)
    lips = (points[13] + points[14]) / 2
    mouth_width = abs(points[61, 0] - points[291, 0])
    opened = squash_vertically(astronaut, lips[0], lips[1], 0.9 * mouth_width, mouth_width, 2.0)
    assert mouth_opening(landmarks_of(opened)) > mouth + 0.08
    batch = np.stack([points, landmarks_of(opened)])
    np.testing.assert_allclose(eye_ratios_batch(batch)[0], eyes, rtol=1e-6)
    np.testing.assert_allclose(mouth_opening_batch(batch)[0], mouth, rtol=1e-6)


def test_crop_box_frames_the_face(astronaut, points):
    x0, y0, x1, y1 = crop_box(points, astronaut.shape)
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 512
    extent = points[:468, :2].max(0) - points[:468, :2].min(0)
    assert (x1 - x0) == pytest.approx(1.8 * extent.max(), abs=1)
    assert x0 < points[:, 0].min() and points[:, 0].max() < x1 and y0 < points[:, 1].min()
    crop = crop_and_resize(astronaut, (x0, y0, x1, y1), 128)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    # near a border the box keeps its size: shifted inside the image, or padded when larger than the image
    shifted = points - np.float32([150, 0, 0])
    assert crop_box(shifted, astronaut.shape)[0] == 0
    small_image = (150, 150, 3)
    bx0, by0, bx1, by1 = crop_box(points - np.float32([150, 40, 0]), small_image)
    assert bx1 - bx0 > 150 and (bx0 < 0 or by0 < 0 or bx1 > 150)
    padded = crop_and_resize(astronaut[:150, :150], (bx0, by0, bx1, by1), 64)
    assert padded.shape == (64, 64, 3)


def test_crop_and_resize_of_a_batch_equals_frame_by_frame(astronaut):
    frames = np.stack([np.roll(astronaut, 7 * i, axis=1) for i in range(5)])
    box = (-20, 100, 300, 420)
    batch = crop_and_resize(frames, box, 96)
    assert batch.shape == (5, 96, 96, 3)
    for index in range(5):
        np.testing.assert_array_equal(batch[index], crop_and_resize(frames[index], box, 96))
    padded = np.pad(astronaut, ((0, 0), (20, 0), (0, 0)), mode="edge")
    np.testing.assert_array_equal(batch[0], cv2.resize(padded[100:420, 0:320], (96, 96),
                                                       interpolation=cv2.INTER_AREA))


def test_analyze_portrait(astronaut):
    result = analyze_portrait(astronaut, 128)
    assert result.image.shape == (128, 128, 3) and result.image.dtype == np.uint8
    assert result.landmarks.shape == (478, 3) and result.pose.shape == (6,) and result.eye_ratios.shape == (2,)
    assert result.num_faces == 1 and result.notes == []
    x_min, x_max, y_min, y_max, height, width = result.face_box
    assert (height, width) == (128, 128)
    assert (x_max - x_min) / 128 == pytest.approx(1 / 1.8, abs=0.12)  # HDTF-like framing
    assert 20 < (x_min + x_max) / 2 < 108 and 30 < (y_min + y_max) / 2 < 100
    whole = analyze_portrait(astronaut, 128, crop="none")
    assert whole.crop_box is None and whole.face_box[1] - whole.face_box[0] < 40  # the face stays small


def test_portrait_variants(tmp_path, astronaut):
    reference = analyze_portrait(astronaut, 128)
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([astronaut, np.full((512, 512), 255, np.uint8)])
    rgba[:40, :, 3] = 0  # a transparent band: composited on white
    deep = astronaut.astype(np.uint16) * 257
    huge = cv2.resize(astronaut, (3000, 3000), interpolation=cv2.INTER_LINEAR)
    for variant in (gray, rgba, deep, huge, Image.fromarray(astronaut).convert("P")):
        result = analyze_portrait(variant, 128)
        assert result.image.shape == (128, 128, 3)
        np.testing.assert_allclose(result.pose[:3], reference.pose[:3], atol=4)
    assert analyze_portrait(rgba, 64, crop="none").image[0].min() > 240  # white where transparent
    np.testing.assert_array_equal(analyze_portrait(deep, 128).image, reference.image)
    Image.fromarray(astronaut).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert analyze_portrait(tmp_path / "cmyk.jpg", 96).image.shape == (96, 96, 3)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").shape == (512, 512, 3)


def test_portrait_errors_name_the_file(tmp_path):
    Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(DawnError, match="no face found in .*blank.png"):
        analyze_portrait(tmp_path / "blank.png", 128)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name in ("broken.jpg", "missing.png"):
        with pytest.raises(DawnError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(DawnError, match="crop mode"):
        analyze_portrait(np.zeros((64, 64, 3), np.uint8), 64, crop="square")


def test_analyze_video_frames(astronaut, points):
    frames = np.stack([rotate_image(astronaut, angle) for angle in (0, 3, 6, 9)] + [np.zeros_like(astronaut)]
                      + [rotate_image(astronaut, 12)])
    result = analyze_video_frames(frames)
    assert result["found"].tolist() == [True, True, True, True, False, True]
    shapes = {key: value.shape for key, value in result.items()}
    assert shapes == {"landmarks": (6, 478, 3), "pose": (6, 6), "eye_ratios": (6, 2), "mouth_opening": (6,),
                      "face_box": (6, 6), "lip_box": (6, 6), "eye_box": (6, 6), "found": (6,)}
    roll = result["pose"][:, 2]
    assert np.all(np.diff(roll[:4]) > 1.5) and roll[5] - roll[0] == pytest.approx(12, abs=2.5)
    np.testing.assert_array_equal(result["landmarks"][4], result["landmarks"][3])  # nearest frame with a face
    np.testing.assert_allclose(result["landmarks"][0], points, atol=6)
    with pytest.raises(DawnError, match="no face"):
        analyze_video_frames(np.zeros((2, 64, 64, 3), np.uint8))
