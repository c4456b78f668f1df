"""dawn.serving without Ray: limits, upload checks, error mapping, the job table, the background render
sequence (with in-process stages), and A2V-FDM request batching."""

import asyncio
import json

import numpy as np
import pytest

from dawn.audio import num_frames
from dawn import DawnError
from dawn.pipeline import Motion, Portrait, RenderOptions, RenderPipeline
from dawn.serving import (FramesRequest, JobTable, RenderService, RequestError, ServeLimits, ServiceBusy, Upload,
                          error_body, error_status, prepare_render, render_frames_batched, render_options)


def _upload(field, path_or_bytes, name=None):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return Upload(field=field, filename=name or f"{field}.bin", data=data)


# ---- limits, options, errors -----------------------------------------------------------------------

def test_limits_from_string_args_and_checks():
    limits = ServeLimits.from_args({"max_queued_renders": "3", "max_audio_seconds": "2.5", "checkpoints": "x"})
    assert limits.max_queued_renders == 3 and limits.max_audio_seconds == 2.5
    with pytest.raises(DawnError, match="max_active_renders"):
        ServeLimits(max_active_renders=0)
    with pytest.raises(DawnError, match="bad serve limit"):
        ServeLimits.from_args({"max_steps": "many"})


def test_render_options_checks_steps_and_seed():
    limits = ServeLimits(max_steps=50, default_steps=7)
    assert render_options(None, None, limits) == RenderOptions(steps=7, seed=0)
    assert render_options(5, 50, limits).seed == 5
    for seed, steps, match in ((0, 0, "steps"), (0, 51, "steps"), (-1, 10, "seed")):
        with pytest.raises(RequestError, match=match) as info:
            render_options(seed, steps, limits)
        assert error_status(info.value) == 400
    # DDIM eta and sampler: the request's, else the service's defaults (the reference's eta 1 and DDIM)
    assert (render_options(None, None, limits).eta, render_options(None, None, limits).sampler) == (1.0, "ddim")
    chosen = render_options(None, None, limits, eta=0.0, sampler="dpm-solver++")
    assert (chosen.eta, chosen.sampler) == (0.0, "dpm-solver++")
    assert render_options(None, None, ServeLimits(default_eta=0.0)).eta == 0.0
    for changes, match in (({"eta": 1.5}, "eta"), ({"eta": -0.1}, "eta"), ({"sampler": "euler"}, "sampler")):
        with pytest.raises(RequestError, match=match):
            render_options(None, None, limits, **changes)
    with pytest.raises(DawnError, match="default_eta"):
        ServeLimits(default_eta=2.0)


def test_error_mapping():
    body, headers = error_body(ServiceBusy("queue full", retry_after_s=7))
    assert body == {"error": "queue full", "status": 503} and headers == {"Retry-After": "7"}
    assert error_status(DawnError("no face found in x")) == 422
    assert error_status(RequestError("too big", 413)) == 413

    class Wrapped(Exception):  # what Ray raises for an error in another replica: the original in .cause
        cause = RequestError("empty", 400)

    assert error_status(Wrapped()) == 400 and error_body(Wrapped())[0]["error"] == "empty"

    import pickle  # errors raised in a replica reach the ingress pickled

    again = pickle.loads(pickle.dumps(RequestError("too long", 422)))
    assert (str(again), error_status(again)) == ("too long", 422)
    busy = pickle.loads(pickle.dumps(ServiceBusy("full", 5)))
    assert error_body(busy)[1] == {"Retry-After": "5"}


# ---- uploads -> prepared inputs ----------------------------------------------------------------------

def test_prepare_render_accepts_a_portrait_and_speech(astronaut_png, speech_wav):
    prepared = prepare_render(RenderPipeline(), _upload("portrait", astronaut_png, "a.png"),
                              _upload("audio", speech_wav, "s.wav"), None, resolution=64, limits=ServeLimits())
    assert prepared.portrait.image.shape == (64, 64, 3) and prepared.portrait.pose.shape == (6,)
    assert prepared.waveform.dtype == np.float32 and 2.0 < len(prepared.waveform) / 16000 < 6.0
    assert prepared.num_frames == num_frames(len(prepared.waveform)) and prepared.pose_frames is None


