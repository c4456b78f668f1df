"""Metrics: Fréchet distance, lip-sync proxy, blinks, BAS, DR, the metric networks' shapes and weight loading,
SyncNet's MFCC and offset search, and the offline identity similarity."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dawn import DawnError
from dawn.metrics import frechet, identity, lipsync, motion, sync


# ----------------------------------------------------------------------------------------------------
# Fréchet distance

def test_frechet_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((40, 64), (300, 16)):  # fewer and more samples than dimensions (both code paths)
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d)
        scale = 2 * np.trace(np.cov(x, rowvar=False))
        assert frechet.frechet_distance_features(x, x) <= 1e-6 * scale
        mu, sigma = frechet.feature_statistics(x)
        assert frechet.frechet_distance(mu, sigma, mu, sigma) <= 1e-6 * scale


def test_frechet_textbook_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # |mu1 - mu2|^2 + sum(var1 + var2 - 2 sqrt(var1 var2)) = (1 + 0 + 6.25) + (4 + 1 + 0)
    assert frechet.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(12.25, rel=1e-12)


def test_frechet_full_covariances_match_scipy_and_sample_formula():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(30, 50)), rng.normal(size=(40, 50)) @ rng.normal(size=(50, 50)) * 0.3 + 0.2
    (mu1, s1), (mu2, s2) = frechet.feature_statistics(x1), frechet.feature_statistics(x2)
    scipy_value = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_value, rel=1e-6)
    assert frechet.frechet_distance_features(x1, x2) == pytest.approx(scipy_value, rel=1e-6)  # N < D path


# ----------------------------------------------------------------------------------------------------
# Lip-sync proxy

def _syllable_envelope(num_frames: int, seed: int = 0) -> np.ndarray:
    """Irregular syllable-like energy: random bursts smoothed over ~2 frames."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(seed)
    bursts = (rng.uniform(size=num_frames) < 0.25) * rng.uniform(0.5, 1.0, size=num_frames)
    return gaussian_filter1d(bursts, 1.5)


def test_lip_sync_proxy_drops_for_a_shifted_mouth():
    envelope = _syllable_envelope(250)
    aligned, lag = lipsync.lag_correlation(envelope, envelope)
    assert aligned == pytest.approx(1.0) and lag == 0
    late, lag = lipsync.lag_correlation(np.roll(envelope, 2), envelope)  # within the +-2 search: found
    assert late == pytest.approx(1.0, abs=0.02) and lag == 2
    shifted, _ = lipsync.lag_correlation(np.roll(envelope, 6), envelope)
    assert shifted < 0.5 < aligned


def test_lip_sync_proxy_on_audio_uses_the_speech_envelope():
    envelope = _syllable_envelope(100, seed=3)
    rng = np.random.default_rng(0)
    gain = np.repeat(envelope, 640)  # constant gain within each 40 ms frame
    waveform = (rng.normal(size=len(gain)) * gain).astype(np.float32)
    aligned = lipsync.lip_sync_proxy(envelope, waveform)
    shifted = lipsync.lip_sync_proxy(np.roll(envelope, 6), waveform)
    assert aligned["correlation"] > 0.9 and aligned["envelope"].shape == (100,)
    assert shifted["correlation"] < aligned["correlation"] - 0.4


# ----------------------------------------------------------------------------------------------------
# Blinks, BAS, DR, track statistics

def test_three_blinks_in_four_seconds():
    rng = np.random.default_rng(0)
    eyes = 0.3 + rng.normal(0, 0.01, size=(100, 2))  # 4 s at 25 fps, both eyes
    for start in (10, 45, 80):
        eyes[start:start + 5] = np.array([0.25, 0.12, 0.05, 0.1, 0.22])[:, None]  # a 200 ms closure, reopening
    assert motion.blink_events(eyes) == 3
    assert motion.blinks_per_second(eyes) == pytest.approx(0.75)
    eyes[97:] = 0.05  # closing at the very end: not a completed blink
    assert motion.blink_events(eyes) == 3
    assert motion.blink_events(0.3 + rng.normal(0, 0.01, size=100)) == 0


