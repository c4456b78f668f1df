"""The Serve app started for real (Ray on 2 CPUs, HTTP on 127.0.0.1, tiny random checkpoints): a render over
HTTP, a burst of concurrent requests against small queue limits, bad uploads, and the same render through
`dawn render`, the HTTP API and the batch job (one render path: the same frames, the same errors)."""

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dawn.audio import num_frames

pytestmark = pytest.mark.integration



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wav(path: Path, waveform: np.ndarray) -> Path:
    import soundfile

    soundfile.write(str(path), waveform, 16000)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory, speech_wav, astronaut_png):
    """The fixtures' portrait and speech, a 1 s cut of the speech, 8 s of speech, a blank picture."""
    import cv2

    from dawn.audio import load_audio

    folder = tmp_path_factory.mktemp("media")
    speech = load_audio(speech_wav)
    blank = folder / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 235, np.uint8))
    return {"portrait": astronaut_png.read_bytes(), "speech": speech_wav.read_bytes(),
            "speech_frames": num_frames(len(speech)),
            "short": _wav(folder / "short.wav", speech[8000:24000]).read_bytes(),
            "long": _wav(folder / "long.wav", np.tile(speech, 4)[: 8 * 16000]).read_bytes(),
            "blank": blank.read_bytes()}


KEYS = ("alice-key-6f1c2b", "bob-key-93d0aa")  # the API keys of the test service
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a local Ray with 2 CPUs, two ingress replicas and two API keys; yields a Server."""
    import ray
    from ray import serve

    from dawn.render import init_checkpoints

    folder = tmp_path_factory.mktemp("serve")
    checkpoints = init_checkpoints(folder / "ckpt", preset="tiny")
    keys = folder / "keys.txt"
    keys.write_text("\n".join(KEYS) + "\n")
    from dawn.serve.app import build_app

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"checkpoints": str(checkpoints), "output": str(folder / "renders"), "device": "cpu",
            "features_cpus": 0.25, "pbnet_cpus": 0.25, "a2v_cpus": 0.5, "ingress_cpus": 0.2, "queue_cpus": 0.2,
            "ingress_replicas": 2, "api_key_file": str(keys),
            "max_active_renders": 2, "max_queued_renders": 0, "max_audio_seconds": 5,
            "max_upload_bytes": 2_000_000, "default_steps": 2, "max_batch_size": 2,
            "batch_wait_s": 0.2}
    serve.run(build_app(args), name="dawn", route_prefix="/")
    try:
        yield Server(f"http://127.0.0.1:{port}", folder / "renders", args)
    finally:
        serve.shutdown()
        ray.shutdown()


class Server:
    def __init__(self, url, renders, args):
        self.url, self.renders, self.args = url, renders, args

    def __iter__(self):  # url, renders = server
        return iter((self.url, self.renders))


def _post(url, portrait, audio, name="speech.wav", headers=AUTH, **form):
    import requests

    files = {"portrait": ("portrait.png", portrait, "image/png"), "audio": (name, audio, "audio/wav")}
    return requests.post(f"{url}/v1/renders", files=files, data={k: str(v) for k, v in form.items()}, timeout=60,
                         headers=headers)


def _wait_done(url, render_id, timeout=150, headers=AUTH):
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        response = requests.get(f"{url}/v1/renders/{render_id}", timeout=10, headers=headers)
        assert response.status_code == 200, response.text  # never a 404 for an accepted render
        status = response.json()
        assert status["status"] in ("queued", "running", "done", "failed")
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"render {render_id} did not finish in {timeout} s: {status}")


def test_render_over_http_answers_the_same_through_every_replica(server, media, tmp_path):
    import requests

    from dawn.video import probe

    url, renders = server
    health = requests.get(f"{url}/healthz", timeout=10).json()  # open without a key
    assert health["status"] == "ok" and health["auth_required"] is True
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert "/v1/renders" in spec["paths"] and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200

    started = time.perf_counter()
    response = _post(url, media["portrait"], media["speech"], seed=3, steps=2)
    assert response.status_code == 202, response.text
    assert time.perf_counter() - started < 5  # answered once the uploads are stored, before any decoding
    render_id = response.json()["id"]
    early = requests.get(f"{url}/v1/renders/{render_id}/video", timeout=10, headers=AUTH)
    assert early.status_code == 409 and "not available" in early.json()["error"]

    status = _wait_done(url, render_id)
    assert status["status"] == "done", status
    assert status["progress"] == 1.0 and status["frames"] == media["speech_frames"] and status["seed"] == 3
    with ThreadPoolExecutor(4) as pool:  # many polls and downloads, spread over both ingress replicas
        answers = list(pool.map(lambda _: requests.get(f"{url}/v1/renders/{render_id}", timeout=10,
                                                       headers=AUTH).json(), range(16)))
        videos = list(pool.map(lambda _: requests.get(f"{url}/v1/renders/{render_id}/video", timeout=30,
                                                      headers=AUTH), range(8)))
    assert all(answer == status for answer in answers)
    assert {v.status_code for v in videos} == {200} and len({v.content for v in videos}) == 1
    assert videos[0].headers["content-type"] == "video/mp4"
    path = tmp_path / "render.mp4"
    path.write_bytes(videos[0].content)
    info = probe(path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["has_audio"]
    assert info["frames"] == media["speech_frames"] and (info["width"], info["height"]) == (64, 64)
    assert (renders / f"{render_id}.mp4").is_file() and (renders / f"{render_id}.json").is_file()

    listed = requests.get(f"{url}/v1/renders", params={"limit": 1}, timeout=10, headers=AUTH).json()
    assert listed["renders"][0]["id"] == render_id
    for missing in (f"{url}/v1/renders/{'0' * 32}", f"{url}/v1/renders/{'0' * 32}/video"):
        assert requests.get(missing, timeout=10, headers=AUTH).status_code == 404


def test_api_keys(server, media):
    """No key: 401 on every /v1 route; another key's render: 404 and not in its list; keys never logged."""
    import requests

    url, _ = server
    render_id = _post(url, media["portrait"], media["short"], steps=1).json()["id"]
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": KEYS[0]}):
        assert _post(url, media["portrait"], media["short"], headers=headers).status_code == 401
        for path in (f"/v1/renders/{render_id}", f"/v1/renders/{render_id}/video", "/v1/renders"):
            response = requests.get(url + path, timeout=10, headers=headers)
            assert response.status_code == 401 and response.json()["error"].startswith("a valid API key")
    bob = {"Authorization": f"Bearer {KEYS[1]}"}
    for path in (f"/v1/renders/{render_id}", f"/v1/renders/{render_id}/video"):
        assert requests.get(url + path, timeout=10, headers=bob).status_code == 404
    assert render_id not in [r["id"] for r in requests.get(f"{url}/v1/renders", timeout=10, headers=bob).json()["renders"]]
    assert _wait_done(url, render_id)["status"] == "done"

    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log in logs.rglob("*"):
        if log.is_file():
            text = log.read_bytes()
            assert not any(key.encode() in text for key in KEYS), f"an API key is in {log.name}"


