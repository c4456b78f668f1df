"""`dawn demo` shortened (4 videos of 3 s, a 1-minute training budget, 2 DDIM steps): every stage leaves its outputs
(shards, an MLflow run per training job, exported checkpoints, mp4s from the batch job and the Serve API, the
metrics table), and a rerun skips every finished stage. The quality target is not checked here."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TRAINING_RUNS = {"lfg": "lfg", "pbnet-pose": "pbnet_pose", "pbnet-blink": "pbnet_blink", "a2v-stage1": "a2v",
                 "a2v-stage2": "a2v"}


def _demo(out: Path, timeout: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dawn.cli", "demo", "--out", str(out), "--videos", "4", "--seconds", "3",
               "--budget-minutes", "1", "--render-steps", "2", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = _demo(out, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result.stdout


def test_shards_and_held_out_split(demo):
    out, _ = demo
    index = json.loads((out / "shards" / "index.json").read_text())
    assert len(list((out / "shards" / "shards").glob("*.parquet"))) == 4
    assert len(index["splits"]["test"]) >= 1 and len(index["splits"]["train"]) >= 1
    assert len({index["videos"][v]["identity"] for v in index["splits"]["test"]}) == 1  # one identity held out


def test_mlflow_run_per_training_job(demo):
    from mlflow.tracking import MlflowClient

    out, _ = demo
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dawn-demo")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    for name, model in TRAINING_RUNS.items():
        assert name in runs, f"no MLflow run {name}: {sorted(runs)}"
        assert runs[name].info.status == "FINISHED"
        assert runs[name].data.tags["dawn.model"] == model
        assert (out / "runs" / name).is_dir()  # Ray Train storage of the run
    evaluation = runs["demo-evaluation"]
    assert evaluation.info.status == "FINISHED" and "mean_lipsync" in evaluation.data.metrics


def test_exported_checkpoints_load(demo):
    from dawn.checkpoint import load_model

    out, _ = demo
    checkpoints = out / "checkpoints"
    for name in ("lfg", "a2v", "pbnet_pose", "pbnet_blink"):
        model = load_model(checkpoints, name)
        meta = json.loads((checkpoints / f"{name}.json").read_text())
        assert meta["training"]["mlflow_run_id"], name  # trained by the demo, not a random init
        assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((checkpoints / "a2v.json").read_text())["training"]["stage"] == 2
    assert (checkpoints / "hubert" / "config.json").is_file()
    # PBNet pose's prior scale was fitted to the training windows after its last step (the demo's setting)
    pose_config = json.loads((checkpoints / "pbnet_pose.json").read_text())["config"]
    assert pose_config["latent_scale"] != 1.0 and json.loads(
        (checkpoints / "pbnet_blink.json").read_text())["config"]["latent_scale"] == 1.0


def test_videos_from_batch_job_and_serve(demo):
    from dawn.video import probe

    out, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    videos = summary["videos"]
    assert "unseen-speech" in videos and "serve-unseen-speech" in videos
    assert any(name.startswith("heldout-") for name in videos)
    assert any(name.startswith("trainportrait-") for name in videos)  # held-out speech, training portrait
    for name, path in videos.items():
        info = probe(path)
        assert info["frames"] >= 25, (name, info)  # the 3 s clips and the espeak sentence: > 1 s at 25 fps
        assert info["width"] == info["height"] == 64
    # one render path: the batch job and Serve render the same pair (same seed, deterministic DDIM) alike
    assert summary["metrics"]["serve_vs_batch_mean_abs_diff"] == 0.0
    assert summary["metrics"]["lipsync_unseen_speech_serve"] == summary["metrics"]["lipsync_unseen_speech"]


def test_metrics_table(demo):
    out, stdout = demo
    table = (out / "evaluation" / "metrics.md").read_text()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    ids = {row["id"] for row in metrics["videos"]}
    assert {"unseen-speech", "serve-unseen-speech"} <= ids
    for row in metrics["videos"]:
        assert row["id"] in table
        assert row["frames"] >= 25
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics_table"] == str(out / "evaluation" / "metrics.md")
    assert "Lip-sync proxy" in stdout and "mlflow ui --backend-store-uri" in stdout
    assert "Head motion and blinks of the held-out renders" in stdout
    for key in ("lipsync_held_out", "lipsync_held_out_speech_training_portraits", "identity_held_out_portrait",
                "blink_per_s_held_out", "blink_per_s_ground_truth", "pose_spread_held_out",
                "pose_jitter_ratio_held_out"):
        assert summary["metrics"][key] is not None, key


def test_rerun_skips_finished_stages(demo):
    out, _ = demo
    started = time.monotonic()
    result = _demo(out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done in an earlier run, skipped") == 13
    assert "starting a local Ray cluster" not in result.stdout
    assert time.monotonic() - started < 120
