"""`dawn train lfg|pbnet|a2v`: the command line of the training loop (flags in dawn.train.config)."""

from __future__ import annotations

import json

from dawn import RAY_CLUSTER_HELP
from dawn.train.config import add_arguments, from_arguments

TRAIN_COMMANDS = {  # dawn train <name>: help, extra flags of that model
    "lfg": ("the Latent Flow Generator (paper §3.2)", ("vgg19",)),
    "pbnet": ("a PBNet pose or blink model (paper §3.4)", ("kind",)),
    "a2v": ("A2V-FDM, one curriculum stage (paper §3.3, §3.5)", ("stage", "lfg")),
}


def register_cli(subparsers) -> None:
    resume = "Rerun with the same --storage-path and --run-name to resume from the last checkpoint."
    train = subparsers.add_parser("train", help="train LFG, PBNet or A2V-FDM with Ray Train + DeepSpeed (MLflow tracking)",
                                  description=f"Train one model with Ray Train + DeepSpeed, tracked in MLflow. "
                                              f"{RAY_CLUSTER_HELP} {resume}")
    models = train.add_subparsers(dest="model", required=True, metavar="{lfg,pbnet,a2v}")
    for name, (what, flags) in TRAIN_COMMANDS.items():
        parser = models.add_parser(name, help=f"train {what}", description=f"Train {what}.")
        if "kind" in flags:
            parser.add_argument("--kind", required=True, choices=("pose", "blink"), help="which PBNet to train")
        add_arguments(parser, model_flags=tuple(f for f in flags if f != "kind"))
        parser.set_defaults(func=_train_command)


def _train_command(args) -> int:
    from dawn.train.loop import run_training

    model = f"pbnet_{args.kind}" if args.model == "pbnet" else args.model
    summary = run_training(from_arguments(args, model), address=args.address, num_cpus=args.num_cpus)
    print(json.dumps(summary, indent=2, default=str))
    return 0