@pytest.mark.parametrize("case, status, message", [
    ("empty portrait", 400, "portrait upload 'p.png' is empty"),
    ("not an image", 422, "portrait upload: cannot read the image p.png"),
    ("no face", 422, "no face found"),
    ("not audio", 422, "audio upload: cannot decode audio from s.wav"),
    ("too long", 422, "limit is 1 s"),
    ("too large", 413, "larger than the limit"),
])
def test_prepare_render_rejects_bad_uploads(case, status, message, astronaut_png, speech_wav, tmp_path):
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 200, np.uint8))
    portrait, audio, limits = astronaut_png.read_bytes(), speech_wav.read_bytes(), ServeLimits()
    if case == "empty portrait":
        portrait = b""
    elif case == "not an image":
        portrait = b"this is plain text, not a picture"
    elif case == "no face":
        portrait = blank.read_bytes()
    elif case == "not audio":
        audio = b"\x00\x01garbage" * 100
    elif case == "too long":
        limits = ServeLimits(max_audio_seconds=1)
    elif case == "too large":
        limits = ServeLimits(max_upload_bytes=1000)
    with pytest.raises(RequestError) as info:
        prepare_render(RenderPipeline(), _upload("portrait", portrait, "p.png"), _upload("audio", audio, "s.wav"),
                       None, resolution=64, limits=limits)
    assert error_status(info.value) == status
    assert message in str(info.value)
    assert "dawn-upload-" not in str(info.value)  # names the upload, not a temporary path


# ---- job table ---------------------------------------------------------------------------------------

def test_job_table_admission_and_records(tmp_path):
    limits = ServeLimits(max_active_renders=1, max_queued_renders=1, retry_after_s=9)
    table = JobTable(tmp_path, limits)
    first, second = table.submit(RenderOptions(seed=1)), table.submit(RenderOptions(seed=2))
    with pytest.raises(ServiceBusy) as info:
        table.submit(RenderOptions())
    assert info.value.retry_after_s == 9 and error_status(info.value) == 503
    assert table.counts() == {"queued": 2, "running": 0, "done": 0, "failed": 0}

    table.update(first.id, status="running", stage="sampling", progress=0.25)
    with pytest.raises(RequestError) as info:
        table.video_path(first.id)
    assert error_status(info.value) == 409 and "running" in str(info.value)
    table.update(first.id, status="done", frames=12)
    table.update(second.id, status="failed", error="no face found in x")
    table.submit(RenderOptions())  # finished renders free their slots

    # terminal records are on disk: a new table (a restarted ingress) still answers
    again = JobTable(tmp_path, limits)
    done = again.get(first.id)
    assert (done.status, done.progress, done.frames, done.seed) == ("done", 1.0, 12, 1)
    assert again.video_path(first.id) == tmp_path / f"{first.id}.mp4"
    assert json.loads((tmp_path / f"{second.id}.json").read_text())["error"] == "no face found in x"
    with pytest.raises(RequestError) as info:
        again.video_path(second.id)
    assert error_status(info.value) == 409
    for unknown in ("0" * 32, "../../etc/passwd", ""):
        with pytest.raises(RequestError) as info:
            again.get(unknown)
        assert error_status(info.value) == 404


def test_retry_after_follows_measured_render_time(tmp_path):
    table = JobTable(tmp_path, ServeLimits(max_active_renders=2, max_queued_renders=0))
    job = table.submit(RenderOptions())
    table.update(job.id, status="running")
    table._jobs[job.id].started -= 29.0  # it ran for 29 s (and a few microseconds)
    table.update(job.id, status="done")
    assert table.retry_after() == 15  # ceil(29 s x (nobody waiting + this one) / 2 slots)
    for _ in range(2):
        table.submit(RenderOptions())
    assert table.retry_after() == 44  # ceil(29 s x (2 waiting + this one) / 2 slots)


# ---- the service, with in-process stages ----------------------------------------------------------------

