"""dawn.serving without Ray: limits, request options, upload checks, error mapping, the job table and the
background render sequence (the pipeline's stages run in this process on tiny random checkpoints)."""

import asyncio
import json

import numpy as np
import pytest

from dawn import DawnError
from dawn.pipeline import Motion, OptionError, Portrait, RenderOptions, RenderPipeline, RenderState
from dawn.serving import (InProcessStages, JobTable, RenderService, RequestError, ServeLimits, ServiceBusy,
                          check_decoded, check_upload_size, error_body, error_status, upload)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from dawn.render import init_checkpoints

    return RenderPipeline.from_checkpoints(init_checkpoints(tmp_path_factory.mktemp("ckpt"), preset="tiny"))


@pytest.fixture(scope="module")
def one_second(speech_wav, tmp_path_factory):
    """1 s of real speech as wav bytes (25 frames)."""
    import soundfile

    from dawn.audio import load_audio

    path = tmp_path_factory.mktemp("speech") / "one.wav"
    soundfile.write(str(path), load_audio(speech_wav)[8000:24000], 16000)
    return path.read_bytes()


# ---- limits, options, errors -----------------------------------------------------------------------

def test_limits_from_string_args_and_checks():
    limits = ServeLimits.from_args({"max_queued_renders": "3", "max_audio_seconds": "2.5", "checkpoints": "x"})
    assert limits.max_queued_renders == 3 and limits.max_audio_seconds == 2.5
    with pytest.raises(DawnError, match="max_active_renders"):
        ServeLimits(max_active_renders=0)
    with pytest.raises(DawnError, match="bad serve limit"):
        ServeLimits.from_args({"max_steps": "many"})


def test_request_options_take_the_service_defaults_and_limits():
    limits = ServeLimits(max_steps=50, default_steps=7)
    assert limits.options({}) == RenderOptions(steps=7, seed=0)
    assert limits.options({"seed": 5, "steps": None, "eta": ""}) == RenderOptions(steps=7, seed=5)
    chosen = limits.options({"eta": 0.0, "sampler": "dpm-solver++", "crop": "none"})
    assert (chosen.eta, chosen.sampler, chosen.crop) == (0.0, "dpm-solver++", "none")
    assert ServeLimits(default_eta=0.0).options({}).eta == 0.0
    with pytest.raises(RequestError, match="at most 50") as info:
        limits.options({"steps": 51})
    assert error_status(info.value) == 422
    for fields, message in (({"steps": 0}, "steps must be at least 1, got 0"),
                            ({"eta": 1.5}, "eta must be between 0 and 1, got 1.5"),
                            ({"seed": -1}, "seed must be between 0 and 2**63 - 1, got -1"),
                            ({"sampler": "euler"}, "sampler must be one of ddim, dpm-solver++, got 'euler'")):
        with pytest.raises(OptionError) as info:
            limits.options(fields)
        assert str(info.value) == message and error_status(info.value) == 422
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


# ---- uploads through the inputs stage ----------------------------------------------------------------

def _decode_uploads(pipeline, portrait: bytes, audio: bytes, limits: ServeLimits) -> RenderState:
    """What the service does before it answers 202: sizes checked, the inputs stage, the decoded limits."""
    inputs = {"portrait": upload("portrait", "p.png", portrait), "audio": upload("audio", "s.wav", audio)}
    for media in inputs.values():
        check_upload_size(media, limits)
    state = RenderState.from_bytes(pipeline.run_bytes("inputs", RenderState(inputs=inputs).to_bytes()))
    check_decoded(state, limits)
    return state


def test_uploads_decode_to_a_portrait_crop_and_speech(pipeline, astronaut_png, one_second):
    state = _decode_uploads(pipeline, astronaut_png.read_bytes(), one_second, ServeLimits())
    assert state.portrait.image.shape == (64, 64, 3) and state.portrait.pose.shape == (6,)
    assert state.waveform.dtype == np.float32 and state.num_frames == 25
    assert all(media.data is None for media in state.inputs.values())  # the bytes do not travel further


