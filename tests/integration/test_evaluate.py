"""The evaluation job end to end: a tiny synthetic corpus preprocessed into shards (no Ray), random tiny
checkpoints, jobs/evaluate.py on the test split and on rendered mp4s -> table, plots, MLflow run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two 2-second synthetic talking-head videos, tiny random checkpoints, and the videos as 64 px test shards."""
    from dawn.audio import HubertFeatureExtractor
    from dawn.cli import main as dawn_cli
    from dawn.data.preprocess import preprocess_video, write_shard
    from dawn.data.synth import generate_corpus

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("evaluate")
    videos = generate_corpus(root / "corpus", videos=2, seconds=2.0, size=128, progress=False)
    assert dawn_cli(["init-checkpoints", "--preset", "tiny", str(root / "ckpt")]) == 0
    hubert = HubertFeatureExtractor(root / "ckpt" / "hubert")
    for index, path in enumerate(videos):
        rows = preprocess_video(path, 64, hubert, video_id=f"video{index}", identity=f"speaker{index}", split="test")
        write_shard(rows, root / "shards" / "shards" / f"video{index}.parquet")
    return {"root": root, "videos": videos}


def _run_job(argv: list[str]) -> int:
    """jobs/evaluate.py as `ray job submit` runs it."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *argv]).returncode


def _mlflow_run(out: Path) -> tuple[list[str], dict]:
    """Artifact paths and metrics of the single finished run in OUT/mlflow.db."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dawn-evaluation").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    names = [a.path for a in client.list_artifacts(run_id)] + [a.path for a in client.list_artifacts(run_id, "plots")]
    return names, runs[0].data.metrics


def test_evaluate_test_split_of_shards(corpus, tmp_path):
    from dawn.metrics.sync import SyncNet

    torch.manual_seed(0)
    torch.save(SyncNet().state_dict(), tmp_path / "syncnet_v2.model")  # random weights of the right layout
    out = tmp_path / "eval"
    code = _run_job(["--shards", str(corpus["root"] / "shards"), "--checkpoints", str(corpus["root"] / "ckpt"),
                     "--out", str(out), "--steps", "2", "--max-frames", "20",
                     "--syncnet", str(tmp_path / "syncnet_v2.model")])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [row["id"] for row in report["videos"]] == ["video0", "video1"]
    for row in report["videos"]:
        assert row["frames"] == 20
        assert set(report["columns"]) <= set(row)
        assert row["lse_d"] is not None and row["lse_c"] is not None  # weights given: LSE measured
        assert row["blink_per_s_gt"] is not None and row["bas_gt"] is not None  # ground truth from the shards
        assert row["csim"] is None  # no ArcFace weights: not measured
    assert report["mean"]["id"] == "mean" and report["mean"]["lse_d"] is not None
    assert report["set"]["fid"] is None and report["set"]["fvd16"] is None
    table = (out / "metrics.md").read_text()
    assert "| video0 |" in table and "| video1 |" in table and "lse_d" in table and "bas_gt" in table
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["video0_lipsync.png", "video0_pose.png", "video1_lipsync.png", "video1_pose.png"]
    assert all((out / "plots" / p).stat().st_size > 10_000 for p in plots)
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == ["video0.mp4", "video1.mp4"]
    artifacts, metrics = _mlflow_run(out)
    assert {"metrics.json", "metrics.md", "plots/video0_lipsync.png", "plots/video1_pose.png"} <= set(artifacts)
    assert "mean_lse_d" in metrics and "mean_bas_gt" in metrics


def test_evaluate_rendered_videos_against_references(corpus, tmp_path):
    """The synthetic videos scored as if rendered, against themselves: real faces, so every proxy is measured,
    and the pose agrees perfectly with the ground truth."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for path in corpus["videos"]:
        (videos / path.name).symlink_to(path)
    out = tmp_path / "eval"
    assert _run_job(["--videos", str(videos), "--reference", str(videos), "--out", str(out), "--max-frames", "30"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["videos"]) == 2
    for row in report["videos"]:
        assert row["lipsync"] > 0.5  # the synthetic mouth follows the speech envelope
        assert row["identity"] > 0.7  # the same face as the portrait (the first frame)
        assert row["pose_corr"] == pytest.approx(1.0) and row["pose_mae"] == pytest.approx(0.0, abs=1e-6)
        assert row["blink_per_s"] == pytest.approx(row["blink_per_s_gt"])
        tracks = report["tracks"][row["id"]]
        assert len(tracks["mouth"]) == len(tracks["envelope"]) == row["frames"]
    assert not (out / "videos").exists()  # already rendered: nothing re-written
    assert len(list((out / "plots").glob("*.png"))) == 4
    assert np.isfinite(report["mean"]["bas"])