def test_concurrent_requests_are_admitted_across_replicas_or_get_503(server, media):
    url, _ = server

    def attempt(seed):
        return _post(url, media["portrait"], media["short"], seed=seed, steps=2)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(attempt, range(8)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 503}, [(r.status_code, r.text) for r in responses]
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    busy = [r for r in responses if r.status_code == 503]
    assert 1 <= len(accepted) <= 2, codes  # 2 render slots, no queue, whichever ingress replica answered
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]
    assert len(set(accepted)) == len(accepted)
    for render_id in accepted:
        status = _wait_done(url, render_id)
        assert status["status"] == "done" and status["frames"] == 25, status


@pytest.mark.parametrize("case, status, reason", [
    ("not an image", 422, "portrait upload: cannot read the image portrait.png"),
    ("not audio", 422, "audio upload 'speech.wav' is not a readable WAV file"),
    ("truncated audio", 422, "audio upload 'speech.wav' is truncated"),
    ("empty audio", 422, "audio upload 'speech.wav' is empty"),
    ("too long", 422, "the limit is 5 s"),
    ("bad steps", 422, "steps must be at least 1, got 0"),
    ("no face", "failed", "no face found"),
])
def test_bad_uploads_get_4xx_or_fail_with_the_reason(server, media, case, status, reason):
    url, _ = server
    portrait, audio, form = media["portrait"], media["short"], {}
    if case == "not an image":
        portrait = b"GIF89a but not really a picture"
    elif case == "no face":
        portrait = media["blank"]
    elif case == "not audio":
        audio = b"RIFF\x00\x00\x00\x00WAVEjunk" * 50
    elif case == "truncated audio":  # the header claims 2 GB
        audio = media["short"][:40] + (2_000_000_000).to_bytes(4, "little") + media["short"][44:]
    elif case == "empty audio":
        audio = b""
    elif case == "too long":
        audio = media["long"]
    elif case == "bad steps":
        form["steps"] = 0
    response = _post(url, portrait, audio, **form)
    if status == "failed":  # found while decoding, after the 202
        assert response.status_code == 202, response.text
        record = _wait_done(url, response.json()["id"])
        assert record["status"] == "failed" and reason in record["error"]
        return
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]


