"""The training loop end to end: Ray Train (2 CPU workers) + DeepSpeed ZeRO-2 + MLflow (sqlite) on toy shards.

One chain of runs shares a storage folder, an MLflow store and an export folder: LFG -> PBNet pose (with a
worker killed mid-way) -> A2V-FDM stage 1 (targets from the exported LFG) -> stage 2 (from the stage-1
export); finally the exports load into the render pipeline and render a few frames.
"""

import os

import numpy as np
import pytest
import torch

from dawn.checkpoint import load_model
from dawn.train.config import TrainConfig

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)  # 2 for the workers, the rest for Ray Data
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from dawn.train.toy_shards import write_toy_shards

    root = tmp_path_factory.mktemp("train")
    shards = write_toy_shards(root / "shards", videos=3, frames=48, resolution=64, test_videos=1, seed=0)
    return {"root": root, "shards": shards, "storage": root / "runs", "ckpt": root / "ckpt"}


def tiny(model: str, workspace: dict, **overrides) -> TrainConfig:
    values = dict(model=model, data=str(workspace["shards"]), preset="tiny", storage_path=str(workspace["storage"]),
                  export_dir=str(workspace["ckpt"]), num_workers=2, zero_stage=2, batch_size=2, steps=STEPS,
                  checkpoint_every=3, log_every=1, sample_every=STEPS, lr=2e-3, lr_schedule="constant",
                  overfit_batches=1, samples_per_row=2, max_failures=0)
    values.update(overrides)
    return TrainConfig(**values)


def mlflow_run(summary: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_uri"])
    return client, client.get_run(summary["mlflow_run_id"])


def history(summary: dict, key: str) -> list[tuple[int, float]]:
    """(step, value) in the order they were logged."""
    client, _ = mlflow_run(summary)
    metrics = client.get_metric_history(summary["mlflow_run_id"], key)
    return [(m.step, m.value) for m in sorted(metrics, key=lambda m: (m.timestamp, m.step))]


def artifacts(summary: dict, path: str) -> list[str]:
    client, _ = mlflow_run(summary)
    return [a.path for a in client.list_artifacts(summary["mlflow_run_id"], path)]


def assert_tracked(summary: dict, model: str, loss_key: str, sample_name: str, exported: list[str]):
    client, run = mlflow_run(summary)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == model and params["num_workers"] == "2" and params["zero_stage"] == "2"
    assert params["git_commit"] and "seed.data" in params
    losses = history(summary, loss_key)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for _, v in losses)
    assert losses[-1][1] < losses[0][1], f"{model}: {loss_key} did not go down on the fixed batch: {losses}"
    assert history(summary, "samples_per_s")[-1][1] > 0
    assert f"samples/step_{STEPS:08d}_{sample_name}" in artifacts(summary, "samples")
    assert {f"export/{name}" for name in exported} <= set(artifacts(summary, "export"))
    assert summary["step"] == STEPS


@pytest.fixture(scope="module")
def lfg_run(ray_local, workspace):
    from dawn.train.loop import run_training

    return run_training(tiny("lfg", workspace, vgg19=None))


@pytest.fixture(scope="module")
def a2v_stage1(ray_local, workspace, lfg_run):
    from dawn.train.loop import run_training

    return run_training(tiny("a2v", workspace, stage=1, lfg=lfg_run["export_dir"],
                             export_dir=str(workspace["root"] / "ckpt_stage1")))


def test_lfg_trains_tracks_and_exports(lfg_run):
    assert_tracked(lfg_run, "lfg", "loss", "reconstruction.png", ["lfg.json", "lfg.safetensors"])
    lfg = load_model(lfg_run["export_dir"], "lfg")
    assert lfg.config.image_size == 64
    assert {k for k, _ in history(lfg_run, "equivariance_shift")}  # MRAA terms are logged too


def test_pbnet_resumes_after_a_worker_dies(ray_local, workspace, monkeypatch, capfd):
    """Rank 1 exits hard at step 5; Ray restarts the group from the step-3 checkpoint: the step count goes
    on, only steps after that checkpoint are trained twice, and the run still finishes and exports."""
    from dawn.train.loop import run_training

    monkeypatch.setenv("DAWN_FAULT_AT_STEP", "5")
    config = tiny("pbnet_pose", workspace, max_failures=1, objective_options={"window": 40, "fit_latent_scale": True})
    summary = run_training(config)
    assert (config.resolved().run_dir / ".failed_once_at_step_5").is_file()
    output = capfd.readouterr().out
    progress = [line for line in output.splitlines() if "step 2/" in line and config.resolved().run_name in line]
    assert len(progress) == 1, progress  # rank 0's progress line, shown once (not once per worker or handler)
    rec = history(summary, "rec")
    assert rec[-1][1] < rec[0][1], f"PBNet reconstruction loss did not go down: {rec}"
    steps = [s for s, _ in rec]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from = steps[restart] - 1
    assert resumed_from == 3  # the last checkpoint before the failure
    assert steps[:restart] == [1, 2, 3, 4] and steps[restart:] == list(range(4, STEPS + 1))
    assert len(steps) - STEPS <= config.checkpoint_every  # at most one checkpoint interval trained twice
    _, run = mlflow_run(summary)
    assert run.info.status == "FINISHED" and "resumed from step 3" in run.data.tags["dawn.last_event"]
    pbnet = load_model(summary["export_dir"], "pbnet_pose")
    # after the last step rank 0 fitted the prior's scale to training batches (every worker drew them in step)
    [(_, latent_scale)] = history(summary, "latent_scale")
    assert pbnet.config.latent_scale == pytest.approx(latent_scale) and latent_scale != 1.0
    out = pbnet.generate(torch.zeros(1, 6) + 0.5, torch.randn(1, 30, 1024), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 30, 6) and torch.isfinite(out).all()


