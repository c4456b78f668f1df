"""`dawn demo`: the main job end to end, from nothing to talking-head videos, on a local Ray cluster.

    corpus          synthetic talking-head videos (dawn.data.synth)                 OUT/corpus/
    hubert          a randomly initialised tiny HuBERT, group-norm feature encoder  OUT/hubert/
                    (no weights can be had here; see dawn.audio.hubert_config)
    preprocess      Ray Data job: videos -> Parquet shards, one identity held out    OUT/shards/
    train-*         Ray Train + DeepSpeed jobs, tracked in MLflow:                   OUT/runs/, OUT/exports/
                      LFG -> PBNet pose -> PBNet blink -> A2V-FDM stage 1 -> stage 2
    checkpoints     the exports + that HuBERT as one dawn checkpoint folder          OUT/checkpoints/
    inputs          held-out pairs: first frame + audio of each held-out video, and
                    one unseen espeak sentence with the first held-out portrait     OUT/inputs/
    batch-render    Ray Data batch render job over those pairs                       OUT/renders/batch/
    serve           the Ray Serve HTTP app on 127.0.0.1: POST, poll, download        OUT/renders/serve/
    evaluate        lip-sync proxy, offline identity, pose/blink stats -> table      OUT/evaluation/

Everything runs in one local Ray instance; MLflow writes to sqlite:///OUT/mlflow.db (no server needed;
`mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db` shows it). Each finished stage leaves a marker
OUT/state/<stage>.json, so rerunning the same command skips what is done and continues an interrupted stage
(the training runs resume from their last checkpoint). A failing stage stops the demo with a message naming
the stage; its traceback goes to OUT/logs/<stage>.txt.

Time budget (--budget-minutes, default 40 on a 2-core CPU machine): each training run trains for its share of
the budget (TRAINING[...]["share"], 78 % in total, counted from its first step; A2V-FDM gets most since it
learns the audio-to-motion mapping the lip-sync proxy measures), less what earlier stages overran
(`training_minutes`): starting Ray Train and the DeepSpeed engines and exporting add 0.5-1.5 minutes per run
(5 in all), corpus, HuBERT and preprocessing take ~2 minutes before training, renders, Serve and evaluation ~4
after it. `steps` is the training time times the throughput of 2 CPU workers, so on a faster machine the runs
finish their schedule before the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dawn import DawnError
from dawn.config import FPS, SAMPLE_RATE

STAGES = ("corpus", "hubert", "preprocess", "train-lfg", "train-pbnet-pose", "train-pbnet-blink",
          "train-a2v-stage1", "train-a2v-stage2", "checkpoints", "inputs", "batch-render", "serve", "evaluate")

# A2V-FDM for minutes of CPU training (plain-torch runs of 160 steps on the demo corpus, DDIM sample error to the
# true motion, whose variance is 0.42):
# - v-prediction: an eps-model's samples are still noise after a few hundred steps (its loss hardly weighs the
#   coarse motion at high noise levels, where sampling starts); error 0.46 with eps, 0.045 with v;
# - the offset motion target: the displacement from the identity grid at unit scale instead of the absolute grid,
#   on which the mouth's motion is ~2 % of the range: error 0.006, and far smoother flows;
# - 2 attention heads of 16 instead of 8 of 32 (the tiny preset's 256-wide attention on 16 channels): a step
#   costs a third, so the budget buys three times the steps.
A2V_DEMO_OVERRIDES = {"prediction": "v", "motion_target": "offset", "heads": 2, "dim_head": 16}
# The lip box weighs 1 + 40 in A2V-FDM's loss (Eq. 7 with w_lip = 40 instead of the paper's 1): the lip box covers
# ~5 % of the 16x16 motion latent, so with w_lip = 1 a few hundred steps learn the head's motion but hardly the
# mouth's. Plain-torch runs of ~620 steps on the demo's shards, decoded with an LFG trained with its lip term
# (below), the true head pose: lip-sync proxy of the held-out renders 0.23 (w_lip 1), 0.57 (10), 0.71 (40).
# The eye terms of both objectives (w_eye, eye_weight) stay off: with 40 on both, the LFG still reconstructed
# no blink of the held-out videos (0 blinks/s against 0.25 in the truth, bench/motion_jitter.py) and the
# held-out lip-sync proxy fell to 0.15 / 0.25 in that run; nor did plain-torch LFG runs with a 32 px region view
# or half their driving frames in blinks (bench/RESULTS.md, "LFG: blinks at 64 px").
A2V_DEMO_OPTIONS = {"w_lip": 40.0}
# The LFG trains without its flip / colour augmentation here: in 1100 plain-torch steps it did not improve the
# reconstruction of the held-out identity and made those of training identities worse. Its lip term (an L1 over
# the driving frame's lip box, weight 40) is what makes it render an opening mouth within minutes: in 1480
# plain-torch steps it raised the lip-sync proxy of its held-out reconstructions from 0.53 to 0.85 (0.69 without
# the term, 0.76 after 2270 steps), and from scratch it reached 0.82 in 1800 steps.
LFG_DEMO_OPTIONS = {"flip_probability": 0.0, "colour_jitter": 0.0, "lip_weight": 40.0}
# PBNet pose draws its per-frame latents correlated over time (PBNetConfig.latent_smoothing, a Gaussian of 8 frames;
# the paper's prior is independent per frame). The synthetic heads move by slow random sinusoids that the audio
# does not predict, so PBNet's motion comes from the latent; its briefly trained decoder turns independent
# latents into frame-to-frame jumps and correlated ones into smooth motion (bench/pbnet_spread.py on the demo's
# shards: spread = std of the sampled yaw/pitch/roll over the truth's, jitter over the truth's; after 100 steps
# 0.35 / 1.8x with independent latents, 0.48 / 0.63x with sigma 8; after 600 steps 0.12 / 0.64x and 0.20 / 0.14x).
# Its learning rate is 3e-4: at 1e-3 the GAN term diverged after ~800 steps (reconstruction loss 0.001 -> 0.45).
PBNET_POSE_DEMO_OVERRIDES = {"latent_smoothing": 8.0}
# After its last step PBNet pose's prior scale is fitted to its training windows (the objective's
# fit_latent_scale, PBNetConfig.latent_scale): trained for minutes, its posterior has not met N(0, I) and its
# samples move less the longer it trains (spread 0.35 -> 0.12 from 100 to 600 steps); the decoder's motion grows
# about linearly with the latent's scale, so a fitted scale of 2-5 gives samples that move like the training
# sequences (bench/pbnet_spread.py with latent_smoothing 8: held-out spread 0.95-1.07 at 150-600 steps against
# 0.20-0.50 at scale 1, jitter 0.21-0.56x the truth's).
PBNET_POSE_DEMO_OPTIONS = {"fit_latent_scale": True}
# Training runs: share of the time budget (minutes of training, start-up not counted), optimizer steps per
# minute of that share with 2 CPU workers on the tiny preset (a cap above the ~130 steps/min PBNet and ~100
# the LFG make on an idle 2-core machine, so the time share decides), and the TrainConfig fields that differ
# from the defaults: constant learning rates for these short runs. A2V-FDM, the slowest to learn, gets the
# largest share, the LFG the next largest. PBNet blink gets ~150-200 steps (its reconstruction loss falls from
# 0.04 to below 0.004 in ~150 steps; with the ~60 it got when start-up counted, it hardly moved and the KL term
# never started); PBNet pose ~450, where its reconstruction loss has fallen from 0.014 to below 0.001 (at the
# prior's scale of 1 more steps make its samples move less, which the fitted scale makes up for: bench/RESULTS.md,
# pbnet_spread).
TRAINING = {
    "train-lfg": dict(model="lfg", share=0.25, steps_per_minute=160,
                      config=dict(batch_size=8, lr=3e-4, lr_schedule="constant", warmup_steps=20,
                                  objective_options=LFG_DEMO_OPTIONS)),
    "train-pbnet-pose": dict(model="pbnet_pose", share=0.10, steps_per_minute=200,
                             config=dict(batch_size=8, lr=3e-4, lr_schedule="constant",
                                         model_overrides=PBNET_POSE_DEMO_OVERRIDES,
                                         objective_options=PBNET_POSE_DEMO_OPTIONS)),
    "train-pbnet-blink": dict(model="pbnet_blink", share=0.04, steps_per_minute=200,
                              config=dict(batch_size=8, lr=1e-3, lr_schedule="constant")),
    "train-a2v-stage1": dict(model="a2v", stage=1, share=0.32, steps_per_minute=60,
                             config=dict(batch_size=4, lr=1e-3, lr_schedule="constant", warmup_steps=10,
                                         model_overrides=A2V_DEMO_OVERRIDES, objective_options=A2V_DEMO_OPTIONS)),
    "train-a2v-stage2": dict(model="a2v", stage=2, share=0.07, steps_per_minute=60,
                             config=dict(batch_size=2, lr=3e-4, lr_schedule="constant",
                                         model_overrides=A2V_DEMO_OVERRIDES, objective_options=A2V_DEMO_OPTIONS)),
}
# What the budget holds besides training time, on a 2-core machine: each run's start-up and export (Ray Train,
# the DeepSpeed engines; 0.5-1.5 minutes each in a demo run) and the stages after training (checkpoints, inputs,
# batch render, Serve, evaluation: 3.9 minutes). Each run's training time is its share of what is left of the
# budget once these are set aside (`training_minutes`), so time lost on a slower machine is made up by the
# later runs and the demo still ends within the budget.
RUN_OVERHEAD_MINUTES = 0.75
FINISH_MINUTES = 4.5
CHECKPOINT_EVERY_MINUTES = 2.0  # a Ray Train checkpoint about this often (what an interrupted run resumes)
MAX_HELD_OUT_RENDERS = 2  # held-out videos rendered (and scored); each is --seconds long
UNSEEN_SENTENCE = ("Good evening. This sentence was never spoken in the training videos, so the mouth has to "
                   "follow new speech.")
UNSEEN_VOICE = "en-us"
EXPERIMENT = "dawn-demo"
# Renders sample with deterministic DDIM (eta 0): from briefly trained A2V-FDMs the stochastic DDIM of the
# reference (eta 1) adds noise the model cannot remove in the remaining steps (plain-torch A2V-FDM after 160
# steps: lip-sync proxy 0.25 with eta 0 against 0.10 with eta 1 on the held-out videos).
RENDER_ETA = 0.0
# Renders smooth A2V-FDM's sampled flows over time (RenderOptions.motion_smoothing, a Gaussian of 1.25 frames;
# the paper's default is 0). The head of a demo render shook ~5x more than the ground truth's, from the flows
# themselves: driven by the true pose it still shook 5x, while PBNet's pose sequence is within 1.6x of the
# truth's (bench/motion_jitter.py on a demo run, 2 held-out videos: render jitter 5.7x -> 1.3x the truth's,
# lip-sync proxy 0.65 -> 0.63; 2 frames: 0.6x, 0.55).
RENDER_MOTION_SMOOTHING = 1.25
# The stand-in for HuBERT (no trained weights can be downloaded): random weights keep each frame's loudness
# only with the group-norm feature encoder (dawn.audio.hubert_config).
HUBERT_PRESET = "tiny-group-norm"


@dataclass
class DemoSettings:
    out: Path
    budget_minutes: float = 40.0
    videos: int = 24
    seconds: float = 10.0
    preset: str = "tiny"
    workers: int = 2
    seed: int = 0
    skip_serve: bool = False
    render_steps: int = 20
    render_eta: float = RENDER_ETA
    render_motion_smoothing: float = RENDER_MOTION_SMOOTHING

    def __post_init__(self):
        self.out = Path(self.out).expanduser().resolve()
        if self.videos < 2:
            raise DawnError(f"--videos must be at least 2 (one identity is held out), got {self.videos}")
        if not self.seconds >= 2:
            raise DawnError(f"--seconds must be at least 2 (A2V-FDM stage 2 trains on 30-40 frames), "
                            f"got {self.seconds}")
        if not self.budget_minutes > 0:
            raise DawnError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.workers < 1 or self.render_steps < 1:
            raise DawnError("--workers and --render-steps must be at least 1")
        if not 0 <= self.render_eta <= 1:
            raise DawnError(f"--render-eta must be between 0 and 1, got {self.render_eta}")
        if not 0 <= self.render_motion_smoothing <= 10:
            raise DawnError(f"--render-motion-smoothing must be between 0 and 10, got {self.render_motion_smoothing}")
        if self.preset not in ("tiny", "hdtf128", "hdtf256"):
            raise DawnError(f"unknown preset {self.preset!r} (tiny, hdtf128, hdtf256)")

    @property
    def resolution(self) -> int:
        from dawn.models.lfg import LFGConfig

        return LFGConfig.preset(self.preset).image_size

    @property
    def corpus_size(self) -> int:
        """Frame side of the synthetic videos: twice the training resolution (the face crop is resized)."""
        return 2 * self.resolution

    def identity_fields(self) -> dict:
        """What the outputs depend on: a rerun into the same OUT must not change these."""
        return {"videos": self.videos, "seconds": self.seconds, "preset": self.preset, "seed": self.seed}


# ----------------------------------------------------------------------------------------------------
# Helpers

def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def held_out_fraction(identities: list[str], seed: int) -> float:
    """A `test_fraction` for dawn.data.preprocess.assign_split that puts exactly one of `identities` in the
    test split (the split hashes each identity; bisection finds a fraction between the two smallest)."""
    from dawn.data.preprocess import assign_split

    identities = sorted(set(identities))
    if len(identities) < 2:
        raise DawnError("the corpus needs at least two identities to hold one out")
    low, high = 0.0, 1.0
    for _ in range(64):
        fraction = (low + high) / 2
        held_out = sum(assign_split(identity, fraction, seed) == "test" for identity in identities)
        if held_out == 1:
            return fraction
        low, high = (fraction, high) if held_out == 0 else (low, fraction)
    raise DawnError("could not find a split that holds out exactly one identity")


def training_minutes(stage: str, budget_minutes: float, elapsed_minutes: float) -> float:
    """Training time of a run started `elapsed_minutes` into the demo: the time still left in the budget, less
    RUN_OVERHEAD_MINUTES for this and every later run and FINISH_MINUTES for the stages after training, split
    over this and the later runs by their shares; at most its planned share x budget, at least half of that
    (for budgets too small to hold the fixed costs)."""
    stages = list(TRAINING)
    later = stages[stages.index(stage):]
    share = TRAINING[stage]["share"]
    planned = share * budget_minutes
    left = budget_minutes - elapsed_minutes - FINISH_MINUTES - RUN_OVERHEAD_MINUTES * len(later)
    fair = left * share / sum(TRAINING[name]["share"] for name in later)
    return min(planned, max(0.5 * planned, fair))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """The demo's stages (methods named after STAGES), their markers and the shared local Ray instance."""

    def __init__(self, settings: DemoSettings):
        self.settings = s = settings
        self.out = s.out
        self.paths = {name: self.out / name for name in ("corpus", "hubert", "shards", "runs", "exports",
                                                          "checkpoints", "inputs", "evaluation", "state", "logs")}
        self.paths["batch"] = self.out / "renders" / "batch"
        self.paths["serve"] = self.out / "renders" / "serve"
        self.mlflow_uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.results: dict[str, dict] = {}
        self.started = time.monotonic()
        self._ray_started = False

    # -- bookkeeping --------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[demo {_clock(time.monotonic() - self.started)}] {text}"
        print(line, flush=True)
        with open(self.out / "demo.log", "a") as log:
            log.write(line + "\n")

    def marker(self, stage: str) -> Path:
        return self.paths["state"] / f"{stage}.json"

    def check_settings(self) -> None:
        """OUT remembers the settings its outputs were made with; other ones need another --out."""
        self.paths["state"].mkdir(parents=True, exist_ok=True)
        saved_path = self.paths["state"] / "settings.json"
        wanted = self.settings.identity_fields()
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if changed:
                details = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changed.items())
                raise DawnError(f"{self.out} holds a demo made with other settings ({details}); use another --out "
                                f"or the same settings to resume")
        else:
            saved_path.write_text(json.dumps(wanted, indent=1))

    def run(self) -> dict:
        """Run (or skip, when their marker exists) every stage in order; returns the summary."""
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        self.say(f"dawn demo into {self.out}: {s.videos} videos x {s.seconds:g} s, preset {s.preset} "
                 f"({s.resolution} px), {s.workers} training workers, budget {s.budget_minutes:g} min")
        try:
            for number, stage in enumerate(STAGES, 1):
                self.run_stage(number, stage)
        finally:
            self.stop_ray()
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.print_summary(summary)
        return summary

    def run_stage(self, number: int, stage: str) -> None:
        heading = f"({number}/{len(STAGES)}) {stage}"
        marker = self.marker(stage)
        if marker.is_file():
            self.results[stage] = json.loads(marker.read_text())
            self.say(f"{heading}: done in an earlier run, skipped")
            return
        if stage == "serve" and self.settings.skip_serve:
            self.say(f"{heading}: skipped (--skip-serve)")
            return
        self.say(f"{heading}: started")
        began = time.monotonic()
        try:
            result = getattr(self, "stage_" + stage.replace("-", "_"))()
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - every failure is reported with its stage
            self.paths["logs"].mkdir(parents=True, exist_ok=True)
            details = self.paths["logs"] / f"{stage}.txt"
            details.write_text("".join(traceback.format_exception(error)))
            message = str(error).strip().splitlines()
            reason = message[-1] if message else ""
            raise DawnError(f"stage {stage!r} failed: {type(error).__name__}: {reason[:2000]}\n"
                            f"  traceback: {details}\n  fix the cause and rerun the same command; finished stages "
                            f"are skipped") from error
        result["seconds"] = round(time.monotonic() - began, 1)
        self.results[stage] = result
        marker.write_text(json.dumps(result, indent=1, default=str))
        self.say(f"{heading}: done in {_clock(result['seconds'])}")

    # -- Ray ----------------------------------------------------------------------------------------------
    def ray(self):
        """The local Ray instance (started on first use): every logical CPU of this machine, at least
        workers + 2 so that Ray Data can read beside the training workers."""
        import ray

        if not ray.is_initialized():
            num_cpus = max(os.cpu_count() or 1, self.settings.workers + 2)
            env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
            self.say(f"starting a local Ray cluster ({num_cpus} logical CPUs)")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": env})
            ray.data.DataContext.get_current().enable_progress_bars = False
            self._ray_started = True
        return ray

    def stop_ray(self) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    # -- stages -------------------------------------------------------------------------------------------
    def stage_corpus(self) -> dict:
        from dawn.data.synth import generate_corpus

        s = self.settings
        paths = generate_corpus(self.paths["corpus"], s.videos, s.seconds, seed=s.seed, size=s.corpus_size,
                                workers=max(1, min(s.workers, os.cpu_count() or 1)))
        return {"videos": len(paths), "manifest": str(self.paths["corpus"] / "manifest.jsonl")}

    def stage_hubert(self) -> dict:
        from dawn.audio import save_random_hubert

        save_random_hubert(self.paths["hubert"], preset=HUBERT_PRESET, seed=self.settings.seed)
        return {"hubert": str(self.paths["hubert"]),
                "weights": f"random ({HUBERT_PRESET} HuBERT, 1024-d output)"}

    def stage_preprocess(self) -> dict:
        from dawn.data.preprocess import list_videos
        from dawn.data.preprocess_job import PreprocessSettings, run_preprocess
        from dawn.data.readers import read_index

        s = self.settings
        manifest = self.paths["corpus"] / "manifest.jsonl"
        fraction = held_out_fraction([v.identity for v in list_videos(manifest)], s.seed)
        self.ray()
        summary = run_preprocess(manifest, self.paths["shards"], self.paths["hubert"],
                                 PreprocessSettings(resolution=s.resolution, test_fraction=fraction, seed=s.seed),
                                 max_actors=max(1, os.cpu_count() or 1))
        index = read_index(self.paths["shards"])
        if not index["splits"]["train"] or not index["splits"]["test"]:
            raise DawnError(f"preprocessing left {len(index['splits']['train'])} training and "
                            f"{len(index['splits']['test'])} test videos ({summary.failed} failed, see "
                            f"{self.paths['shards'] / 'failures.parquet'})")
        held_out = sorted({index["videos"][v]["identity"] for v in index["splits"]["test"]})
        self.say(f"  {len(index['splits']['train'])} training videos, {len(index['splits']['test'])} held out "
                 f"(identity {', '.join(held_out)}), {summary.failed} failed")
        return {"shards": str(self.paths["shards"]), "test_fraction": fraction, "held_out_identities": held_out,
                "train_videos": len(index["splits"]["train"]), "test_videos": len(index["splits"]["test"]),
                "failed": summary.failed, "frames": index["frames"]}

    def _train(self, stage: str) -> dict:
        import torch

        from dawn.train.config import TrainConfig
        from dawn.train.loop import run_training

        s, spec = self.settings, TRAINING[stage]
        minutes = training_minutes(stage, s.budget_minutes, (time.monotonic() - self.started) / 60)
        steps = max(1, math.ceil(minutes * spec["steps_per_minute"]))
        extra = {}
        if spec["model"] == "a2v":
            extra["lfg"] = str(self.paths["exports"] / "lfg")
            if spec["stage"] == 2:
                extra["init_from"] = str(self.paths["exports"] / "a2v_stage1")
        export = self.paths["exports"] / (f"a2v_stage{spec['stage']}" if spec["model"] == "a2v" else spec["model"])
        extra["samples_per_row"] = self._samples_per_row(spec["config"]["batch_size"])
        config = TrainConfig(
            model=spec["model"], data=str(self.paths["shards"]), preset=s.preset, stage=spec.get("stage", 1),
            storage_path=str(self.paths["runs"]), run_name=stage.removeprefix("train-"), mlflow_uri=self.mlflow_uri,
            experiment=EXPERIMENT, export_dir=str(export), steps=steps, max_minutes=minutes,
            checkpoint_every=max(1, math.ceil(CHECKPOINT_EVERY_MINUTES * spec["steps_per_minute"])),
            log_every=max(1, steps // 20), sample_every=max(1, steps // 2), num_workers=s.workers,
            use_gpu=torch.cuda.is_available(), seed=s.seed, cache_rows=True,  # the corpus fits in memory
            **spec["config"], **extra)
        self.say(f"  {spec['model']}: up to {steps} steps, stops after {minutes:.1f} min of training "
                 f"({s.workers} workers x batch {config.batch_size}, lr {config.lr:g})")
        self.ray()
        summary = run_training(config)
        self.say(f"  {summary['run_name']}: {summary['step']} steps, exported to {summary['export_dir']}")
        return {key: summary[key] for key in ("run_name", "step", "export_dir", "mlflow_run_id", "checkpoint")}

    def _samples_per_row(self, batch_size: int) -> int:
        """Samples per segment and pass: the default, or enough that every worker's split (Ray gives each
        worker the same number of segments, dropping the rest) fills at least one batch on a small corpus."""
        from dawn.data.readers import read_index
        from dawn.train.config import TrainConfig

        index = read_index(self.paths["shards"])
        segments = sum(index["videos"][v]["segments"] for v in index["splits"]["train"])
        per_worker = segments // self.settings.workers
        if per_worker == 0:
            raise DawnError(f"{segments} training segment(s) for {self.settings.workers} workers: use more "
                            "--videos or fewer --workers")
        return max(TrainConfig.samples_per_row, math.ceil(batch_size / per_worker))

    def stage_train_lfg(self) -> dict:
        return self._train("train-lfg")

    def stage_train_pbnet_pose(self) -> dict:
        return self._train("train-pbnet-pose")

    def stage_train_pbnet_blink(self) -> dict:
        return self._train("train-pbnet-blink")

    def stage_train_a2v_stage1(self) -> dict:
        return self._train("train-a2v-stage1")

    def stage_train_a2v_stage2(self) -> dict:
        return self._train("train-a2v-stage2")

    def stage_checkpoints(self) -> dict:
        """One dawn checkpoint folder: LFG, PBNet pose/blink, the stage-2 A2V-FDM, and the HuBERT the shards
        were made with (the A2V-FDM condition must come from the same audio features)."""
        exports, target = self.paths["exports"], self.paths["checkpoints"]
        target.mkdir(parents=True, exist_ok=True)
        sources = {"lfg": exports / "lfg", "pbnet_pose": exports / "pbnet_pose",
                   "pbnet_blink": exports / "pbnet_blink", "a2v": exports / "a2v_stage2"}
        for name, folder in sources.items():
            for suffix in (".json", ".safetensors"):
                if not (folder / f"{name}{suffix}").is_file():
                    raise DawnError(f"the export {folder / (name + suffix)} is missing")
                shutil.copy2(folder / f"{name}{suffix}", target / f"{name}{suffix}")
        shutil.copytree(self.paths["hubert"], target / "hubert", dirs_exist_ok=True)
        return {"checkpoints": str(target), "models": sorted(sources) + ["hubert"]}

    def stage_inputs(self) -> dict:
        """Portrait + speech pairs for the renders: OUT/inputs/<video id>.png (the held-out video's first
        frame) and .wav (its audio); the same speech with the first frame of a training video of each real face
        of the corpus; unseen_speech.wav (espeak) with the first held-out portrait; the manifest renders.csv."""
        import csv

        import cv2
        import soundfile

        from dawn.audio import load_audio
        from dawn.data.readers import read_index
        from dawn.data.tts import synthesize_speech
        from dawn.video import read_video

        folder = self.paths["inputs"]
        folder.mkdir(parents=True, exist_ok=True)
        index = read_index(self.paths["shards"])
        held_out = index["splits"]["test"][:MAX_HELD_OUT_RENDERS]
        rows = []
        for video_id in held_out:
            source = Path(index["videos"][video_id]["source_path"])
            frames, _ = read_video(source)
            cv2.imwrite(str(folder / f"{video_id}.png"), frames[0][:, :, ::-1])
            soundfile.write(str(folder / f"{video_id}.wav"), load_audio(source), SAMPLE_RATE)
            rows.append({"id": f"heldout-{video_id}", "portrait": f"{video_id}.png", "audio": f"{video_id}.wav",
                         "seed": self.settings.seed, "video_id": video_id})
        # The same held-out speech on portraits of training identities, one per real face of the corpus.
        faces = {}
        for video_id in index["splits"]["train"]:
            faces.setdefault(index["videos"][video_id]["identity"].split("-")[0], video_id)
        for speech_of, video_id in zip(held_out, faces.values()):
            frames, _ = read_video(Path(index["videos"][video_id]["source_path"]))
            cv2.imwrite(str(folder / f"{video_id}.png"), frames[0][:, :, ::-1])
            rows.append({"id": f"trainportrait-{video_id}", "portrait": f"{video_id}.png", "audio": f"{speech_of}.wav",
                         "seed": self.settings.seed, "video_id": ""})
        synthesize_speech(UNSEEN_SENTENCE, folder / "unseen_speech.wav", voice=UNSEEN_VOICE)
        rows.append({"id": "unseen-speech", "portrait": f"{held_out[0]}.png", "audio": "unseen_speech.wav",
                     "seed": self.settings.seed, "video_id": ""})
        with open(folder / "renders.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "portrait", "audio", "seed"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return {"manifest": str(folder / "renders.csv"), "rows": rows}

    def stage_batch_render(self) -> dict:
        from dawn.batch_render import run_batch_render
        from dawn.pipeline import RenderOptions

        self.ray()
        # One A2V-FDM actor per core, one row per batch: the rows have different lengths, so they cannot share a
        # sampling pass, and two renders run side by side.
        options = RenderOptions(steps=self.settings.render_steps, eta=self.settings.render_eta,
                                motion_smoothing=self.settings.render_motion_smoothing,
                                seed=self.settings.seed)
        results = run_batch_render(self.results["inputs"]["manifest"], self.paths["checkpoints"], self.paths["batch"],
                                   options=options, a2v_actors=max(1, min(2, os.cpu_count() or 1)),
                                   a2v_batch=1, show_progress=False)
        failed = [r for r in results if r["status"] == "failed"]
        if failed:
            raise DawnError(f"{len(failed)} of {len(results)} renders failed, first: {failed[0]['id']}: "
                            f"{failed[0]['error']} (see {self.paths['batch'] / 'results.csv'})")
        return {"renders": {r["id"]: r["output"] for r in results}, "seconds_per_render":
                {r["id"]: r["seconds"] for r in results}}

    def stage_serve(self) -> dict:
        """Start the Serve app (dawn/serve/app.py) on 127.0.0.1, render the unseen-speech pair over HTTP, poll, download
        the mp4, shut the app down."""
        import requests

        ray = self.ray()
        from ray import serve

        from dawn.serve.app import build_app

        row = next(r for r in self.results["inputs"]["rows"] if r["id"] == "unseen-speech")
        folder = self.paths["serve"]
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cpus = ray.cluster_resources().get("CPU", 2)
        share = max(0.1, min(1.0, (cpus - 0.5) / 3))  # the three stage replicas + ingress + queue fit at once
        args = {"checkpoints": str(self.paths["checkpoints"]), "output": str(folder / "service"), "device": "cpu",
                "features_cpus": share, "pbnet_cpus": share, "a2v_cpus": share, "ingress_cpus": 0.25,
                "queue_cpus": 0.25,
                "max_audio_seconds": 120, "default_steps": self.settings.render_steps}
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app(args), name="dawn", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            self.say(f"  Serve app up at {base} (docs: {base}/docs)")
            inputs = self.paths["inputs"]
            with open(inputs / row["portrait"], "rb") as portrait, open(inputs / row["audio"], "rb") as audio:
                response = requests.post(f"{base}/v1/renders", files={"portrait": ("portrait.png", portrait),
                                                                      "audio": ("speech.wav", audio)},
                                         data={"seed": str(row["seed"]), "steps": str(self.settings.render_steps),
                                               "eta": str(self.settings.render_eta),
                                               "motion_smoothing": str(self.settings.render_motion_smoothing)},
                                         timeout=120)
            if response.status_code != 202:
                raise DawnError(f"POST /v1/renders answered {response.status_code}: {response.text[:500]}")
            render_id = response.json()["id"]
            self.say(f"  POST /v1/renders -> 202, render {render_id}")
            status = self._poll(f"{base}/v1/renders/{render_id}")
            video = requests.get(f"{base}/v1/renders/{render_id}/video", timeout=120)
            if video.status_code != 200:
                raise DawnError(f"GET /v1/renders/{render_id}/video answered {video.status_code}")
            path = folder / f"{row['id']}.mp4"
            path.write_bytes(video.content)
        finally:
            serve.shutdown()
        return {"url": base, "render_id": render_id, "output": str(path), "frames": status.get("frames"),
                "status": status}

    def _poll(self, url: str, timeout_s: float = 1800) -> dict:
        import requests

        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            status = requests.get(url, timeout=30).json()
            if status["status"] in ("done", "failed"):
                if status["status"] == "failed":
                    raise DawnError(f"the Serve render failed: {status.get('error')}")
                return status
            if status.get("stage") != last:
                last = status.get("stage")
                self.say(f"  render {status['status']}: {last}")
            time.sleep(1.0)
        raise DawnError(f"the Serve render did not finish within {timeout_s:.0f} s")

    def stage_evaluate(self) -> dict:
        """Score the batch renders (held-out pairs against their ground truth; the unseen speech against its
        portrait) and the Serve render; compare the Serve and batch renders of the same pair."""
        from dawn.evaluation import EvaluationSettings, evaluate_items
        from dawn.metrics.lipsync import lip_sync_proxy

        rows = self.results["inputs"]["rows"]
        renders = dict(self.results["batch-render"]["renders"])
        if "serve" in self.results:
            renders["serve-unseen-speech"] = self.results["serve"]["output"]
        truth = self._held_out_truth([r["video_id"] for r in rows if r["video_id"]])
        by_id = {r["id"]: r for r in rows}
        by_id["serve-unseen-speech"] = by_id["unseen-speech"]
        items = [self._eval_item(render_id, Path(path), by_id[render_id], truth) for render_id, path in renders.items()]
        settings = EvaluationSettings(steps=self.settings.render_steps, seed=self.settings.seed, max_frames=None,
                                      save_videos=False)
        result = evaluate_items(items, self.paths["evaluation"], settings=settings,
                                params={"source": "dawn demo renders (batch job + Serve)",
                                        "checkpoints": str(self.paths["checkpoints"])},
                                tracking_uri=self.mlflow_uri, experiment=EXPERIMENT, run_name="demo-evaluation",
                                progress=lambda line: self.say("  " + line))
        table = {row["id"]: row for row in result.rows}
        held_out = [table[r["id"]] for r in rows if r["video_id"]]
        ground_truth_proxy = [lip_sync_proxy(t["mouth"], t["audio"])["correlation"] for t in truth.values()]
        contrast = self._identity_contrast(items, rows)
        out = {
            "metrics_markdown": str(result.markdown_path), "metrics_json": str(result.json_path),
            "mlflow_run_id": result.mlflow_run_id,
            "lipsync_held_out": _mean_of(held_out, "lipsync"),
            "lipsync_unseen_speech": table["unseen-speech"]["lipsync"],
            "lipsync_unseen_speech_serve": table.get("serve-unseen-speech", {}).get("lipsync"),
            "lipsync_held_out_speech_training_portraits": _mean_of(
                [row for key, row in table.items() if key.startswith("trainportrait-")], "lipsync"),
            "lipsync_ground_truth_videos": float(np.mean(ground_truth_proxy)) if ground_truth_proxy else None,
            "mouth_corr_gt_held_out": _mean_of(held_out, "mouth_corr_gt"),
            "identity_mean": result.mean["identity"], "identity_other_person": contrast,
            "identity_held_out_portrait": _mean_of(held_out + [table["unseen-speech"]], "identity"),
            # natural motion of the held-out renders against their ground truth
            "blink_per_s_held_out": _mean_of(held_out, "blink_per_s"),
            "blink_per_s_ground_truth": _mean_of(held_out, "blink_per_s_gt"),
            "pose_spread_held_out": _mean_of(held_out, "pose_std_ratio"),
            "pose_jitter_ratio_held_out": _mean_of(held_out, "pose_jitter_ratio"),
        }
        if "serve-unseen-speech" in renders:
            out["serve_vs_batch_mean_abs_diff"] = _mean_abs_difference(renders["serve-unseen-speech"],
                                                                       renders["unseen-speech"])
        first = next(r for r in rows if r["video_id"])
        out["lipsync_lfg_reconstruction"] = self._lfg_reconstruction(first["video_id"], truth[first["video_id"]])
        out["training_losses"] = self._training_losses()
        return out

    def _lfg_reconstruction(self, video_id: str, truth: dict) -> float:
        """Lip-sync proxy of the trained LFG's reconstruction of a held-out video from its first frame (driving
        frames = the video's own): how well the motion representation A2V-FDM predicts can show the mouth, the
        ceiling of the renders' score. Writes OUT/evaluation/lfg_reconstruction.mp4."""
        import torch

        from dawn.checkpoint import load_model
        from dawn.metrics.lipsync import analyze_frames, lip_sync_proxy
        from dawn.video import write_mp4

        lfg = load_model(self.paths["checkpoints"], "lfg").eval()
        real = torch.from_numpy(truth["frames"]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            frames = torch.cat([lfg(real[:1].expand(len(chunk), -1, -1, -1), chunk)["prediction"]
                                for chunk in real.split(32)])
        frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        write_mp4(self.paths["evaluation"] / "lfg_reconstruction.mp4", frames, fps=FPS, audio=truth["audio"])
        mouth = analyze_frames(frames)["mouth_opening"]
        score = lip_sync_proxy(mouth, truth["audio"])["correlation"]
        self.say(f"  LFG reconstruction of {video_id} from its first frame: lip-sync proxy {score:.3f}")
        return score

    def _training_losses(self) -> dict[str, list[float]]:
        """[mean of the first 3, mean of the last 3] logged values of each training run's main loss (MLflow)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_uri)
        losses = {}
        for stage, spec in TRAINING.items():
            name = {"lfg": "reconstruction", "a2v": "eps_mse"}.get(spec["model"], "rec")
            history = sorted(client.get_metric_history(self.results[stage]["mlflow_run_id"], name),
                             key=lambda m: m.step)
            if history:
                values = [m.value for m in history]
                losses[stage] = [float(np.mean(values[:3])), float(np.mean(values[-3:]))]
        return losses

    def _held_out_truth(self, video_ids: list[str]) -> dict[str, dict]:
        """Ground truth of the held-out videos from the shards: frames, pose, eyes, mouth, audio (segments joined)."""
        from dawn.data.readers import iter_shard_rows

        segments: dict[str, list] = {v: [] for v in video_ids}
        for row in iter_shard_rows(self.paths["shards"], split="test"):
            if row["video_id"] in segments:
                segments[row["video_id"]].append(row)
        truth = {}
        for video_id, parts in segments.items():
            parts.sort(key=lambda r: r["segment"])
            truth[video_id] = {name: np.concatenate([p[name] for p in parts])
                               for name in ("frames", "pose", "eyes", "mouth", "audio")}
        return truth

    def _eval_item(self, render_id: str, path: Path, row: dict, truth: dict):
        from dawn.audio import load_audio
        from dawn.evaluation import EvalItem
        from dawn.face import load_image
        from dawn.video import read_video

        frames, _ = read_video(path)
        waveform = load_audio(self.paths["inputs"] / row["audio"])[:len(frames) * 640]  # the speech it was given
        item = EvalItem(id=render_id, frames=frames, waveform=waveform,
                        portrait=load_image(self.paths["inputs"] / row["portrait"]))
        if row["video_id"]:
            real, length = truth[row["video_id"]], len(frames)
            item.real_frames, item.real_pose = real["frames"][:length], real["pose"][:length]
            item.real_eyes, item.real_mouth = real["eyes"][:length], real["mouth"][:length]
        return item

    def _identity_contrast(self, items: list, rows: list[dict]) -> float | None:
        """Offline identity similarity of the held-out renders to the *other* synthetic face (a different
        person): the level that `identity` must stay clearly above for the portrait's identity to count as
        kept."""
        from dawn.data.synth import IDENTITIES, load_portrait
        from dawn.metrics.identity import video_identity_similarity

        held_out = set(self.results["preprocess"]["held_out_identities"])
        own = {i.portrait for i in IDENTITIES if i.name in held_out}
        others = [i for i in IDENTITIES if i.portrait not in own and not i.mirrored and i.colour == (1.0, 1.0, 1.0)]
        if not others:
            return None
        other = load_portrait(others[0])
        scores = []
        for item in items:
            if item.real_frames is not None:
                try:
                    scores.append(video_identity_similarity(item.frames, other)["identity"])
                except DawnError:
                    pass
        return float(np.mean(scores)) if scores else None

    # -- the end ------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        evaluation = self.results.get("evaluate", {})
        return {
            "out": str(self.out),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.settings).items()},
            "videos": {**self.results.get("batch-render", {}).get("renders", {}),
                       **({"serve-unseen-speech": self.results["serve"]["output"]} if "serve" in self.results else {})},
            "checkpoints": str(self.paths["checkpoints"]),
            "metrics": {k: evaluation.get(k) for k in ("lipsync_held_out", "lipsync_unseen_speech",
                                                       "lipsync_held_out_speech_training_portraits",
                                                       "lipsync_ground_truth_videos", "lipsync_lfg_reconstruction",
                                                       "mouth_corr_gt_held_out", "identity_mean",
                                                       "identity_held_out_portrait",
                                                       "identity_other_person", "serve_vs_batch_mean_abs_diff",
                                                       "lipsync_unseen_speech_serve", "blink_per_s_held_out",
                                                       "blink_per_s_ground_truth", "pose_spread_held_out",
                                                       "pose_jitter_ratio_held_out")},
            "training_losses": evaluation.get("training_losses", {}),
            "metrics_table": evaluation.get("metrics_markdown"),
            "mlflow": {"tracking_uri": self.mlflow_uri, "experiment": EXPERIMENT,
                       "ui": f"mlflow ui --backend-store-uri {self.mlflow_uri} --host 127.0.0.1 --port 5000"},
            "training_steps": {stage: self.results[stage].get("step") for stage in TRAINING if stage in self.results},
            "stage_seconds": {stage: self.results[stage].get("seconds") for stage in STAGES if stage in self.results},
        }

    def print_summary(self, summary: dict) -> None:
        m = summary["metrics"]

        def fmt(value):
            return "–" if value is None else f"{value:.3f}"

        lines = ["", "dawn demo finished.", "", "Videos:"]
        lines += [f"  {name}: {path}" for name, path in summary["videos"].items()]
        lines += ["", f"Metrics table: {summary['metrics_table']}"]
        table = Path(summary["metrics_table"]) if summary["metrics_table"] else None
        if table is not None and table.is_file():
            lines += ["  " + line for line in table.read_text().splitlines() if line.startswith("|")]
        lines += [
            "",
            f"Lip-sync proxy (corr. of mouth opening and speech envelope; ground-truth videos "
            f"{fmt(m['lipsync_ground_truth_videos'])}):",
            f"  held-out videos {fmt(m['lipsync_held_out'])}, unseen espeak speech {fmt(m['lipsync_unseen_speech'])}; "
            f"the LFG's reconstruction of a held-out video (the ceiling): {fmt(m['lipsync_lfg_reconstruction'])}",
            f"  the held-out videos' speech on portraits of training identities: "
            f"{fmt(m['lipsync_held_out_speech_training_portraits'])}",
            f"Identity (offline similarity to the portrait, 0-1): held-out portrait "
            f"{fmt(m['identity_held_out_portrait'])}, all renders {fmt(m['identity_mean'])} "
            f"(held-out renders to another person: {fmt(m['identity_other_person'])})",
        ]
        lines.append(f"Head motion and blinks of the held-out renders: blinks/s {fmt(m['blink_per_s_held_out'])} "
                     f"(ground truth {fmt(m['blink_per_s_ground_truth'])}), pose spread "
                     f"{fmt(m['pose_spread_held_out'])} of the truth's, jitter {fmt(m['pose_jitter_ratio_held_out'])}x "
                     f"the truth's")
        if m["serve_vs_batch_mean_abs_diff"] is not None:
            lines.append(f"Serve vs batch render of the same pair: mean abs pixel difference "
                         f"{m['serve_vs_batch_mean_abs_diff']:.3f}, lip-sync proxy "
                         f"{fmt(m['lipsync_unseen_speech_serve'])} vs {fmt(m['lipsync_unseen_speech'])}")
        if summary["training_losses"]:
            lines.append("Training loss (first -> last logged): " + ", ".join(
                f"{stage.removeprefix('train-')} {first:.4g} -> {last:.4g}"
                for stage, (first, last) in summary["training_losses"].items()))
        lines += ["", f"Checkpoints: {summary['checkpoints']}", f"MLflow: {summary['mlflow']['tracking_uri']} "
                  f"(experiment {EXPERIMENT}); UI: {summary['mlflow']['ui']}",
                  f"Summary: {self.out / 'summary.json'}, log: {self.out / 'demo.log'}"]
        for line in lines:
            print(line, flush=True)


def _mean_of(rows: list[dict], column: str) -> float | None:
    values = [r[column] for r in rows if r[column] is not None]
    return float(np.mean(values)) if values else None


def _mean_abs_difference(path_a: str, path_b: str) -> float:
    """Mean absolute difference of two videos' frames (0-255 scale) over their common length."""
    from dawn.video import read_video

    a, _ = read_video(path_a)
    b, _ = read_video(path_b)
    length = min(len(a), len(b))
    return float(np.abs(a[:length].astype(np.float32) - b[:length].astype(np.float32)).mean())


def run_demo(settings: DemoSettings) -> dict:
    """Run the demo (see the module docstring); returns the summary also written to OUT/summary.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return Demo(settings).run()


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job end to end: synthetic corpus -> shards -> training -> renders -> metrics",
        description="Generate a synthetic corpus, preprocess it with Ray Data, train LFG, PBNet and A2V-FDM with "
                    "Ray Train + DeepSpeed (MLflow tracking), render held-out portrait + speech pairs with the "
                    "batch job and the Serve HTTP API, and evaluate them, all on a local Ray cluster. Rerun the "
                    "same command to resume.")
    p.add_argument("--out", default="demo_output", type=Path, help="output folder (default ./demo_output)")
    p.add_argument("--budget-minutes", type=float, default=40.0,
                   help="time budget of the training runs and what surrounds them (default 40)")
    p.add_argument("--videos", type=int, default=24, help="synthetic videos (default 24)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each video (default 10)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "hdtf128", "hdtf256"),
                   help="network shapes (default tiny: 64x64)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per training run (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render-steps", type=int, default=20, help="DDIM steps of the renders (default 20)")
    p.add_argument("--render-eta", type=float, default=RENDER_ETA,
                   help=f"DDIM eta of the renders (default {RENDER_ETA}: deterministic; 1 is the reference's)")
    p.add_argument("--render-motion-smoothing", type=float, default=RENDER_MOTION_SMOOTHING,
                   help=f"renders' motion smoothing, sigma in frames (default {RENDER_MOTION_SMOOTHING}; 0 is the "
                        f"paper's)")
    p.add_argument("--skip-serve", action="store_true", help="do not start the Serve HTTP app")
    p.set_defaults(func=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    run_demo(DemoSettings(out=args.out, budget_minutes=args.budget_minutes, videos=args.videos,
                          seconds=args.seconds, preset=args.preset, workers=args.workers, seed=args.seed,
                          skip_serve=args.skip_serve, render_steps=args.render_steps, render_eta=args.render_eta,
                          render_motion_smoothing=args.render_motion_smoothing))
    return 0
