"""Serving throughput and latency: renders per minute and p50/p99 latency at several concurrencies, with 1 vs
2 A2V-FDM replicas, over real HTTP against the Serve app (dawn.serve.app); or, with --burst N, N clients
submitting at once to an app with two ingress replicas and API keys.

    python bench/serve.py [--checkpoints DIR] [--preset tiny] [--seconds 1] [--steps 2]
                          [--concurrency 1 4 8] [--a2v-replicas 1 2] [--requests 8] [--num-cpus N]
    python bench/serve.py --burst 100 [--max-active 4] [--max-queued 28]

Burst: every client POSTs one render at the same moment; the answers must be 202, or 503 with Retry-After
(the queue is full), nothing else; every accepted render must finish; the figure of merit is the 202's own
latency (POST sent to answer received) under the burst, beside the same latency of a lone submission.

Each client thread submits a render (POST /v1/renders), polls its status every 0.1 s until done, and
downloads the mp4; latency = submit to video downloaded. Renders per minute = finished renders / wall time
of the level. Random checkpoints of `--preset` (init_checkpoints) unless --checkpoints is given; the portrait
is skimage's astronaut and the speech espeak-ng, cut to `--seconds`. Queue limits are set high enough that
no request is refused. Every replica gets an equal share of `--num-cpus` (default: all CPUs).
"""

import argparse
import io
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _media(seconds: float, folder: Path) -> tuple[bytes, bytes]:
    import cv2
    import soundfile
    from skimage import data

    from dawn.audio import load_audio
    from dawn.data.tts import synthesize_speech

    speech = load_audio(synthesize_speech("Hello there, this is a test of the talking head service, "
                                          "rendering many clips at once.", folder / "speech.wav"))
    buffer = io.BytesIO()
    soundfile.write(buffer, speech[: int(seconds * 16000)], 16000, format="WAV")
    ok, png = cv2.imencode(".png", data.astronaut()[:, :, ::-1])
    return png.tobytes(), buffer.getvalue()