def test_time_budget_counts_training_not_start_up(ray_local, workspace):
    """A 3-second budget is shorter than starting Ray Train and the DeepSpeed engines: the run still trains
    for about 3 s (counted from its first step), then stops with a checkpoint and an export."""
    import json
    import time
    from pathlib import Path

    from dawn.train.loop import STATE_DIR, run_training

    config = tiny("pbnet_blink", workspace, steps=100_000, max_minutes=0.05, checkpoint_every=100_000,
                  run_name="budget", export_dir=str(workspace["root"] / "budget"),
                  objective_options={"window": 40, "fit_latent_scale": True})
    started = time.time()
    summary = run_training(config)
    wall = time.time() - started
    assert 1 <= summary["step"] < 100_000
    state = json.loads((Path(summary["checkpoint"]) / STATE_DIR / "rank0.json").read_text())
    assert 3.0 <= state["trained_seconds"] < wall  # the seconds trained are kept for a resume
    assert wall - state["trained_seconds"] > 1.0  # start-up took time that the budget did not count
    _, run = mlflow_run(summary)
    assert "time budget of 0.05 min spent" in run.data.tags["dawn.last_event"]
    assert (Path(summary["export_dir"]) / "pbnet_blink.safetensors").is_file()
    assert load_model(summary["export_dir"], "pbnet_blink").config.latent_scale != 1.0  # fitted after the stop


def test_a2v_stage1_trains_on_frozen_lfg_targets(a2v_stage1, lfg_run):
    assert_tracked(a2v_stage1, "a2v", "loss", "clip.png", ["a2v.json", "a2v.safetensors"])
    assert {v for _, v in history(a2v_stage1, "clip_frames")} == {20.0}  # K' = 20
    a2v = load_model(a2v_stage1["export_dir"], "a2v")
    assert a2v.config.source_channels == load_model(lfg_run["export_dir"], "lfg").config.latent_channels
    assert os.path.isfile(os.path.join(a2v_stage1["export_dir"], "lfg.json"))  # the LFG it was trained against


def test_a2v_stage2_starts_from_stage1_and_varies_clip_length(ray_local, workspace, lfg_run, a2v_stage1):
    from dawn.train.a2v import A2VObjective
    from dawn.train.loop import run_training

    config = tiny("a2v", workspace, stage=2, lfg=lfg_run["export_dir"], init_from=a2v_stage1["export_dir"],
                  overfit_batches=0, batch_size=1, steps=4, checkpoint_every=4, sample_every=0)
    stage1 = load_model(a2v_stage1["export_dir"], "a2v").state_dict()
    start = A2VObjective(config.resolved(), torch.device("cpu")).a2v.state_dict()
    assert all(torch.equal(start[k], v) for k, v in stage1.items())  # weights equal at step 0

    summary = run_training(config)
    lengths = [v for _, v in history(summary, "clip_frames")]
    assert len(lengths) == 4 and all(30 <= k <= 40 for k in lengths) and len(set(lengths)) > 1
    trained = load_model(summary["export_dir"], "a2v").state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in stage1.items())


def test_exports_render_frames(workspace, lfg_run):
    """The exported LFG + A2V-FDM (stage 2, same export folder) run the render pipeline's flow and decode
    stages on a toy portrait."""
    pipeline_module = pytest.importorskip("dawn.pipeline")
    from dawn.data.readers import iter_shard_rows

    if not (workspace["ckpt"] / "a2v.json").is_file():
        pytest.skip("needs the A2V-FDM stage-2 export of the previous test")
    row = next(iter_shard_rows(workspace["shards"], split="test"))
    pipeline = pipeline_module.RenderPipeline.from_checkpoints(workspace["ckpt"], stages=("frames",))
    portrait = pipeline_module.Portrait(image=np.ascontiguousarray(row["frames"][0]), pose=row["pose"][0],
                                        eyes=row["eyes"][0], face_box=row["face_box"][0])
    frames = 8
    motion = pipeline_module.Motion(pose=row["pose"][:frames], eyes=row["eyes"][:frames])
    hubert = row["hubert"][:frames].astype(np.float32)
    flows = pipeline.sample_flows(portrait, hubert, motion, pipeline_module.RenderOptions(steps=3))
    video = pipeline.decode_frames(portrait, flows)
    assert flows.shape == (1, 3, frames, 16, 16) and video.shape == (frames, 64, 64, 3) and video.dtype == np.uint8