def test_bas_higher_for_aligned_beats():
    rng = np.random.default_rng(0)
    audio = np.sort(rng.choice(np.arange(5, 245), size=20, replace=False)).astype(float)
    aligned = motion.beat_align_score(audio + rng.normal(0, 1, size=20), audio)
    random = np.mean([motion.beat_align_score(np.sort(rng.uniform(0, 250, size=20)), audio) for _ in range(20)])
    assert aligned > 0.8 and random < 0.6 and aligned > random + 0.3


def test_bas_end_to_end_from_audio_clicks_and_head_turns():
    rng = np.random.default_rng(1)
    frames = 250  # 10 s
    beats = np.cumsum(rng.uniform(12, 25, size=12)).round().astype(int)
    beats = beats[beats < frames - 5]
    waveform = rng.normal(0, 0.001, size=frames * 640).astype(np.float32)
    for b in beats:  # a 30 ms noise burst at each beat
        waveform[b * 640:b * 640 + 480] += rng.normal(0, 0.3, size=480).astype(np.float32)
    onsets = motion.audio_onsets(waveform)
    assert len(onsets) == len(beats) and np.abs(onsets - beats).max() < 1.0

    def head_turning_at(turns):  # yaw swings between 0 and 5 degrees, coming to rest at `turns`
        knots = np.concatenate([[0], turns, [frames - 1]])
        segment = np.clip(np.searchsorted(knots, np.arange(frames), side="right") - 1, 0, len(knots) - 2)
        progress = (np.arange(frames) - knots[segment]) / (knots[segment + 1] - knots[segment])
        start = 5.0 * (segment % 2)
        yaw = start + (5.0 - 2 * start) * (1 - np.cos(np.pi * progress)) / 2
        return np.stack([yaw] + [np.zeros(frames)] * 5, axis=1)

    aligned = motion.head_motion_bas(head_turning_at(beats), waveform)
    shuffled = motion.head_motion_bas(head_turning_at(np.sort(rng.choice(np.arange(5, 245), len(beats), False))),
                                      waveform)
    assert aligned > 0.7 and aligned > shuffled + 0.3


def test_degradation_rate():
    rng = np.random.default_rng(0)
    real = [rng.normal(size=(100, 8)) for _ in range(3)]
    steady = [r + 0.5 for r in real]  # the same offset everywhere: no degradation
    drifting = [r + 0.5 + np.linspace(0, 1.5, 100)[:, None] for r in real]  # gets worse over time
    assert motion.degradation_rate(steady, real, 25) == pytest.approx(0.0, abs=1e-9)
    assert motion.degradation_rate(drifting, real, 25) > 1.0
    assert motion.degradation_rate(drifting, real, 50) > 0.5


def test_track_statistics():
    t = np.linspace(0, 4 * np.pi, 100)
    truth = np.stack([np.sin(t), np.cos(t)], 1)
    stats = motion.track_statistics(2 * truth + 1, truth)
    np.testing.assert_allclose(stats["std_ratio"], [2, 2], rtol=1e-9)
    np.testing.assert_allclose(stats["correlation"], [1, 1], rtol=1e-9)
    np.testing.assert_allclose(stats["mae"], np.abs(truth + 1).mean(0), rtol=1e-9)


# ----------------------------------------------------------------------------------------------------
# SyncNet front end and scoring

def test_mfcc_matches_python_speech_features():
    t = np.arange(1600) / 16000
    waveform = 3000 * np.sin(2 * np.pi * 440 * t) + 1000 * np.sin(2 * np.pi * 1200 * t)
    coefficients = sync.mfcc(waveform)
    assert coefficients.shape == (9, 13)
    expected = [  # python_speech_features 0.6.1 mfcc(waveform, 16000), frames 0 and 5
        [17.678409, 14.006679, -11.687416, -19.006821, -9.523598, -9.140645, -28.775056, -44.501354, -24.407138,
         20.590449, 47.480943, 31.198051, -3.885879],
        [17.687625, 15.446678, -10.743648, -18.650368, -8.655061, -7.002068, -25.967015, -42.564554, -24.001471,
         19.977872, 47.560158, 32.549637, -1.908594]]
    np.testing.assert_allclose(coefficients[[0, 5]], expected, atol=2e-6)