def test_missing_field_is_a_client_error(server, media):
    import requests

    url, _ = server
    response = requests.post(f"{url}/v1/renders", files={"portrait": ("p.png", media["portrait"], "image/png")},
                             timeout=30, headers=AUTH)
    assert response.status_code == 422
    assert response.json() == {"error": "audio: Field required", "status": 422}  # the API's one error shape
    unknown = requests.get(f"{url}/v1/nothing-here", timeout=30)
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found", "status": 404}


def test_schemathesis_finds_nothing(server, tmp_path):
    """A bounded schemathesis run, every check, against the live app's /openapi.json (with a valid key)."""
    import subprocess
    import sys

    url, _ = server
    config = Path(__file__).with_name("schemathesis.toml")
    run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
                          f"{url}/openapi.json", "--checks", "all", "-H", f"Authorization: {AUTH['Authorization']}",
                          "--max-examples", "12", "--phases", "examples,coverage,fuzzing", "--workers", "2",
                          "--seed", "1"],
                         capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


# ---- one render path: dawn render, the HTTP API and the batch job agree ---------------------------------

@pytest.fixture(scope="module")
def driving_video(tmp_path_factory):
    from dawn.data.synth import generate_corpus

    folder = tmp_path_factory.mktemp("driving")
    return generate_corpus(folder / "corpus", videos=1, seconds=2, seed=1, size=128, progress=False)[0]


def _frames(path) -> np.ndarray:
    from dawn.video import read_video

    return read_video(path)[0].astype(np.int16)


@pytest.mark.parametrize("pose", ["pbnet", "pose video"])
def test_cli_http_and_batch_render_the_same_frames(server, media, driving_video, tmp_path, pose):
    """One portrait, one clip, one seed, eta 0: `dawn render`, POST /v1/renders and the batch job write the
    same video (compared decoded from the mp4s: equal up to H.264 rounding)."""
    import csv

    import requests
    import torch

    from dawn.batch_render import run_batch_render
    from dawn.cli import main
    from dawn.pipeline import RenderOptions

    url, renders = server
    checkpoints = renders.parent / "ckpt"
    portrait, audio = tmp_path / "portrait.png", tmp_path / "speech.wav"
    portrait.write_bytes(media["portrait"])
    audio.write_bytes(media["short"])
    pose_args = ["--pose-from", str(driving_video)] if pose == "pose video" else []
    cli_mp4 = tmp_path / "cli.mp4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers run (OMP_NUM_THREADS=1): float sums in the same order
    try:
        assert main(["render", "--checkpoints", str(checkpoints), "--portrait", str(portrait), "--audio", str(audio),
                     "--out", str(cli_mp4), "--steps", "2", "--eta", "0", "--seed", "4", "--quiet", *pose_args]) == 0
    finally:
        torch.set_num_threads(threads)

    files = {"portrait": ("portrait.png", media["portrait"], "image/png"),
             "audio": ("speech.wav", media["short"], "audio/wav")}
    if pose == "pose video":
        files["pose_video"] = ("driving.mp4", Path(driving_video).read_bytes(), "video/mp4")
    response = requests.post(f"{url}/v1/renders", files=files, data={"steps": "2", "eta": "0", "seed": "4"},
                             timeout=60, headers=AUTH)
    assert response.status_code == 202, response.text
    render_id = response.json()["id"]
    assert _wait_done(url, render_id)["status"] == "done"

    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "portrait", "audio", "pose_video", "seed"])
        writer.writerow(["pair", portrait, audio, driving_video if pose == "pose video" else "", 4])
    (result,) = run_batch_render(manifest, checkpoints, tmp_path / "batch", options=RenderOptions(steps=2, eta=0.0),
                                 cpus_per_actor=0.15, a2v_batch=1, show_progress=False)
    assert result["status"] == "done", result

    cli, http, batch = (_frames(p) for p in (cli_mp4, renders / f"{render_id}.mp4", tmp_path / "batch" / "pair.mp4"))
    assert cli.shape == http.shape == batch.shape == (25, 64, 64, 3)
    for name, other in (("HTTP", http), ("batch", batch)):
        difference = np.abs(cli - other)
        assert difference.max() == 0, f"{name}: mean {difference.mean()}, max {difference.max()}"
    assert np.abs(cli[1:] - cli[:1]).mean() > 0.1  # the frames are not one still image: there is something to compare