def _render(url: str, portrait: bytes, audio: bytes, steps: int, seed: int) -> float:
    import requests

    start = time.perf_counter()
    response = requests.post(f"{url}/v1/renders", data={"steps": str(steps), "seed": str(seed)}, timeout=600,
                             files={"portrait": ("p.png", portrait, "image/png"), "audio": ("a.wav", audio, "audio/wav")})
    response.raise_for_status()
    render_id = response.json()["id"]
    while True:
        status = requests.get(f"{url}/v1/renders/{render_id}", timeout=60).json()
        if status["status"] == "done":
            break
        if status["status"] == "failed":
            raise RuntimeError(f"render failed: {status['error']}")
        time.sleep(0.1)
    video = requests.get(f"{url}/v1/renders/{render_id}/video", timeout=60)
    video.raise_for_status()
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", help="dawn checkpoints (default: random ones of --preset)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "hdtf128", "hdtf256"))
    parser.add_argument("--seconds", type=float, default=1.0, help="speech length of each render")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps of each render")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--a2v-replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=8, help="renders per concurrency level (at least the level)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--burst", type=int, default=0, help="N clients submitting at once (skips the levels)")
    parser.add_argument("--max-active", type=int, default=4, help="burst: renders in the pipeline at once")
    parser.add_argument("--max-queued", type=int, default=28, help="burst: waiting renders beyond those")
    args = parser.parse_args()
    if args.burst:
        return burst(args)

    import ray
    from ray import serve

    from dawn.serve.app import build_app

    from dawn.render import init_checkpoints

    tmp = Path(tempfile.mkdtemp(prefix="dawn-bench-serve-"))
    checkpoints = Path(args.checkpoints) if args.checkpoints else init_checkpoints(tmp / "ckpt", preset=args.preset)
    portrait, audio = _media(args.seconds, tmp)
    print(f"serve: {args.preset} checkpoints, {args.seconds:g} s clips ({int(args.seconds * 25)} frames), "
          f"{args.steps} DDIM steps, {args.num_cpus} CPUs shared by all replicas, A2V batch <= {args.max_batch_size}, "
          f"{args.requests} renders per level")
    print(f"{'a2v':>3} {'conc':>4} {'renders/min':>11} {'p50 s':>7} {'p99 s':>7}")
    for replicas in args.a2v_replicas:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        share = min(1.0, args.num_cpus / (2 + replicas + 0.5))
        app = build_app({"checkpoints": str(checkpoints), "output": str(tmp / "renders"), "device": "cpu",
                         "features_replicas": 1, "pbnet_replicas": 1, "a2v_replicas": replicas,
                         "features_cpus": share, "pbnet_cpus": share, "a2v_cpus": share, "ingress_cpus": share / 2,
                         "max_active_renders": max(args.concurrency), "max_queued_renders": 4 * max(args.concurrency),
                         "max_batch_size": args.max_batch_size, "batch_wait_s": 0.05, "max_steps": args.steps})
        serve.run(app, name="dawn", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        try:
            _render(url, portrait, audio, args.steps, 0)  # warm-up: first calls load lazily (mediapipe, ...)
            for concurrency in args.concurrency:
                count = max(args.requests, concurrency)
                start = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    latencies = list(pool.map(lambda seed: _render(url, portrait, audio, args.steps, seed),
                                              range(count)))
                wall = time.perf_counter() - start
                print(f"{replicas:>3} {concurrency:>4} {count / wall * 60:>11.1f} "
                      f"{_percentile(latencies, 50):>7.2f} {_percentile(latencies, 99):>7.2f}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()


KEY = "bench-serve-key"


def _submit(url: str, portrait: bytes, audio: bytes, steps: int, seed: int) -> tuple[int, float, dict, str]:
    """(status code, seconds to the answer, headers, body) of one POST /v1/renders."""
    import requests

    start = time.perf_counter()
    response = requests.post(f"{url}/v1/renders", data={"steps": str(steps), "seed": str(seed)}, timeout=600,
                             headers={"Authorization": f"Bearer {KEY}"},
                             files={"portrait": ("p.png", portrait, "image/png"), "audio": ("a.wav", audio, "audio/wav")})
    return response.status_code, time.perf_counter() - start, dict(response.headers), response.text


def _finish(url: str, render_id: str, timeout: float = 1800) -> str:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(f"{url}/v1/renders/{render_id}", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60).json()
        if status["status"] in ("done", "failed"):
            return status["status"]
        time.sleep(0.5)
    return "timeout"


def burst(args) -> None:
    import json

    import ray
    from ray import serve

    from dawn.render import init_checkpoints
    from dawn.serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="dawn-bench-serve-"))
    checkpoints = Path(args.checkpoints) if args.checkpoints else init_checkpoints(tmp / "ckpt", preset=args.preset)
    portrait, audio = _media(args.seconds, tmp)
    (tmp / "keys").write_text(KEY + "\n")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    share = min(1.0, args.num_cpus / 5)
    serve.run(build_app({"checkpoints": str(checkpoints), "output": str(tmp / "renders"), "device": "cpu",
                         "features_cpus": share, "pbnet_cpus": share, "a2v_cpus": share, "ingress_cpus": share / 2,
                         "ingress_replicas": 2, "queue_cpus": share / 2, "api_key_file": str(tmp / "keys"),
                         "max_active_renders": args.max_active, "max_queued_renders": args.max_queued,
                         "max_batch_size": args.max_batch_size, "max_steps": args.steps}), name="dawn", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        lone = []
        for seed in range(3):  # warm-up, and the 202 latency with nothing else going on
            code, seconds, _, body = _submit(url, portrait, audio, args.steps, seed)
            assert code == 202, body
            lone.append(seconds)
            _finish(url, json.loads(body)["id"])
        start = time.perf_counter()
        with ThreadPoolExecutor(args.burst) as pool:
            answers = list(pool.map(lambda seed: _submit(url, portrait, audio, args.steps, seed), range(args.burst)))
        accepted = [json.loads(body)["id"] for code, _, _, body in answers if code == 202]
        busy = [headers for code, _, headers, _ in answers if code == 503]
        other = sorted(code for code, _, _, _ in answers if code not in (202, 503))
        with ThreadPoolExecutor(16) as pool:
            endings = list(pool.map(lambda render_id: _finish(url, render_id), accepted))
        wall = time.perf_counter() - start
        latencies = [seconds for code, seconds, _, _ in answers if code == 202]
        print(f"serve burst: {args.burst} clients at once, {args.preset} checkpoints, {args.seconds:g} s clips, "
              f"{args.steps} steps, {args.num_cpus} CPUs, 2 ingress replicas, API key, "
              f"{args.max_active} active + {args.max_queued} queued renders admitted")
        print(f"answers: {len(accepted)} x 202, {len(busy)} x 503 ({sum('retry-after' in {k.lower() for k in h} for h in busy)} "
              f"with Retry-After), other: {other or 'none'}")
        print(f"accepted renders: {endings.count('done')} done, {endings.count('failed')} failed, "
              f"{endings.count('timeout')} unfinished, in {wall:.0f} s")
        print(f"{'202 latency':<24} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
        print(f"{'lone submission':<24} {_percentile(lone, 50):>7.3f} {_percentile(lone, 99):>7.3f} {max(lone):>7.3f}")
        print(f"{f'burst of {args.burst}':<24} {_percentile(latencies, 50):>7.3f} {_percentile(latencies, 99):>7.3f} "
              f"{max(latencies):>7.3f}")
        print(f"ratio burst p99 / lone p50: {_percentile(latencies, 99) / _percentile(lone, 50):.1f}x")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