def test_sync_offset_search_finds_the_shift():
    torch.manual_seed(0)
    video = torch.randn(60, 16)
    audio = torch.roll(video, 3, dims=0)  # audio window i + 3 matches video window i
    scores = sync.sync_scores(sync.offset_distances(video, audio))
    assert scores.offset == -3 and scores.distances.shape == (31,)
    assert scores.lse_d < 2.0 and scores.lse_c > 3.0  # the matched offset stands out from the median


def test_syncnet_windows_and_scores_with_random_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "syncnet_v2.model"
    torch.save(sync.SyncNet().state_dict(), path)
    scorer = sync.SyncNetScorer(path)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(12, 48, 48, 3), dtype=np.uint8)
    waveform = rng.normal(0, 0.1, size=12 * 640).astype(np.float32)
    video, audio = scorer.windows(frames, waveform)
    assert video.shape == (7, 3, 5, 224, 224) and audio.shape == (7, 1, 13, 20)
    with torch.no_grad():
        assert scorer.model.forward_lip(video[:2]).shape == (2, 1024)
        assert scorer.model.forward_aud(audio[:2]).shape == (2, 1024)
    scores = scorer(frames, waveform)
    assert np.isfinite(scores.lse_d) and scores.lse_c >= 0 and -15 <= scores.offset <= 15


# ----------------------------------------------------------------------------------------------------
# Metric networks: input shapes, feature sizes, weight files

def test_inception_and_i3d_shapes_with_random_weights():
    torch.manual_seed(0)
    with torch.no_grad():
        assert frechet.FIDInceptionV3().eval()(torch.rand(1, 3, 64, 64)).shape == (1, 2048)
        i3d = frechet.InceptionI3d().eval()
        clip = torch.rand(1, 3, 16, 224, 224) * 2 - 1
        assert i3d(clip).shape == (1, 400)
        assert i3d(clip, features="pool").shape == (1, 1024)


def test_iresnet50_shape_and_arcface_alignment(astronaut):
    torch.manual_seed(0)
    model = identity.iresnet50()
    assert sum(p.numel() for p in model.parameters()) > 40e6  # IResNet-50: ~43.6M parameters
    embedder = identity.ArcFaceEmbedder(model=model)
    embeddings, found = embedder(np.stack([astronaut, np.zeros_like(astronaut)]))
    assert embeddings.shape == (2, 512) and found.tolist() == [True, False]
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, rtol=1e-5)
    landmarks, _ = identity.detect_landmarks(astronaut[None])
    aligned = identity.align_faces(astronaut[None], identity.five_points(landmarks))  # eyes on the template
    warped = identity.similarity_transforms(identity.five_points(landmarks), identity.ARCFACE_TEMPLATE)
    assert aligned.shape == (1, 3, 112, 112)
    eyes = np.einsum("ij,kj->ki", warped[0, :, :2], identity.five_points(landmarks)[0, :2]) + warped[0, :, 2]
    np.testing.assert_allclose(eyes, identity.ARCFACE_TEMPLATE[:2], atol=3.0)


def test_weights_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    loaders = [(frechet.InceptionFeatures, "pt_inception-2015-12-05"), (frechet.I3DFeatures, "i3d_pretrained_400.pt"),
               (sync.SyncNetScorer, "syncnet_v2.model"), (identity.ArcFaceEmbedder, "backbone.pth")]
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    for loader, file_name in loaders:  # each error names the file the user has to provide
        with pytest.raises(DawnError, match=f"not found.*{file_name}"):
            loader(tmp_path / "missing.pth")
        with pytest.raises(DawnError, match=f"cannot read.*{file_name}"):
            loader(tmp_path / "garbage.pth")
        with pytest.raises(DawnError, match=f"missing.*unexpected.*{file_name}"):
            loader(tmp_path / "other.pth")
    reference = frechet.InceptionI3d()
    state = reference.state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "i3d.pt")
    loaded = frechet.I3DFeatures(tmp_path / "i3d.pt").model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items() if "num_batches" not in k)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    frechet.I3DFeatures(tmp_path / "wrapped.pt")  # training checkpoint / DataParallel layouts load too
    state["Mixed_5c.b0.bn.weight"] = torch.zeros(7)
    torch.save(state, tmp_path / "wrong_shape.pt")
    with pytest.raises(DawnError, match="wrong shape.*Mixed_5c.b0.bn.weight"):
        frechet.I3DFeatures(tmp_path / "wrong_shape.pt")


