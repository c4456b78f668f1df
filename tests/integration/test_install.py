"""The built wheel alone gives the platform: installed into a fresh virtual env (reusing the installed stack
through system site-packages), every command runs from an empty directory, `dawn serve` answers and renders
one clip over HTTP, and `serve run dawn.serve.app:build_app` starts the same app."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """A venv holding only the dawn wheel (dependencies from the system site-packages); an empty work dir."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(REPO)], check=True)
    wheels = list((root / "dist").glob("dawn-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", str(wheels[0])], check=True)
    work = root / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", VIRTUAL_ENV=str(root / "venv"))
    return {"bin": bin_dir, "cwd": work, "env": env, "root": root}


def _run(venv, *argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=venv["cwd"], env=venv["env"], capture_output=True, text=True,
                          timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 240) -> dict:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            response = requests.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return response.json()
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/healthz did not answer in {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def test_the_package_comes_from_the_wheel(venv):
    result = _run(venv, venv["bin"] / "python", "-c",
                  "import dawn, dawn.serve.app; print(dawn.__file__); print(dawn.serve.app.build_app.__name__)")
    assert result.returncode == 0, result.stderr
    location, builder = result.stdout.split()
    assert location.startswith(str(venv["root"] / "venv")) and builder == "build_app", result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["preprocess", "--help"], ["train", "a2v", "--help"],
                                  ["train", "lfg", "--help"], ["train", "pbnet", "--help"], ["serve", "--help"],
                                  ["render", "--help"], ["batch-render", "--help"], ["evaluate", "--help"],
                                  ["demo", "--help"]])
def test_every_subcommand_answers(venv, argv):
    result = _run(venv, venv["bin"] / "dawn", *argv, timeout=120)
    assert result.returncode == 0 and "usage: dawn" in result.stdout, result.stderr


def test_dawn_serve_renders_from_an_empty_directory(venv, astronaut_png, speech_wav):
    import requests

    assert _run(venv, venv["bin"] / "dawn", "init-checkpoints", "--preset", "tiny", "ckpt").returncode == 0
    port = _free_port()
    process = subprocess.Popen([str(venv["bin"] / "dawn"), "serve", "--checkpoints", "ckpt", "--port", str(port),
                                "--num-cpus", "2", "--output", "renders"], cwd=venv["cwd"], env=venv["env"],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_healthy(url, process)["status"] == "ok"
        files = {"portrait": ("portrait.png", astronaut_png.read_bytes(), "image/png"),
                 "audio": ("speech.wav", speech_wav.read_bytes(), "audio/wav")}
        response = requests.post(f"{url}/v1/renders", files=files, data={"steps": "2", "seed": "1"}, timeout=120)
        assert response.status_code == 202, response.text
        render_id = response.json()["id"]
        deadline = time.time() + 240
        while time.time() < deadline:
            status = requests.get(f"{url}/v1/renders/{render_id}", timeout=10).json()
            if status["status"] in ("done", "failed"):
                break
            time.sleep(1)
        assert status["status"] == "done", status
        video = requests.get(f"{url}/v1/renders/{render_id}/video", timeout=30)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        assert (venv["cwd"] / "renders" / f"{render_id}.mp4").is_file()
    finally:
        _stop(process)


def test_serve_run_starts_the_app_by_its_import_path(venv):
    if not (venv["cwd"] / "ckpt").is_dir():
        assert _run(venv, venv["bin"] / "dawn", "init-checkpoints", "--preset", "tiny", "ckpt").returncode == 0
    checkpoints = venv["cwd"] / "ckpt"
    # the Serve CLI (`serve run`) under the venv's interpreter, so that it imports the installed wheel
    serve_cli = [str(venv["bin"] / "python"), "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())"]
    process = subprocess.Popen([*serve_cli, "run", "dawn.serve.app:build_app",
                                f"checkpoints={checkpoints}", f"output={venv['cwd'] / 'renders-run'}", "device=cpu",
                                "features_cpus=0.25", "pbnet_cpus=0.25", "a2v_cpus=0.5", "ingress_cpus=0.25"],
                               cwd=venv["cwd"], env={**venv["env"], "RAY_USAGE_STATS_ENABLED": "0"},
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        health = _wait_healthy("http://127.0.0.1:8000", process)
        assert health["status"] == "ok" and "limits" in health
    finally:
        _stop(process)