@pytest.mark.parametrize("option, value, reason", [
    ("eta", "7", "eta must be between 0 and 1, got 7"),
    ("steps", "0", "steps must be at least 1, got 0"),
    ("sampler", "euler", "sampler must be one of ddim, dpm-solver++, got 'euler'"),
])
def test_an_invalid_option_gets_the_same_reason_everywhere(server, media, tmp_path, capsys, option, value, reason):
    """The CLI exits 2 with the reason, the HTTP API answers 4xx JSON with it, the batch job fails the row with it."""
    import csv

    from dawn.batch_render import run_batch_render
    from dawn.cli import main

    url, renders = server
    checkpoints = renders.parent / "ckpt"
    portrait, audio = tmp_path / "portrait.png", tmp_path / "speech.wav"
    portrait.write_bytes(media["portrait"])
    audio.write_bytes(media["short"])
    code = main(["render", "--checkpoints", str(checkpoints), "--portrait", str(portrait), "--audio", str(audio),
                 "--out", str(tmp_path / "x.mp4"), "--quiet", f"--{option}", value])
    lines = capsys.readouterr().err.splitlines()  # (Ray's replicas log to the same stderr)
    assert code == 2 and f"dawn render: error: {reason}" in lines

    response = _post(url, media["portrait"], media["short"], **{option: value})
    assert 400 <= response.status_code < 500 and response.json()["error"] == reason

    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["id", "portrait", "audio", option], ["row", portrait, audio, value]])
    (result,) = run_batch_render(manifest, checkpoints, tmp_path / "batch", show_progress=False)
    assert result["status"] == "failed" and result["error"] == reason


# ---- faults: a stage replica killed, the whole app restarted ----------------------------------------

INTERNAL = ("Actor", "actor", "pid", "ip ", "namespace", "Ray", "ray", "0x", "Traceback")


def _replica_pid(deployment: str) -> int:
    """The process of a deployment's one replica (Ray titles it ray::ServeReplica:<app>:<deployment>)."""
    import psutil

    (pid,) = [p.pid for p in psutil.process_iter(["cmdline"])
              if any(f"ServeReplica:dawn:{deployment}" in part for part in p.info["cmdline"] or ())]
    return pid


def _wait_stage(url, render_id, stage, timeout=120):
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(f"{url}/v1/renders/{render_id}", timeout=10, headers=AUTH).json()
        if status["stage"] == stage or status["status"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"render {render_id} never reached {stage}")


def test_a_killed_a2v_replica_is_retried_or_fails_plainly(server, media):
    import os
    import signal

    url, _ = server
    response = _post(url, media["portrait"], media["short"], steps=20, seed=1)
    assert response.status_code == 202, response.text
    render_id = response.json()["id"]
    assert _wait_stage(url, render_id, "frames")["status"] == "running"
    time.sleep(1.0)  # well inside the 20 sampling steps
    os.kill(_replica_pid("A2VFDM"), signal.SIGKILL)
    record = _wait_done(url, render_id, timeout=240)
    if record["status"] == "failed":
        assert not any(word in record["error"] for word in INTERNAL), record["error"]
        assert "frames stage" in record["error"]
    after = _post(url, media["portrait"], media["short"], steps=1)
    assert after.status_code == 202, after.text
    assert _wait_done(url, after.json()["id"], timeout=240)["status"] == "done"


def test_a_restarted_app_keeps_every_render(server, media):
    """Renders done before the restart still download; one in flight ends done or failed with a reason."""
    import requests
    from ray import serve

    from dawn.serve.app import build_app

    url, _ = server
    done = _post(url, media["portrait"], media["short"], steps=1).json()["id"]
    assert _wait_done(url, done)["status"] == "done"
    in_flight = _post(url, media["portrait"], media["short"], steps=20).json()["id"]
    _wait_stage(url, in_flight, "frames")
    serve.delete("dawn")
    serve.run(build_app(server.args), name="dawn", route_prefix="/")

    video = requests.get(f"{url}/v1/renders/{done}/video", timeout=30, headers=AUTH)
    assert video.status_code == 200 and len(video.content) > 1000
    record = _wait_done(url, in_flight, timeout=240)
    assert record["status"] == "done" or (record["error"] and not any(w in record["error"] for w in INTERNAL))
    listed = requests.get(f"{url}/v1/renders", params={"limit": 100}, timeout=10, headers=AUTH).json()
    assert {done, in_flight} <= {r["id"] for r in listed["renders"]}