class FakeStages:
    """RenderStages that make grey frames (no models): checks the service's sequence and bookkeeping."""

    def __init__(self, fail_at: str | None = None):
        self.fail_at, self.calls = fail_at, []

    async def resolution(self):
        return 64

    async def prepare(self, portrait, audio, pose_video, resolution, limits):
        self.calls.append("prepare")
        from dawn.serving import PreparedRender

        if not portrait.data:
            raise RequestError("portrait upload is empty")
        portrait = Portrait(image=np.zeros((resolution, resolution, 3), np.uint8), pose=np.zeros(6, np.float32),
                            eyes=np.zeros(2, np.float32), face_box=np.zeros(6, np.float32))
        return PreparedRender(portrait, np.zeros(16000, np.float32), None)

    async def audio_features(self, waveform):
        self.calls.append("features")
        await asyncio.sleep(0.05)
        return np.zeros((len(waveform) * 25 // 16000, 1024), np.float32)

    async def sample_motion(self, portrait, hubert, seed):
        self.calls.append("motion")
        if self.fail_at == "motion":
            raise DawnError("PBNet needs at least 4 frames")
        return Motion(pose=np.zeros((len(hubert), 6), np.float32), eyes=np.zeros((len(hubert), 2), np.float32))

    async def motion_from_video(self, frames, num_frames):
        raise AssertionError("no pose video was sent")

    async def render_frames(self, request):
        self.calls.append("frames")
        if self.fail_at == "frames":
            raise ZeroDivisionError("a bug")
        return np.full((len(request.hubert), 64, 64, 3), 128, np.uint8)


def test_service_renders_in_the_background(tmp_path):
    from dawn.video import probe

    async def scenario():
        service = RenderService(FakeStages(), tmp_path, ServeLimits(max_active_renders=1, max_queued_renders=1))
        jobs = [await service.submit(Upload("portrait", "p.png", b"x"), Upload("audio", "a.wav", b"y"), seed=3)
                for _ in range(2)]
        assert all(service.status(j.id).status in ("queued", "running") for j in jobs)
        with pytest.raises(ServiceBusy):
            await service.submit(Upload("portrait", "p.png", b"x"), Upload("audio", "a.wav", b"y"))
        await service.wait_idle()
        return service, jobs

    service, jobs = asyncio.run(scenario())
    for job in jobs:
        record = service.status(job.id)
        assert (record.status, record.stage, record.frames, record.seed) == ("done", "done", 25, 3)
        info = probe(service.video_path(job.id))
        assert info["frames"] == 25 and info["has_audio"] and info["video_codec"] == "h264"
    assert service.health()["renders"]["done"] == 2
    assert not list(tmp_path.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("fail_at, message", [("motion", "PBNet needs at least 4 frames"),
                                              ("frames", "internal error (ZeroDivisionError): a bug")])
def test_service_records_failures(fail_at, message, tmp_path):
    async def scenario():
        service = RenderService(FakeStages(fail_at), tmp_path)
        job = await service.submit(Upload("portrait", "p.png", b"x"), Upload("audio", "a.wav", b"y"))
        await service.wait_idle()
        return service.status(job.id)

    record = asyncio.run(scenario())
    assert record.status == "failed" and record.error == message
    assert not list(tmp_path.glob("*.mp4"))


def test_service_rejects_before_admitting(tmp_path):
    async def scenario():
        service = RenderService(FakeStages(), tmp_path)
        with pytest.raises(RequestError, match="empty"):
            await service.submit(Upload("portrait", "p.png", b""), Upload("audio", "a.wav", b"y"))
        with pytest.raises(RequestError, match="steps"):
            await service.submit(Upload("portrait", "p.png", b"x"), Upload("audio", "a.wav", b"y"), steps=0)
        return service

    service = asyncio.run(scenario())
    assert service.health()["renders"] == {"queued": 0, "running": 0, "done": 0, "failed": 0}


# ---- A2V-FDM batching --------------------------------------------------------------------------------

class RecordingPipeline:
    """sample_flows_batch / decode_frames that record the batches they get; length 13 fails."""

    def __init__(self):
        self.batches = []

    def sample_flows_batch(self, portraits, huberts, motions, options, seeds):
        self.batches.append((len(huberts[0]), list(seeds)))
        if len(huberts[0]) == 13:
            raise DawnError("13 frames are unlucky")
        return np.stack([np.full((3, len(huberts[0]), 4, 4), s, np.float32) for s in seeds])

    def decode_frames(self, portrait, flows, batch_size):
        return flows[0, 0]  # (T, 4, 4): the seed, so the test sees which request it belongs to


def _frames_request(frames, seed, steps=5):
    portrait = Portrait(image=np.zeros((64, 64, 3), np.uint8), pose=np.zeros(6), eyes=np.zeros(2), face_box=np.zeros(6))
    motion = Motion(pose=np.zeros((frames, 6)), eyes=np.zeros((frames, 2)))
    return FramesRequest(portrait, np.zeros((frames, 1024), np.float32), motion, RenderOptions(steps=steps, seed=seed))


def test_render_frames_batched_groups_by_shape_and_isolates_failures():
    pipeline = RecordingPipeline()
    requests = [_frames_request(10, 1), _frames_request(12, 2), _frames_request(10, 3), _frames_request(13, 4),
                _frames_request(10, 5, steps=9), _frames_request(10, 6)]
    results = render_frames_batched(pipeline, requests, max_batch=2)
    assert pipeline.batches == [(10, [1, 3]), (10, [6]), (12, [2]), (13, [4]), (10, [5])]
    for request, result in zip(requests, results):
        if len(request.hubert) == 13:
            assert isinstance(result, DawnError)
        else:
            assert result.shape == (len(request.hubert), 4, 4) and (result == request.options.seed).all()


def test_sample_flows_batch_matches_single_renders():
    """A render's flows do not depend on what it is batched with (its own seeded noise)."""
    import torch

    from dawn.render import build_models

    models = build_models("tiny")
    pipeline = RenderPipeline(lfg=models["lfg"], a2v=models["a2v"])
    rng = np.random.default_rng(0)
    s = pipeline.resolution
    portraits = [Portrait(image=rng.integers(0, 255, (s, s, 3), dtype=np.uint8), pose=rng.normal(size=6).astype(np.float32),
                          eyes=rng.random(2).astype(np.float32), face_box=np.float32([10, 50, 12, 52, s, s]))
                 for _ in range(2)]
    huberts = [rng.normal(size=(4, 1024)).astype(np.float32) for _ in range(2)]
    motions = [Motion(pose=rng.normal(size=(4, 6)).astype(np.float32), eyes=rng.random((4, 2)).astype(np.float32))
               for _ in range(2)]
    options = RenderOptions(steps=2, seed=0)
    batched = pipeline.sample_flows_batch(portraits, huberts, motions, options, seeds=[11, 12])
    assert batched.shape == (2, 3, 4, s // 4, s // 4)
    for k, seed in enumerate((11, 12)):
        single = pipeline.sample_flows(portraits[k], huberts[k], motions[k], RenderOptions(steps=2, seed=seed))
        torch.testing.assert_close(batched[k:k + 1], single, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_serve_config_is_valid_and_embedded_in_the_rayservice():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "serve" / "config.yaml").read_text())
    ServeDeploySchema(**config)
    service = yaml.safe_load((root / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    app = config["applications"][0]
    assert app["import_path"] == "dawn.serve.app:build_app"
    ServeLimits.from_args(app["args"])  # every limit in the config is a valid one
    a2v = next(d for d in app["deployments"] if d["name"] == "A2VFDM")
    assert a2v["ray_actor_options"]["num_gpus"] == 1


def test_dawn_serve_flags_fit_every_replica_on_the_cpus(tmp_path):
    from dawn.cli import build_parser
    from dawn.serve.command import app_args

    args = build_parser().parse_args(["serve", "--checkpoints", str(tmp_path), "--a2v-replicas", "2",
                                      "--max-queued-renders", "3", "--port", "8001"])
    out = app_args(args, cluster_cpus=2.0)
    assert out["checkpoints"] == str(tmp_path) and out["a2v_replicas"] == 2 and out["max_queued_renders"] == 3
    total = sum(out[f"{stage}_cpus"] * out[f"{stage}_replicas"] for stage in ("features", "pbnet", "a2v"))
    assert total + out["ingress_cpus"] == pytest.approx(2.0)
    assert app_args(args, cluster_cpus=64.0)["a2v_cpus"] == 1.0  # at most one CPU each on a big machine
    ServeLimits.from_args(out)


# ---- API keys ----------------------------------------------------------------------------------------------

def test_api_keys_from_file_and_bearer_check(tmp_path):
    from dawn.serving import ApiKeys

    assert ApiKeys().owner(None) is None and not ApiKeys().required  # no keys: open
    path = tmp_path / "keys.txt"
    path.write_text("# one key per line\nalpha-key\n\nbeta-key\n")
    keys = ApiKeys.from_file(path)
    assert keys.required
    alpha, beta = keys.owner("Bearer alpha-key"), keys.owner("bearer beta-key")
    assert alpha and beta and alpha != beta and "alpha-key" not in alpha
    for header in (None, "", "Bearer", "Bearer wrong", "Basic alpha-key", "alpha-key"):
        with pytest.raises(RequestError) as error:
            keys.owner(header)
        assert error.value.status_code == 401 and "alpha" not in str(error.value)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DawnError, match="holds no key"):
        ApiKeys.from_file(tmp_path / "empty.txt")
    with pytest.raises(DawnError, match="cannot read the API key file"):
        ApiKeys.from_file(tmp_path / "missing.txt")


def test_a_render_is_visible_only_to_its_key(tmp_path):
    async def scenario():
        service = RenderService(FakeStages(), tmp_path, ServeLimits())
        job = await service.submit(Upload("portrait", "p.png", b"x"), Upload("audio", "a.wav", b"y"), owner="alice")
        await service.wait_idle()
        return service, job

    service, job = asyncio.run(scenario())
    assert service.status(job.id, "alice").status == "done"
    assert "owner" not in service.status(job.id, "alice").public()
    assert service.video_path(job.id, "alice").is_file()
    for other in ("bob", None):
        with pytest.raises(RequestError) as error:
            service.status(job.id, other)
        assert error.value.status_code == 404
        with pytest.raises(RequestError):
            service.video_path(job.id, other)
    service.jobs._jobs.clear()  # from the record on disk, as another ingress replica would read it
    assert service.status(job.id, "alice").status == "done"
    with pytest.raises(RequestError):
        service.status(job.id, "bob")