@pytest.mark.parametrize("case, status, message", [
    ("empty portrait", 400, "portrait upload 'p.png' is empty"),
    ("not an image", 422, "portrait upload: cannot read the image p.png"),
    ("no face", 422, "no face found"),
    ("not audio", 422, "audio upload: cannot decode audio from s.wav"),
    ("too long", 422, "limit is 0.5 s"),
    ("too large", 413, "larger than the limit"),
])
def test_bad_uploads_are_named(case, status, message, pipeline, astronaut_png, one_second, tmp_path):
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 200, np.uint8))
    portrait, audio, limits = astronaut_png.read_bytes(), one_second, ServeLimits()
    if case == "empty portrait":
        portrait = b""
    elif case == "not an image":
        portrait = b"this is plain text, not a picture"
    elif case == "no face":
        portrait = blank.read_bytes()
    elif case == "not audio":
        audio = b"\x00\x01garbage" * 100
    elif case == "too long":
        limits = ServeLimits(max_audio_seconds=0.5)
    elif case == "too large":
        limits = ServeLimits(max_upload_bytes=1000)
    with pytest.raises(DawnError) as info:
        _decode_uploads(pipeline, portrait, audio, limits)
    assert error_status(info.value) == status
    assert message in str(info.value)
    assert "dawn-input-" not in str(info.value)  # names the upload, not a temporary path


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


# ---- the service, with the stages in this process ------------------------------------------------------

class FailingStages(InProcessStages):
    """The real stages, with one of them failing (as a replica's error would reach the ingress)."""

    def __init__(self, pipeline, fail_at: str, error: Exception):
        super().__init__(pipeline)
        self.fail_at, self.error = fail_at, error

    async def run(self, stage, state):
        if stage == self.fail_at:
            raise self.error
        return await super().run(stage, state)


def _submit(service, portrait, audio, **fields):
    return service.submit(upload("portrait", "p.png", portrait), upload("audio", "a.wav", audio), fields=fields)


def test_service_renders_in_the_background(pipeline, astronaut_png, one_second, tmp_path):
    from dawn.video import probe

    async def scenario():
        limits = ServeLimits(max_active_renders=1, max_queued_renders=1, default_steps=1)
        service = RenderService(InProcessStages(pipeline), tmp_path, limits)
        jobs = [await _submit(service, astronaut_png.read_bytes(), one_second, seed=3) for _ in range(2)]
        assert all(service.status(j.id).status in ("queued", "running") for j in jobs)
        with pytest.raises(ServiceBusy):
            await _submit(service, astronaut_png.read_bytes(), one_second)
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


@pytest.mark.parametrize("fail_at, error, message", [
    ("motion", DawnError("PBNet needs at least 4 frames"), "PBNet needs at least 4 frames"),
    ("frames", ZeroDivisionError("a bug"), "internal error (ZeroDivisionError): a bug")])
def test_service_records_failures(fail_at, error, message, pipeline, astronaut_png, one_second, tmp_path):
    async def scenario():
        service = RenderService(FailingStages(pipeline, fail_at, error), tmp_path, ServeLimits(default_steps=1))
        job = await _submit(service, astronaut_png.read_bytes(), one_second)
        await service.wait_idle()
        return service.status(job.id)

    record = asyncio.run(scenario())
    assert record.status == "failed" and record.error == message
    assert not list(tmp_path.glob("*.mp4"))


def test_service_rejects_before_admitting(pipeline, astronaut_png, one_second, tmp_path):
    async def scenario():
        service = RenderService(InProcessStages(pipeline), tmp_path)
        with pytest.raises(RequestError, match="empty"):
            await _submit(service, b"", one_second)
        with pytest.raises(OptionError, match="steps must be at least 1"):
            await _submit(service, astronaut_png.read_bytes(), one_second, steps=0)
        with pytest.raises(DawnError, match="cannot decode audio"):
            await _submit(service, astronaut_png.read_bytes(), b"noise" * 100)
        return service

    service = asyncio.run(scenario())
    assert service.health()["renders"] == {"queued": 0, "running": 0, "done": 0, "failed": 0}


