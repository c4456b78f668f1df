"""`dawn serve`: the Serve application (dawn.serve.app) on a local Ray, or on a running cluster."""

from __future__ import annotations

import argparse
from pathlib import Path

from dawn import DawnError
from dawn.serving import ApiKeys, ServeLimits


def app_args(args: argparse.Namespace, cluster_cpus: float) -> dict:
    """The `build_app` arguments for the parsed `dawn serve` flags. Without --cpus-per-replica every replica
    gets an equal share of the cluster's CPUs (at most 1; each ingress replica half a share, the render queue
    a quarter), so all of them start."""
    out = {"checkpoints": str(Path(args.checkpoints).resolve()), "output": str(Path(args.output).resolve()),
           "device": args.device, "dtype": args.dtype, "max_batch_size": args.max_batch_size}
    if args.hubert:
        out["hubert"] = str(Path(args.hubert).resolve())
    if args.api_key_file:
        ApiKeys.from_file(args.api_key_file)  # a missing or empty key file stops `dawn serve` at once
        out["api_key_file"] = str(Path(args.api_key_file).resolve())
    replicas = args.features_replicas + args.pbnet_replicas + args.a2v_replicas
    share = args.cpus_per_replica or min(1.0, cluster_cpus / (replicas + 0.5 * args.ingress_replicas + 0.25))
    for stage in ("features", "pbnet", "a2v"):
        out[f"{stage}_replicas"] = getattr(args, f"{stage}_replicas")
        out[f"{stage}_cpus"] = share
    out["ingress_replicas"] = args.ingress_replicas
    out["ingress_cpus"] = share / 2
    out["queue_cpus"] = share / 4
    out["a2v_gpus"] = args.a2v_gpus
    for name in ("max_upload_bytes", "max_audio_seconds", "max_active_renders", "max_queued_renders",
                 "max_steps", "default_eta", "renders_per_minute"):
        out[name] = getattr(args, name)
    return out


def _serve_command(args: argparse.Namespace) -> int:
    if not Path(args.checkpoints).is_dir():
        raise DawnError(f"checkpoint directory not found: {args.checkpoints} (see `dawn init-checkpoints`)")
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=args.num_cpus)
    from dawn.serve.app import build_app

    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"dawn serve: http://{args.host}:{args.port}/docs (Ctrl-C stops)", flush=True)
    app = build_app(app_args(args, ray.cluster_resources().get("CPU", 1.0)))
    serve.run(app, name="dawn", route_prefix="/", blocking=True)
    return 0


def register_cli(subparsers) -> None:
    limits = ServeLimits()
    p = subparsers.add_parser("serve", help="start the render HTTP API (Ray Serve) on this machine")
    p.add_argument("--checkpoints", default="checkpoints", help="dawn checkpoint directory (default ./checkpoints)")
    p.add_argument("--hubert", help="HuBERT model folder (default: CHECKPOINTS/hubert)")
    p.add_argument("--output", default="renders", help="where rendered mp4s go (default ./renders)")
    p.add_argument("--api-key-file", help="require `Authorization: Bearer <key>` on /v1 routes: one key per line")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="join a running Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--device", default="auto", help="auto (cuda when a replica has a GPU), cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (they share the "
                   "render records of --output)")
    p.add_argument("--features-replicas", type=int, default=1)
    p.add_argument("--pbnet-replicas", type=int, default=1)
    p.add_argument("--a2v-replicas", type=int, default=1)
    p.add_argument("--a2v-gpus", type=float, default=0.0, help="GPUs per A2V-FDM replica (default 0)")
    p.add_argument("--cpus-per-replica", type=float, help="CPUs per stage replica (default: fit all replicas)")
    p.add_argument("--max-batch-size", type=int, default=4, help="A2V-FDM requests sampled together")
    p.add_argument("--max-upload-bytes", type=int, default=limits.max_upload_bytes)
    p.add_argument("--max-audio-seconds", type=float, default=limits.max_audio_seconds)
    p.add_argument("--max-active-renders", type=int, default=limits.max_active_renders)
    p.add_argument("--max-queued-renders", type=int, default=limits.max_queued_renders)
    p.add_argument("--max-steps", type=int, default=limits.max_steps)
    p.add_argument("--renders-per-minute", type=int, default=limits.renders_per_minute,
                   help="per API key; more submissions get 429 (default 0: no limit)")
    p.add_argument("--default-eta", type=float, default=limits.default_eta,
                   help="DDIM eta of requests that send none (default 1, the reference's; 0 = deterministic)")
    p.set_defaults(func=_serve_command)