# ----------------------------------------------------------------------------------------------------
# Offline identity similarity

def _grace_hopper() -> np.ndarray:
    import matplotlib
    from PIL import Image

    return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB"))


def _mild_warp(image: np.ndarray, angle: float, scale: float, shift: tuple[float, float], seed: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    matrix[:, 2] += shift
    warped = cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT).astype(np.float64)
    noisy = warped + np.random.default_rng(seed).normal(0, 6, size=warped.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_offline_identity_separates_two_faces(astronaut):
    grace = _grace_hopper()
    same_astronaut = identity.offline_identity_similarity(astronaut, _mild_warp(astronaut, 4, 1.05, (8, -5), 0))
    same_grace = identity.offline_identity_similarity(grace, _mild_warp(grace, -3, 0.95, (-6, 4), 1))
    different = identity.offline_identity_similarity(astronaut, grace)
    assert set(different) == {"geometry", "colour", "texture", "identity"}
    assert min(same_astronaut["identity"], same_grace["identity"]) > 0.8
    assert different["identity"] < 0.65
    for key in ("geometry", "colour", "texture"):  # every term points the same way
        assert different[key] < min(same_astronaut[key], same_grace[key])
    with pytest.raises(DawnError, match="no face"):
        identity.offline_identity_similarity(astronaut, np.zeros((128, 128, 3), np.uint8))


def test_video_identity_similarity_against_the_portrait(astronaut):
    import cv2

    small = cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)  # upscaled for detection
    video = np.stack([_mild_warp(small, a, 1.0, (0, 0), s) for s, a in enumerate((-2, 0, 2))])
    scores = identity.video_identity_similarity(video, astronaut, max_frames=3)
    other = identity.video_identity_similarity(video, _grace_hopper(), max_frames=3)
    assert scores["identity"] > other["identity"] + 0.2


def test_fvd_uses_back_to_back_clips_of_each_video():
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 255, size=(40, 8, 8, 3), dtype=np.uint8) for _ in range(2)]
    generated = [np.clip(v.astype(int) + 40, 0, 255).astype(np.uint8) for v in real]
    seen = []

    def per_frame_brightness(clips):  # a stand-in for I3D: (B, T, H, W, 3) -> (B, T)
        seen.append(clips.shape)
        return clips.mean(axis=(2, 3, 4))

    assert frechet.video_clips(real[0], 16).shape == (2, 16, 8, 8, 3)  # frames 32-39 do not fill a clip
    value = frechet.fvd(generated, real, per_frame_brightness, clip_length=16)
    assert seen == [(2, 16, 8, 8, 3)] * 4
    assert value > 100 and frechet.fvd(real, real, per_frame_brightness, clip_length=16) == pytest.approx(0, abs=1e-6)
    with pytest.raises(DawnError, match="FVD32"):
        frechet.fvd([generated[0]], [real[0]], per_frame_brightness, clip_length=32)


def test_jitter_of_a_sine_is_its_analytic_acceleration_and_noise_raises_it():
    from dawn.metrics.motion import jitter

    fps, amplitude, frequency = 25, 3.0, 0.5  # 3 degrees, one sway every 2 s
    t = np.arange(20 * fps) / fps  # 10 whole periods
    sway = amplitude * np.sin(2 * np.pi * frequency * t)
    analytic = amplitude * (2 * np.pi * frequency) ** 2 * 2 / np.pi  # mean |x''| of a sine
    (smooth,) = jitter(sway, fps)
    assert smooth == pytest.approx(analytic, rel=0.01)
    noisy = sway + np.random.default_rng(0).normal(0, 0.5, len(t))  # +-0.5 degree frame-to-frame noise
    (rough,) = jitter(noisy, fps)
    assert rough > 10 * smooth
    # white noise of std s: the second difference has std s * sqrt(6), its mean |.| is that * sqrt(2 / pi)
    assert rough == pytest.approx(0.5 * np.sqrt(6) * np.sqrt(2 / np.pi) * fps ** 2, rel=0.1)
    per_component = jitter(np.stack([sway, np.zeros_like(sway), noisy], 1), fps)
    assert per_component.shape == (3,) and per_component[1] == 0 and per_component[2] == rough
    assert np.isnan(jitter(np.zeros((2, 6)))).all()