# ---- A2V-FDM batching --------------------------------------------------------------------------------

def test_frames_stage_batches_by_shape_and_isolates_failures(pipeline, monkeypatch):
    """States of one length and sampler settings share a sampling pass (each with its own seed); a failing
    group fails only its own states."""
    rng = np.random.default_rng(0)
    s = pipeline.resolution

    def state(frames, seed, steps=1):
        portrait = Portrait(image=rng.integers(0, 255, (s, s, 3), dtype=np.uint8), pose=np.zeros(6, np.float32),
                            eyes=np.full(2, 0.3, np.float32), face_box=np.float32([10, 50, 12, 52, s, s]))
        motion = Motion(pose=np.zeros((frames, 6), np.float32), eyes=np.full((frames, 2), 0.3, np.float32))
        return RenderState(options=RenderOptions(steps=steps, seed=seed), portrait=portrait, motion=motion,
                           hubert=rng.normal(size=(frames, 1024)).astype(np.float32))

    batches, sample = [], pipeline.sample_flows_batch

    def recording(portraits, huberts, motions, options, seeds, progress=None):
        batches.append((len(huberts[0]), list(seeds)))
        if len(huberts[0]) == 5:
            raise DawnError("5 frames are unlucky")
        return sample(portraits, huberts, motions, options, seeds, progress)

    monkeypatch.setattr(pipeline, "sample_flows_batch", recording)
    states = [state(4, 1), state(6, 2), state(4, 3), state(5, 4), state(4, 5, steps=2)]
    results = pipeline.run_stage("frames", states)
    assert batches == [(4, [1, 3]), (6, [2]), (5, [4]), (4, [5])]
    assert isinstance(results[3], DawnError) and "unlucky" in str(results[3])
    for k in (0, 1, 2, 4):
        assert results[k].frames.shape == (len(results[k].hubert), s, s, 3)
        assert results[k].timings["frames"] > 0


def test_sample_flows_batch_matches_single_renders():
    """A render's flows do not depend on what it is batched with (its own seeded noise)."""
    import torch

    from dawn.config import build_models

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


def test_a_render_is_visible_only_to_its_key(pipeline, astronaut_png, one_second, tmp_path):
    async def scenario():
        service = RenderService(InProcessStages(pipeline), tmp_path, ServeLimits(default_steps=1))
        job = await service.submit(upload("portrait", "p.png", astronaut_png.read_bytes()),
                                   upload("audio", "a.wav", one_second), owner="alice")
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


def test_the_openapi_document_says_what_the_api_answers():
    """Every status the API returns is documented with one error shape, 2xx bodies are typed, and no form
    field is declared nullable (a multipart form cannot send null)."""
    from dawn.serve.app import api

    spec = api.openapi()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    create = paths["/v1/renders"]["post"]
    assert set(create["responses"]) == {"202", "400", "401", "413", "422", "503"}
    assert set(paths["/v1/renders/{render_id}/video"]["get"]["responses"]) >= {"200", "404", "409"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if code.startswith(("4", "5")):
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
                elif "application/json" in response.get("content", {}):
                    assert "$ref" in schema, (method, path, code)  # a declared model, not "any object"
    assert set(schemas["ErrorBody"]["required"]) == {"error", "status"}
    form = schemas[create["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]]
    assert set(form["required"]) == {"portrait", "audio"}
    for name, field in form["properties"].items():
        assert "anyOf" not in field and field.get("type") != "null", name
    assert {"seed", "steps", "eta", "sampler", "crop", "paste_back", "max_side"} <= set(form["properties"])
