"""The browser page of the Serve app, driven in headless Chromium (Debian's chromium + Playwright) against a
real `dawn serve` with tiny checkpoints: upload, submit, progress, the video in the player; a bad upload shows
the API's reason next to its field and creates no render. Screenshots go to $DAWN_TEST_ARTIFACTS (default
test-artifacts/)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path, *flags: str):
    """`dawn serve` on tiny random checkpoints; yields (url, renders folder)."""
    import requests

    from dawn.render import init_checkpoints

    checkpoints = init_checkpoints(folder / "ckpt", preset="tiny")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dawn.cli", "serve", "--checkpoints", str(checkpoints),
                                "--output", str(folder / "renders"), "--port", str(port), "--num-cpus", "2",
                                "--max-audio-seconds", "10", *flags],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert process.poll() is None, f"dawn serve exited with {process.returncode}"
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.time() < deadline, "dawn serve did not answer /healthz"
        time.sleep(1)
    try:
        yield url, folder / "renders"
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _start_server(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api as playwright_api  # pip install playwright (.ci/install.sh)

    assert Path(CHROMIUM).is_file(), "Debian's chromium is not installed (.ci/install.sh installs it)"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def artifacts() -> Path:
    folder = Path(os.environ.get("DAWN_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_page_renders_a_video(server, browser, astronaut_png, speech_wav, artifacts):
    from dawn.audio import load_audio, num_frames

    url, renders = server
    expected_seconds = num_frames(len(load_audio(speech_wav))) / 25
    page = browser.new_page(viewport={"width": 900, "height": 1300})
    page.goto(f"{url}/")
    page.set_input_files("#portrait", str(astronaut_png))
    page.wait_for_selector("#face-box", state="visible", timeout=60_000)
    box = page.eval_on_selector("#face-box", "e => [e.offsetWidth, e.offsetHeight]")
    assert box[0] > 20 and abs(box[0] - box[1]) <= 2  # a square crop around the face, drawn on the preview
    page.set_input_files("#audio", str(speech_wav))
    page.fill("#steps", "2")
    page.fill("#eta", "0")
    page.click("#submit")
    page.wait_for_selector("#progress-box", state="visible")
    page.wait_for_function("document.getElementById('progress').value >= 1", timeout=240_000)
    page.wait_for_function("() => { const v = document.getElementById('video'); return !v.hidden && v.readyState >= 1 "
                           "&& isFinite(v.duration) }", timeout=60_000)
    duration = page.eval_on_selector("#video", "v => v.duration")
    assert abs(duration - expected_seconds) < 0.1, (duration, expected_seconds)
    assert page.is_visible("#download") and page.text_content("#stage").startswith("done")
    assert page.locator("#recent li").count() == 1
    page.screenshot(path=str(artifacts / "web-page.png"), full_page=True)
    render_id = page.text_content("#render-id")
    assert (renders / f"{render_id}.mp4").is_file()
    page.close()


def test_page_shows_the_reason_for_a_bad_upload(server, browser, speech_wav, tmp_path, artifacts):
    url, renders = server
    before = sorted(p.name for p in renders.glob("*")) if renders.exists() else []
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is plain text, not a picture\n" * 20)
    page = browser.new_page(viewport={"width": 900, "height": 1100})
    page.goto(f"{url}/")
    page.set_input_files("#portrait", str(not_an_image))
    page.set_input_files("#audio", str(speech_wav))
    page.wait_for_function("document.querySelector('[data-error-for=portrait]').textContent.length > 0",
                           timeout=60_000)
    page.fill("#steps", "2")
    page.click("#submit")  # clears the messages and disables the button until the API has answered
    page.wait_for_function("!document.getElementById('submit').disabled", timeout=60_000)
    message = page.text_content("[data-error-for=portrait]")
    assert "portrait upload" in message and "notes.png" in message, message
    assert page.is_hidden("#progress-box") and page.locator("#recent li").count() == 0
    page.screenshot(path=str(artifacts / "web-page-error.png"), full_page=True)
    after = sorted(p.name for p in renders.glob("*")) if renders.exists() else []
    assert after == before  # no render was created
    page.close()


def test_page_asks_for_the_api_key_and_sends_it(tmp_path_factory, browser, astronaut_png, speech_wav, artifacts):
    folder = tmp_path_factory.mktemp("web-key")
    (folder / "keys.txt").write_text("page-test-key\n")
    for url, renders in _start_server(folder, "--api-key-file", str(folder / "keys.txt")):
        page = browser.new_page(viewport={"width": 900, "height": 1300})
        page.goto(f"{url}/")
        page.wait_for_selector("#key-box", state="visible", timeout=30_000)
        page.set_input_files("#portrait", str(astronaut_png))  # no key yet: the API's 401 reason is shown
        page.wait_for_function("document.querySelector('[data-error-for=portrait]').textContent.includes('API key')",
                               timeout=60_000)
        page.fill("#api-key", "page-test-key")
        page.dispatch_event("#api-key", "change")
        page.dispatch_event("#portrait", "change")  # the same file again, now with the key
        page.wait_for_selector("#face-box", state="visible", timeout=60_000)
        page.set_input_files("#audio", str(speech_wav))
        page.fill("#steps", "2")
        page.click("#submit")
        page.wait_for_function("() => { const v = document.getElementById('video'); return !v.hidden && v.readyState >= 1 }",
                               timeout=240_000)
        assert page.text_content("#stage").startswith("done")
        page.screenshot(path=str(artifacts / "web-page-api-key.png"), full_page=True)
        page.close()
