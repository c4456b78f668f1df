"""`TrainConfig`: everything one training run needs, for all three models (LFG, PBNet, A2V-FDM).

One dataclass, resolved once on the driver (`resolved()` fills the defaults that depend on other fields),
shipped to every Ray Train worker as a plain dict (`to_dict()` / `from_dict()`), and logged to MLflow as
the run's parameters. The DeepSpeed config is built from it by `deepspeed_config()` unless a full
config (dict or JSON file) is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dawn import DawnError
from dawn.config import MODELS, PRESETS
DTYPES = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    model: str  # "lfg" | "pbnet_pose" | "pbnet_blink" | "a2v"; also the exported checkpoint's name
    data: str  # preprocessed shards directory (docs/data_schema.md); the "train" split is used
    preset: str = "tiny"  # network shapes: tiny | hdtf128 | hdtf256
    stage: int = 1  # A2V-FDM curriculum stage (paper §3.5): 1 = K' frames from the first, 2 = K in [30, 40]
    # where things go
    storage_path: str = "runs"  # Ray Train storage (checkpoints); also holds the default MLflow store
    run_name: str | None = None  # default "<model>[-s<stage>]-<preset>"; rerun with the same name to resume
    mlflow_uri: str | None = None  # default sqlite:///<storage_path>/mlflow.db
    experiment: str = "dawn"
    export_dir: str | None = None  # dawn checkpoint written at the end; default <storage>/<run>/export
    # optimisation (DeepSpeed)
    deepspeed_config: dict | str | None = None  # full DeepSpeed config (dict or JSON path); overrides below
    zero_stage: int = 2
    dtype: str = "auto"  # auto: bf16 (autocast) on GPU, fp32 on CPU
    grad_clip: float = 1.0
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per worker, per micro-step
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # linear warm-up, then cosine decay to lr_min_ratio * lr, or constant
    warmup_steps: int = 0
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    # bookkeeping
    checkpoint_every: int = 500
    log_every: int = 10
    sample_every: int = 1000  # MLflow artifact (image grid / curves / frame strip); 0 = never
    keep_checkpoints: int = 2
    num_workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    max_minutes: float | None = None  # training-time budget (from the first step, across restarts; start-up
    # not counted): stop cleanly with a final checkpoint + export
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    # model inputs
    init_from: str | None = None  # dawn checkpoint dir: start from its <model> weights (A2V stage 2: stage 1)
    lfg: str | None = None  # dawn checkpoint dir holding lfg.* (frozen; A2V targets and source latents)
    vgg19: str | None = None  # VGG-19 weights (torchvision state dict, .pth/.safetensors) for the LFG loss
    model_overrides: dict = field(default_factory=dict)  # network config fields replaced after the preset
    objective_options: dict = field(default_factory=dict)  # loss weights etc., see each objective's Options
    # data
    overfit_batches: int = 0  # >0: train on the first N batches over and over (smoke tests, overfitting)
    samples_per_row: int = 4  # samples drawn from each shard row (segment) per pass (paper A.2: 25 per video)
    cache_rows: bool = False  # keep each worker's split in memory after one pass (corpora that fit in RAM)

    def __post_init__(self):
        if self.model not in MODELS:
            raise DawnError(f"unknown model {self.model!r} (choose from {', '.join(MODELS)})")
        if self.preset not in PRESETS:
            raise DawnError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if self.stage not in (1, 2):
            raise DawnError(f"--stage must be 1 or 2, got {self.stage}")
        if self.dtype not in DTYPES:
            raise DawnError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DawnError(f"unknown lr schedule {self.lr_schedule!r} (choose from {', '.join(LR_SCHEDULES)})")
        if self.zero_stage not in (0, 1, 2, 3):
            raise DawnError(f"ZeRO stage must be 0-3, got {self.zero_stage}")
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise DawnError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model == "a2v" and self.lfg is None:
            raise DawnError("A2V-FDM training needs a trained LFG: --lfg CHECKPOINT_DIR (holding lfg.json)")
        if self.model == "a2v" and self.stage == 2 and self.init_from is None:
            raise DawnError("A2V-FDM stage 2 starts from the stage-1 weights: --init-from STAGE1_EXPORT_DIR")
        self.betas = tuple(self.betas)

    # -- derived values -------------------------------------------------------------------------------

    def resolved(self) -> "TrainConfig":
        """A copy with absolute paths and every default that depends on other fields filled in.

        storage_path may be a URI (s3://, gs://, ...) that Ray Train writes checkpoints to; then the MLflow
        store (--mlflow-uri) and the export folder (--export-dir) must be given explicitly. The data,
        checkpoint and export folders are local paths (on a cluster: a filesystem shared by all nodes).
        """
        remote = "://" in self.storage_path
        if remote and (self.mlflow_uri is None or self.export_dir is None):
            raise DawnError(f"--storage-path {self.storage_path} is remote: give --mlflow-uri (e.g. an MLflow "
                            "server) and a local or shared --export-dir too")
        storage = self.storage_path if remote else str(Path(self.storage_path).expanduser().resolve())
        run_name = self.run_name or (f"{self.model}-s{self.stage}-{self.preset}" if self.model == "a2v"
                                     else f"{self.model}-{self.preset}")
        absolute = {name: str(Path(getattr(self, name)).expanduser().resolve())
                    for name in ("data", "init_from", "lfg", "vgg19", "export_dir") if getattr(self, name) is not None}
        deepspeed = self.deepspeed_config
        if isinstance(deepspeed, str):
            path = Path(deepspeed).expanduser()
            if not path.is_file():
                raise DawnError(f"DeepSpeed config {path} does not exist")
            try:
                deepspeed = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DawnError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
        defaults = {"export_dir": str(Path(storage) / run_name / "export")} if self.export_dir is None else {}
        return dataclasses.replace(
            self, storage_path=storage, run_name=run_name,
            mlflow_uri=self.mlflow_uri or f"sqlite:///{Path(storage) / 'mlflow.db'}",
            deepspeed_config=deepspeed, **defaults, **absolute,
        )

    @property
    def run_dir(self) -> Path:
        """Ray Train's folder of this run (checkpoints) under a local storage path."""
        return Path(self.storage_path) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return cls(**values)


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up over warmup_steps, then cosine decay
    from 1 to lr_min_ratio at the last step, or constant 1."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.lr_min_ratio + (1 - config.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(config: TrainConfig, on_gpu: bool) -> dict:
    """The DeepSpeed config of a run: the user's full config if given (batch sizes forced to ours),
    otherwise ZeRO `zero_stage`, bf16 autocast on GPU (or as asked), fp32 on CPU, gradient clipping and
    accumulation. The training loop autocasts to bfloat16 when "torch_autocast" or "bf16" is enabled.

    The optimizer and LR schedule are torch objects handed to deepspeed.initialize (no compiled ops)."""
    if config.deepspeed_config is not None:
        ds = json.loads(json.dumps(config.deepspeed_config))  # deep copy
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise DawnError(f"the DeepSpeed config must not define {key!r}: dawn passes a torch AdamW and "
                                "its LR schedule (--lr, --lr-schedule, --warmup-steps)")
    else:
        bf16 = config.dtype == "bf16" or (config.dtype == "auto" and on_gpu)
        ds = {
            "zero_optimization": {"stage": config.zero_stage},
            # bf16 = torch autocast: bfloat16 compute and gradient communication, fp32 master weights in
            # the modules (no bf16 cast of buffers such as the diffusion schedule or RoPE frequencies)
            "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
            "gradient_clipping": config.grad_clip,
            "steps_per_print": 10**9,  # dawn logs to MLflow itself
            "wall_clock_breakdown": False,
        }
    ds["train_micro_batch_size_per_gpu"] = config.batch_size
    ds["gradient_accumulation_steps"] = config.grad_accum
    ds.pop("train_batch_size", None)
    return ds


# ---------------------------------------------------------------------------------------------------
# `dawn train lfg|pbnet|a2v` (and jobs/train_*.py): the training flags


def add_arguments(parser, model_flags: tuple[str, ...] = ()) -> None:
    """Add the training flags to an argparse parser. model_flags: extra flags of one job, any of
    "stage", "lfg", "vgg19"."""
    defaults = TrainConfig(model="lfg", data="")
    add = parser.add_argument
    add("--data", required=True, help="preprocessed shards folder (jobs/preprocess.py output)")
    add("--preset", default=defaults.preset, choices=PRESETS, help="network shapes")
    if "stage" in model_flags:
        add("--stage", type=int, default=1, choices=(1, 2), help="curriculum stage (paper §3.5)")
    if "lfg" in model_flags:
        add("--lfg", required=True, help="dawn checkpoint folder with the trained LFG (lfg.json/.safetensors)")
    if "vgg19" in model_flags:
        add("--vgg19", default=None, help="torchvision vgg19 weights (.pth/.safetensors) for the perceptual loss")
    add("--init-from", default=None, help="dawn checkpoint folder to start from (A2V stage 2: the stage-1 export)")
    add("--storage-path", default=defaults.storage_path, help="Ray Train storage (checkpoints, default MLflow store)")
    add("--run-name", default=None, help="run folder name; rerun with the same name to resume")
    add("--export-dir", default=None, help="where the dawn checkpoint goes (default <storage>/<run>/export)")
    add("--mlflow-uri", default=None, help="MLflow tracking URI (default sqlite:///<storage>/mlflow.db)")
    add("--experiment", default=defaults.experiment, help="MLflow experiment name")
    add("--deepspeed-config", default=None, help="full DeepSpeed JSON config (optimizer/scheduler not allowed)")
    add("--zero-stage", type=int, default=defaults.zero_stage, choices=(0, 1, 2, 3))
    add("--dtype", default=defaults.dtype, choices=DTYPES, help="auto: bf16 autocast on GPU, fp32 on CPU")
    add("--steps", type=int, default=defaults.steps, help="optimizer steps")
    add("--batch-size", type=int, default=defaults.batch_size, help="per worker and micro-step")
    add("--grad-accum", type=int, default=defaults.grad_accum, help="gradient accumulation micro-steps")
    add("--grad-clip", type=float, default=defaults.grad_clip, help="gradient norm clipping (0: off)")
    add("--lr", type=float, default=defaults.lr)
    add("--lr-schedule", default=defaults.lr_schedule, choices=LR_SCHEDULES)
    add("--warmup-steps", type=int, default=defaults.warmup_steps)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    add("--log-every", type=int, default=defaults.log_every)
    add("--sample-every", type=int, default=defaults.sample_every, help="MLflow sample artifact period (0: never)")
    add("--num-workers", type=int, default=defaults.num_workers, help="Ray Train workers (one GPU each with --use-gpu)")
    add("--use-gpu", action="store_true")
    add("--seed", type=int, default=defaults.seed)
    add("--max-minutes", type=float, default=None, help="training-time budget, counted from the first step (start-up "
        "not included) and across restarts; stops with a checkpoint and an export")
    add("--max-failures", type=int, default=defaults.max_failures, help="worker-group restarts from the last checkpoint")
    add("--samples-per-row", type=int, default=defaults.samples_per_row, help="samples per shard segment and pass")
    add("--cache-rows", action="store_true",
        help="keep each worker's decoded split in memory after the first pass and replay it in a new random "
             "order (small corpora: saves re-running the Ray Data pipeline every pass)")
    add("--overfit-batches", type=int, default=0, help="train on the first N batches only (smoke tests)")
    add("--options", default="{}", help='objective options as JSON, e.g. \'{"w_lip": 1.0}\'')
    add("--model-overrides", default="{}", help="network config fields as JSON, e.g. '{\"dim\": 32}'")
    add("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    add("--num-cpus", type=int, default=None, help="CPUs of the local Ray (local runs only)")


def from_arguments(args, model: str) -> TrainConfig:
    """TrainConfig from the flags of `add_arguments`."""
    def as_json(flag: str, text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DawnError(f"--{flag} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise DawnError(f"--{flag} must be a JSON object")
        return value

    return TrainConfig(
        model=model, data=args.data, preset=args.preset, stage=getattr(args, "stage", 1),
        storage_path=args.storage_path, run_name=args.run_name, mlflow_uri=args.mlflow_uri,
        experiment=args.experiment, export_dir=args.export_dir, deepspeed_config=args.deepspeed_config,
        zero_stage=args.zero_stage, dtype=args.dtype, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, sample_every=args.sample_every, num_workers=args.num_workers,
        use_gpu=args.use_gpu, seed=args.seed, max_minutes=args.max_minutes, max_failures=args.max_failures,
        init_from=args.init_from, lfg=getattr(args, "lfg", None), vgg19=getattr(args, "vgg19", None),
        samples_per_row=args.samples_per_row, cache_rows=args.cache_rows, overfit_batches=args.overfit_batches,
        objective_options=as_json("options", args.options), model_overrides=as_json("model-overrides", args.model_overrides),
    )
