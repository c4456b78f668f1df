"""The one training loop of dawn: Ray Train (TorchTrainer, V2) + DeepSpeed + MLflow, for every objective.

    run_training(config)                         driver: checks inputs, opens/resumes the MLflow run,
      └─ TorchTrainer(train_worker, datasets)    builds the Ray Data shards dataset and fits
           └─ train_worker (every rank)          objective + one DeepSpeed engine per trainable network,
                                                 resume, lock-step batches, logging, checkpoints, export

Checkpoints: every `checkpoint_every` steps all ranks write `engine.save_checkpoint` (ZeRO shards are per
rank) plus a small per-rank JSON (global step, data RNG state, MLflow run id) into a temporary folder and
call `ray.train.report(..., checkpoint=...)`; Ray merges the ranks' files into one checkpoint folder under
`<storage_path>/<run_name>/`. A restarted worker group (FailureConfig) or a rerun with the same
storage_path and run_name (Train V2's resume) continues from the latest one.

MLflow: the driver creates the run (or finds the one tagged with the same run folder) and logs the
parameters (resolved config, seeds, git commit); rank 0 logs the metrics (losses averaged over the ranks,
lr, samples/s), a sample artifact every `sample_every` steps and the exported checkpoint.

Data: each worker reads its split of the Ray Dataset (`ray.train.get_dataset_shard`) through the
objective's reader. Workers stay in lock-step: every step they agree (one small all-reduce) on whether
all of them have a batch, whether the time budget is spent, and whether the data is empty; when one
worker's pass over its split ends, all of them start the next pass together. Every pass re-runs the
dataset's pipeline (seconds of start-up); with `cache_rows` a worker keeps its decoded split after the first
pass and replays it in a new random order instead (for corpora that fit in memory, like the demo's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from dawn import DawnError
from dawn.config import model_spec
from dawn.train.config import TrainConfig, deepspeed_config, lr_multiplier

log = logging.getLogger("dawn.train")

STATE_DIR = "dawn_state"  # per-rank JSON state inside a checkpoint
ENGINE_DIR = "deepspeed"  # one DeepSpeed checkpoint folder per engine inside a checkpoint
ENGINE_TAG = "state"
# Fault injection for the resume tests: with DAWN_FAULT_AT_STEP=N in the driver's environment, the last
# rank exits hard once at step N. Ray Train's controller collects reports every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): the injected failure waits this long after its last
# report so that the checkpoint is registered first.
FAULT_AT_STEP_ENV = "DAWN_FAULT_AT_STEP"
FAIL_INJECTION_DELAY_S = 5.0


def objective_class(model: str):
    """The Objective subclass of a TrainConfig.model name (the registry's, dawn.config)."""
    return model_spec(model).objective_class()


def build_objective(config: TrainConfig, device: torch.device | str):
    """The objective of config.model (networks built on `device`)."""
    return objective_class(config.model)(config, torch.device(device))


# ---------------------------------------------------------------------------------------------------
# Driver side


def run_training(config: TrainConfig, address: str | None = None, num_cpus: int | None = None) -> dict:
    """Train `config.model` with Ray Train + DeepSpeed; returns a summary of the finished run.

    Joins the Ray cluster at `address` / $RAY_ADDRESS, or starts a local Ray (with `num_cpus` logical
    CPUs, default max(cores, num_workers + 2) so Ray Data has CPUs beside the training workers) unless
    Ray is already initialised. Rerunning with the same storage_path and run_name resumes the run.

    Returns {"run_name", "run_dir", "checkpoint", "export_dir", "mlflow_uri", "mlflow_run_id", "step",
    "metrics"}.
    """
    import ray
    from ray.data.expressions import col
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = config.resolved()
    objective_cls = objective_class(config.model)
    objective_cls.parse_options(config)  # unknown options fail here, not in every worker
    array_columns = objective_cls.data_columns
    files = _train_files(config, array_columns)
    for name in ("init_from", "lfg"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_dir():
            raise DawnError(f"--{name.replace('_', '-')} {path}: not a dawn checkpoint directory")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        local_cpus = num_cpus or max(os.cpu_count() or 1, config.num_workers + 2)
        ray.init(address=address, num_cpus=local_cpus if address == "local" else None,
                 include_dashboard=False, log_to_driver=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
    git_commit = _git_commit()
    run_id = _open_mlflow_run(config, git_commit)

    dataset = (ray.data.read_parquet(files, shuffle="files").select_columns(_read_columns(array_columns))
               .filter(expr=col("split") == "train"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "mlflow_run_id": run_id, "git_commit": git_commit,
                           "fault_at_step": _fault_at_step()},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(
            storage_path=config.storage_path, name=config.run_name,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            # Ray Train tees every worker print() to its logger as well, which shows each line twice
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets={"train": dataset},
    )
    try:
        result = trainer.fit()
    except BaseException:
        _close_mlflow_run(config, run_id, "FAILED")
        raise
    _close_mlflow_run(config, run_id, "FINISHED")
    metrics = dict(result.metrics or {})
    return {
        "run_name": config.run_name,
        "run_dir": str(config.run_dir),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export_dir": config.export_dir,
        "mlflow_uri": config.mlflow_uri,
        "mlflow_run_id": run_id,
        "step": metrics.get("step"),
        "metrics": metrics,
    }


def _read_columns(array_columns: tuple[str, ...]) -> list[str]:
    from dawn.data.schema import SCALAR_COLUMNS

    return list(SCALAR_COLUMNS) + list(array_columns)


def _train_files(config: TrainConfig, array_columns: tuple[str, ...]) -> list[str]:
    """The shard files of the data folder that hold training rows with the needed columns."""
    import pyarrow.parquet as pq

    from dawn.data.readers import shard_files

    shards = Path(config.data) / "shards"
    files = sorted(shards.glob("*.parquet"))
    if not files:
        raise DawnError(f"--data {config.data}: no Parquet shards under {shards} (run jobs/preprocess.py first)")
    missing = [c for c in _read_columns(array_columns) if c not in pq.read_schema(files[0]).names]
    if missing:
        raise DawnError(f"--data {config.data}: shards lack the columns {missing} that {config.model} needs")
    train = [str(f) for f in shard_files(config.data, "train")]
    if not train:
        raise DawnError(f"--data {config.data}: no rows in the 'train' split")
    return train


def _git_commit() -> str:
    """Commit of the dawn source tree ("-dirty" with local changes), $DAWN_GIT_COMMIT, or "unknown"."""
    if os.environ.get("DAWN_GIT_COMMIT"):
        return os.environ["DAWN_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mlflow_client(config: TrainConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config.mlflow_uri)


def _flat_params(config: TrainConfig, git_commit: str) -> dict[str, str]:
    params = {k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
              for k, v in config.to_dict().items()}
    params.update({
        "git_commit": git_commit,
        "seed.init": f"torch.manual_seed({config.seed}) on every rank before the networks are built",
        "seed.data": f"numpy default_rng([{config.seed}, rank])",
        "seed.noise": f"torch.manual_seed({config.seed} + 1000 * (rank + 1) + resumed step)",
    })
    return params


def _open_mlflow_run(config: TrainConfig, git_commit: str) -> str:
    """The MLflow run of this run folder (tag dawn.run_dir), resumed if it exists, else created with the
    parameters. On resume, parameters whose value changed are recorded as tags `changed.<name>`."""
    client = _mlflow_client(config)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    elif config.mlflow_uri.startswith("sqlite:"):  # a local store: artifacts beside the database
        location = (Path(config.storage_path) / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(config.experiment, artifact_location=location)
    else:
        experiment_id = client.create_experiment(config.experiment)
    run_dir = f"{config.storage_path.rstrip('/')}/{config.run_name}"
    runs = client.search_runs([experiment_id], filter_string=f"tags.`dawn.run_dir` = '{run_dir}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    params = _flat_params(config, git_commit)
    if runs:
        run = runs[0]
        client.update_run(run.info.run_id, status="RUNNING")
        for key, value in params.items():
            if run.data.params.get(key) not in (None, value[:6000]):
                client.set_tag(run.info.run_id, f"changed.{key}", value[:5000])
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=config.run_name,
                            tags={"dawn.run_dir": run_dir, "dawn.model": config.model})
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def _close_mlflow_run(config: TrainConfig, run_id: str, status: str) -> None:
    try:
        _mlflow_client(config).set_terminated(run_id, status)
    except Exception as e:  # never hide the training outcome behind a tracking error
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)


# ---------------------------------------------------------------------------------------------------
# Worker side


def train_worker(loop_config: dict) -> None:
    """Ray Train per-worker function (every rank runs it)."""
    config = TrainConfig.from_dict(loop_config["config"])
    # DeepSpeed's own call of a renamed torch.distributed function, once per worker; nothing a user can change
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import ray.train
    import ray.train.torch

    from dawn.data.readers import decode_rows

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    objective = build_objective(config, device)
    on_gpu = device.type == "cuda"
    ds_config = deepspeed_config(config, on_gpu)
    bf16 = any(ds_config.get(key, {}).get("enabled", False) for key in ("torch_autocast", "bf16"))
    engines = _build_engines(objective, config, ds_config)

    state = _restore(engines, rank, config)
    step = state.get("step", 0)
    rng = np.random.default_rng([config.seed, rank])
    if "rng" in state:
        rng.bit_generator.state = state["rng"]
    torch.manual_seed(config.seed + 1000 * (rank + 1) + step)
    run_id = state.get("mlflow_run_id") or loop_config["mlflow_run_id"]
    tracker = _Tracker(config, run_id) if rank == 0 else None
    if tracker and step:
        tracker.note(f"resumed from step {step}")

    shard = ray.train.get_dataset_shard("train")
    rows = RowPasses(lambda: decode_rows(shard.iter_rows()), config.cache_rows, rng)
    feed = _BatchFeed(lambda: objective.batches(rows.next_pass(), rng), config.overfit_batches)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    # The time budget counts training time only: from this worker's first step, plus what the run trained
    # before a restart (kept in the checkpoint), so start-up and restore never eat into it.
    budget = 60 * config.max_minutes if config.max_minutes else None
    trained_before, started = state.get("trained_seconds", 0.0), time.time()
    window = _MetricWindow()
    last_saved, last_metrics = step, {}
    objective.train(True)
    if rank == 0:
        _say(f"[{config.run_name}] {config.model} preset {config.preset}: step {step} -> {config.steps}, "
             f"{world} worker(s) x batch {config.batch_size} x accumulation {config.grad_accum}, device {device}")
    while step < config.steps:
        stop = budget is not None and trained_before + time.time() - started > budget
        batch = None
        for _ in range(config.grad_accum):
            batch, stop = feed.next(stop)
            if batch is None:
                break
            batch = objective.to_device(batch)
            with autocast():
                window.add(objective.train_step(engines, batch, step))
        if batch is None:  # time budget spent (agreed by all ranks): stop with a checkpoint + export
            if tracker:
                tracker.note(f"time budget of {config.max_minutes} min spent at step {step}")
            break
        step += 1
        window.samples += config.batch_size * config.grad_accum
        _inject_failure(config, loop_config.get("fault_at_step"), rank, world, step)
        if step % config.log_every == 0 or step == config.steps:
            metrics = last_metrics = window.reduce(world)
            metrics["lr"] = engines["model"].get_lr()[0]
            if tracker:
                tracker.log(metrics, step)
                _say(f"[{config.run_name}] step {step}/{config.steps} "
                     + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if config.sample_every and step % config.sample_every == 0 and (tracker or config.zero_stage == 3):
            _log_sample(objective, batch, autocast, tracker, step)
        if step % config.checkpoint_every == 0:
            _save_and_report(engines, config, rank, step, rng, run_id, last_metrics,
                             trained_before + time.time() - started)
            last_saved = step
    if step != last_saved:
        _save_and_report(engines, config, rank, step, rng, run_id, last_metrics, trained_before + time.time() - started)
    # every rank draws the same number of batches (the feed agrees on passes), rank 0 fits with them
    fit_batches = [objective.to_device(feed.next()[0]) for _ in range(objective.fit_batches)]
    _export(objective, engines, config, rank, step, run_id, loop_config.get("git_commit", "unknown"), tracker,
            fit_batches)


def _build_engines(objective, config: TrainConfig, ds_config: dict) -> dict:
    """One DeepSpeed engine per trainable network: torch AdamW client optimizer (no compiled ops) and a
    LambdaLR warm-up + cosine/constant schedule stepped by the engine."""
    import deepspeed

    engines = {}
    for name, module in objective.trainable.items():
        groups = [g for g in objective.param_groups(name) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=objective.learning_rate(name), betas=config.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, config))
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, dist_init_required=False)
        engines[name] = engine
    return engines


def _restore(engines: dict, rank: int, config: TrainConfig) -> dict:
    """Load the latest reported checkpoint, if any: engines (weights, optimizer, LR schedule) and this
    rank's state (step, data RNG, MLflow run id). Returns that state ({} on a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(str(directory / ENGINE_DIR / name), tag=ENGINE_TAG)
            if path is None:
                raise DawnError(f"checkpoint {directory} has no DeepSpeed state for {name}")
        own = directory / STATE_DIR / f"rank{rank}.json"
        state = json.loads((own if own.is_file() else directory / STATE_DIR / "rank0.json").read_text())
    if not own.is_file():  # more workers than when it was saved: a fresh data stream for this rank
        state.pop("rng", None)
    return state


def _save_and_report(engines: dict, config: TrainConfig, rank: int, step: int, rng: np.random.Generator,
                     run_id: str, metrics: dict, trained_seconds: float) -> None:
    """All ranks: DeepSpeed checkpoint + this rank's state (step, data RNG, MLflow run, seconds trained so
    far) into a temp folder, then ray.train.report."""
    import ray.train
    from ray.train import Checkpoint

    directory = Path(tempfile.mkdtemp(prefix=f"dawn-ckpt-{rank}-"))
    try:
        for name, engine in engines.items():
            engine.save_checkpoint(str(directory / ENGINE_DIR / name), tag=ENGINE_TAG)
        (directory / STATE_DIR).mkdir()
        state = {"step": step, "rng": rng.bit_generator.state, "mlflow_run_id": run_id,
                 "trained_seconds": trained_seconds}
        (directory / STATE_DIR / f"rank{rank}.json").write_text(json.dumps(state))
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"step_{step:08d}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _export(objective, engines: dict, config: TrainConfig, rank: int, step: int, run_id: str, git_commit: str,
            tracker, fit_batches: list[dict]) -> None:
    """Rank 0 fits what the objective fits to data (`fit_to_data`), writes the dawn checkpoint into export_dir
    and logs both to MLflow (ZeRO-3: gathered first)."""
    import deepspeed

    modules = list(objective.trainable.values())
    gathered = (deepspeed.zero.GatheredParameters([p for m in modules for p in m.parameters()])
                if config.zero_stage == 3 else nullcontext())
    with gathered:
        if rank != 0:
            return
        objective.train(False)
        fitted = objective.fit_to_data(fit_batches) if fit_batches else {}
        if fitted:
            _say(f"[{config.run_name}] fitted to {len(fit_batches)} training batches: "
                 + " ".join(f"{k} {v:.4g}" for k, v in fitted.items()))
            if tracker:
                tracker.log(fitted, step)
        extra = {"preset": config.preset, "training": {
            "run_name": config.run_name, "step": step, "stage": config.stage, "mlflow_run_id": run_id,
            "git_commit": git_commit, "data": config.data}}
        paths = objective.export(config.export_dir, extra)
    _say(f"[{config.run_name}] exported {', '.join(p.name for p in paths)} to {config.export_dir}")
    if tracker:
        tracker.log_files(config.export_dir, "export")


def _say(text: str) -> None:
    """A progress line from a worker (Ray forwards worker stdout to the driver)."""
    print(text, flush=True)


def _fault_at_step() -> int | None:
    value = os.environ.get(FAULT_AT_STEP_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise DawnError(f"{FAULT_AT_STEP_ENV} must be a step number, got {value!r}")
    return int(value)


def _inject_failure(config: TrainConfig, fault_at_step: int | None, rank: int, world: int, step: int) -> None:
    """Test hook: the last rank exits hard once at `fault_at_step` (a marker file in the run folder)."""
    if fault_at_step is None or step != fault_at_step or rank != world - 1:
        return
    marker = config.run_dir / f".failed_once_at_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    time.sleep(FAIL_INJECTION_DELAY_S)
    os._exit(17)


def _log_sample(objective, batch: dict, autocast: Callable, tracker, step: int) -> None:
    objective.train(False)
    try:
        with autocast():
            name, data = objective.sample_artifact(batch)
    finally:
        objective.train(True)
    if tracker:
        tracker.log_bytes(f"step_{step:08d}_{name}", data, "samples")


class _BatchFeed:
    """Batches for one worker in lock-step with the others.

    next(stop) fetches this worker's next batch and all-reduces three flags with the other workers:
    "I have no batch" (-> everyone starts a new pass over their split together), "stop" (time budget)
    and "a fresh pass gave no batch twice in a row" (-> DawnError on every rank: too little data).
    With overfit_batches = N the first N batches are kept and cycled.
    """

    def __init__(self, make_batches: Callable[[], Iterator[dict]], overfit_batches: int = 0):
        self.make_batches, self.overfit = make_batches, overfit_batches
        self.iterator, self.fresh, self.empty_passes = None, False, 0
        self.kept: list[dict] = []
        self.position = 0

    def next(self, stop: bool = False) -> tuple[dict | None, bool]:
        if self.overfit and len(self.kept) == self.overfit:
            stop = _agree([0.0, float(stop), 0.0])[1] > 0
            batch = self.kept[self.position % self.overfit]
            self.position += 1
            return (None, True) if stop else (batch, False)
        while True:
            if self.iterator is None:
                self.iterator, self.fresh = iter(self.make_batches()), True
            batch = next(self.iterator, None)
            empty = batch is None and self.fresh and self.empty_passes >= 1
            missing, any_stop, any_empty = (v > 0 for v in _agree([float(batch is None), float(stop), float(empty)]))
            if any_empty:
                raise DawnError("a worker's split of the training data yields no batch: use more or longer "
                                "segments, more --samples-per-row, fewer workers or a smaller batch size")
            if any_stop:
                return None, True
            if not missing:
                self.fresh, self.empty_passes = False, 0
                if self.overfit:
                    self.kept.append(batch)
                return batch, False
            self.empty_passes = self.empty_passes + 1 if self.fresh else 0
            self.iterator = None


class RowPasses:
    """The decoded rows of one worker's split, one pass at a time.

    Without caching every pass streams `stream()` (the Ray Data pipeline runs again). With caching, the rows
    of the first complete pass are kept and every later pass yields them in a new order drawn from `rng`.
    """

    def __init__(self, stream: Callable[[], Iterator[dict]], cache: bool, rng: np.random.Generator):
        self.stream, self.cache, self.rng = stream, cache, rng
        self.rows: list[dict] | None = None

    def next_pass(self) -> Iterator[dict]:
        if self.rows is not None:
            for index in self.rng.permutation(len(self.rows)):
                yield self.rows[index]
            return
        kept = []
        for row in self.stream():
            if self.cache:
                kept.append(row)
            yield row
        if self.cache:  # only a pass that ran to the end fills the cache
            self.rows = kept


def _agree(flags: list[float]) -> list[float]:
    """Element-wise max of `flags` over all ranks (one small all-reduce; identity without a group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    tensor = torch.tensor(flags, dtype=torch.float32)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


class _MetricWindow:
    """Running sums of the per-step losses between two log lines; reduce() averages over the ranks and
    adds throughput (rank 0's timing: samples/s in total and per worker, samples per CPU-second)."""

    def __init__(self):
        self.sums, self.counts, self.samples = defaultdict(float), defaultdict(int), 0
        self.start, self.cpu_start = time.time(), time.process_time()

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += v
            self.counts[k] += 1

    def reduce(self, world: int) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(self.sums)
        means = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64)
        if dist.is_initialized() and world > 1:
            means = means.float()
            if dist.get_backend() == "nccl":
                means = means.cuda()
            dist.all_reduce(means)
            means = means.cpu().double() / world
        elapsed = max(time.time() - self.start, 1e-9)
        metrics = dict(zip(keys, means.tolist()))
        metrics["samples_per_s"] = self.samples * world / elapsed
        metrics["samples_per_s_per_worker"] = self.samples / elapsed
        # per CPU-second of this worker process (all its threads): stable on a shared machine
        metrics["samples_per_cpu_s_per_worker"] = self.samples / max(time.process_time() - self.cpu_start, 1e-9)
        self.__init__()
        return metrics


class _Tracker:
    """Rank 0's MLflow writer (client API, no global active run)."""

    def __init__(self, config: TrainConfig, run_id: str):
        self.client, self.run_id = _mlflow_client(config), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def note(self, text: str) -> None:
        _say(text)
        self.client.set_tag(self.run_id, "dawn.last_event", text)

    def log_bytes(self, name: str, data: bytes, artifact_path: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_files(self, directory: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, directory, artifact_path)
