"""Evaluation core without rendering or face analysis: set-level metrics, the mean row, the markdown table."""

import numpy as np
import pytest

from dawn.evaluation import COLUMNS, VideoScore, markdown_report, mean_row, set_metrics
from dawn.metrics import frechet, motion


def _score(video_id: str, features: dict, **values) -> VideoScore:
    row = {"id": video_id, **{name: None for name in COLUMNS}, **values}
    return VideoScore(row=row, tracks={}, details={}, features=features)


def test_set_metrics_from_per_video_features():
    rng = np.random.default_rng(0)
    videos = []
    for k in range(3):
        real = rng.normal(size=(60, 12))
        generated = real + 0.3 + np.linspace(0, 1, 60)[:, None]  # worse towards the end
        clips = (rng.normal(size=(3, 5)), rng.normal(size=(3, 5)) + 1)
        videos.append(_score(f"v{k}", {"inception": (generated, real), "i3d16": clips}))
    out = set_metrics(videos)
    generated = np.concatenate([v.features["inception"][0] for v in videos])
    real = np.concatenate([v.features["inception"][1] for v in videos])
    assert out["fid"] == pytest.approx(frechet.fid(generated, real))
    clips_generated, clips_real = (np.concatenate([v.features["i3d16"][k] for v in videos]) for k in (0, 1))
    assert out["fvd16"] == pytest.approx(frechet.frechet_distance_features(clips_generated, clips_real))
    assert out["fvd32"] is None  # no 32-frame clip features
    pairs = [v.features["inception"] for v in videos]
    assert out["dr25"] == pytest.approx(motion.degradation_rate([g for g, _ in pairs], [r for _, r in pairs], 25))
    assert out["dr25"] > 0 and out["dr50"] is not None
    assert set_metrics([_score("v", {})])["fid"] is None


def test_mean_row_and_markdown_table():
    rows = [_score("a", {}, frames=10, lipsync=0.2, bas=float("nan")).row,
            _score("b", {}, frames=20, lipsync=0.4, bas=0.5).row]
    mean = mean_row(rows)
    assert mean["frames"] == 15 and mean["lipsync"] == pytest.approx(0.3) and mean["bas"] == 0.5
    assert mean["csim"] is None
    table = markdown_report(rows, mean, {"fid": 12.5, "fvd16": None}, {"videos": 2})
    assert "| id | frames | lipsync | bas |" in table  # only measured columns
    assert "| a | 10 | 0.2 | – |" in table and "| **mean** |" in table
    assert "| fid |" in table and "| 12.5 |" in table and "fvd16 |" not in table
