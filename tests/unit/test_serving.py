"""dawn.serving without Ray: limits, request options, upload checks, error mapping, durable render records,
admission, restarts and the background render sequence (the pipeline's stages run in this process on tiny
random checkpoints)."""

import asyncio
import json

import numpy as np
import pytest

from dawn import DawnError
from dawn.pipeline import Motion, OptionError, Portrait, RenderOptions, RenderPipeline, RenderState
from dawn.serving import (InProcessStages, RequestError, ServeLimits, ServiceBusy, StageLost, error_body,
                          error_status, upload)


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
    from dawn.serving import RateLimited

    limited = pickle.loads(pickle.dumps(RateLimited("slow down", 12)))
    assert error_status(limited) == 429 and error_body(limited)[1] == {"Retry-After": "12"}
    lost = pickle.loads(pickle.dumps(StageLost("frames")))
    assert lost.stage == "frames" and "frames" in str(lost)


# ---- uploads: checked by their first bytes before a render is admitted --------------------------------

def _wav_bytes(seconds: float) -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * 16000), np.float32), 16000, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("case, status, message", [
    ("empty portrait", 422, "portrait upload 'p.png' is empty"),
    ("not an image", 422, "portrait upload: cannot read the image p.png"),
    ("not audio", 422, "audio upload 's.wav' is not an audio file dawn reads (WAV, AVI, AIFF, FLAC"),
    ("wav without chunks", 422, "audio upload 's.wav' is not a readable WAV file"),
    ("truncated wav", 422, "audio upload 's.wav' is truncated: its header declares 2000000000 bytes"),
    ("too long", 422, "audio upload 's.wav' is 1.0 s long; the limit is 0.5 s"),
    ("too large", 413, "larger than the limit of 1000 bytes"),
    ("pose video is audio", 422, "pose_video upload 'd.mp4' is not a video file dawn reads"),
])
def test_bad_uploads_are_named(case, status, message, astronaut_png, one_second):
    from dawn.serving import check_upload

    portrait, audio, pose, limits = astronaut_png.read_bytes(), one_second, None, ServeLimits()
    if case == "empty portrait":
        portrait = b""
    elif case == "not an image":
        portrait = b"GIF89a but not really a picture"
    elif case == "not audio":
        audio = b"\x00\x01garbage" * 100
    elif case == "wav without chunks":
        audio = b"RIFF\x00\x00\x00\x00WAVEjunk" * 50
    elif case == "truncated wav":  # a header claiming 2 GB, 0.1 s of samples behind it
        head = _wav_bytes(0.1)
        audio = head[:40] + (2_000_000_000).to_bytes(4, "little") + head[44:]
    elif case == "too long":
        limits = ServeLimits(max_audio_seconds=0.5)
    elif case == "too large":
        limits = ServeLimits(max_upload_bytes=1000)
    elif case == "pose video is audio":
        pose = one_second
    uploads = [upload("portrait", "p.png", portrait), upload("audio", "s.wav", audio)]
    if pose is not None:
        uploads.append(upload("pose_video", "d.mp4", pose))
    with pytest.raises(DawnError) as info:
        for media in uploads:
            check_upload(media, limits)
    assert error_status(info.value) == status
    assert message in str(info.value)


def test_good_uploads_pass_the_checks(astronaut_png, one_second, speech_wav, tmp_path):
    import av

    from dawn.audio import wav_seconds
    from dawn.serving import check_upload

    check_upload(upload("portrait", "p.png", astronaut_png.read_bytes()), ServeLimits())
    assert wav_seconds(one_second, len(one_second), "x") == pytest.approx(1.0)
    flac, m4a = tmp_path / "s.flac", tmp_path / "s.m4a"
    import soundfile

    soundfile.write(str(flac), np.zeros(16000, np.float32), 16000)
    with av.open(str(m4a), "w") as container:  # speech in an mp4 container (AAC)
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    for path in (speech_wav, flac, m4a):
        check_upload(upload("audio", path.name, path.read_bytes()), ServeLimits())
    check_upload(upload("pose_video", "d.mp4", m4a.read_bytes()), ServeLimits())


# ---- the queue and the store, with the stages in this process ------------------------------------------

class ScriptedStages(InProcessStages):
    """The real stages, but a stage may wait for `release` first, or fail the first `times` calls."""

    def __init__(self, pipeline, hold_at=None, fail_at=None, error=None, times=99):
        super().__init__(pipeline)
        self.hold_at, self.fail_at, self.error, self.times = hold_at, fail_at, error, times
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def run(self, stage, state):
        self.calls.append(stage)
        if stage == self.hold_at:
            await self.release.wait()
        if stage == self.fail_at and self.times > 0:
            self.times -= 1
            raise self.error
        return await super().run(stage, state)


def _frontend(stages, folder, limits=None):
    from dawn.serving import Frontend, RenderQueue, RenderStore

    limits = limits or ServeLimits(default_steps=1)
    queue = RenderQueue(stages, RenderStore(folder), limits)
    return Frontend(queue, queue.store, stages, limits), queue


def _submit(frontend, portrait, audio, owner=None, **fields):
    return frontend.submit(upload("portrait", "p.png", portrait), upload("audio", "a.wav", audio), fields=fields,
                           owner=owner)


def test_renders_run_in_the_background_with_durable_records(pipeline, astronaut_png, one_second, tmp_path):
    from dawn.video import probe

    async def scenario():
        stages = ScriptedStages(pipeline, hold_at="motion")
        frontend, queue = _frontend(stages, tmp_path, ServeLimits(max_active_renders=1, max_queued_renders=1,
                                                                  default_steps=1, retry_after_s=9))
        await queue.start()
        first = await _submit(frontend, astronaut_png.read_bytes(), one_second, seed=3)
        second = await _submit(frontend, astronaut_png.read_bytes(), one_second, seed=4)
        assert first["status"] == "queued" and (tmp_path / ".inputs" / first["id"] / "audio").is_file()
        with pytest.raises(ServiceBusy) as busy:  # 1 running + 1 queued: full
            await _submit(frontend, astronaut_png.read_bytes(), one_second)
        assert busy.value.retry_after_s == 9 and len(list((tmp_path / ".inputs").iterdir())) == 2
        while frontend.status(first["id"])["stage"] != "motion":
            await asyncio.sleep(0.01)
        assert (frontend.status(first["id"])["status"], frontend.status(second["id"])["status"]) == ("running", "queued")
        with pytest.raises(RequestError) as early:
            frontend.video_path(first["id"])
        assert error_status(early.value) == 409
        stages.release.set()
        await queue.wait_idle()
        return frontend, queue, first["id"], second["id"]

    frontend, queue, first, second = asyncio.run(scenario())
    for render_id, seed in ((first, 3), (second, 4)):
        record = frontend.status(render_id)
        assert (record["status"], record["stage"], record["frames"], record["seed"]) == ("done", "done", 25, seed)
        info = probe(frontend.video_path(render_id))
        assert info["frames"] == 25 and info["has_audio"] and info["video_codec"] == "h264"
    assert json.loads((tmp_path / f"{first}.json").read_text())["status"] == "done"  # what every replica reads
    assert not list((tmp_path / ".inputs").iterdir())  # uploads removed once the render ended
    assert not [p for p in tmp_path.glob(".*") if p.name != ".inputs"]  # no temporary files left
    for unknown in ("0" * 32, "../../etc/passwd", ""):
        with pytest.raises(RequestError) as info:
            frontend.status(unknown)
        assert error_status(info.value) == 404


def test_a_restart_resumes_unfinished_renders_once(pipeline, astronaut_png, one_second, tmp_path):
    """A queue that stops in the middle of a render: a new queue on the same store starts it again; a render
    already started twice, or whose uploads are gone, ends failed with a reason."""
    from dawn.serving import RenderStore

    async def interrupted():
        stages = ScriptedStages(pipeline, hold_at="frames")
        frontend, queue = _frontend(stages, tmp_path)
        await queue.start()
        ids = [(await _submit(frontend, astronaut_png.read_bytes(), one_second))["id"] for _ in range(3)]
        while frontend.status(ids[0])["stage"] != "frames":
            await asyncio.sleep(0.01)
        for task in list(queue._tasks):  # the process dies: nothing more is written
            task.cancel()
        return ids

    ids = asyncio.run(interrupted())
    store = RenderStore(tmp_path)
    assert store.read(ids[0]).status == "running"
    twice = store.read(ids[1])
    twice.status, twice.attempts = "running", 2
    store.write(twice)
    store.drop_inputs(ids[2])

    async def restarted():
        frontend, queue = _frontend(InProcessStages(pipeline), tmp_path)
        await queue.start()
        await queue.wait_idle()
        return frontend

    frontend = asyncio.run(restarted())
    resumed, failed, lost = (frontend.status(i) for i in ids)
    assert resumed["status"] == "done" and resumed["frames"] == 25
    assert failed["status"] == "failed" and "already been started twice" in failed["error"]
    assert lost["status"] == "failed" and "uploads are gone" in lost["error"]


@pytest.mark.parametrize("fail_at, error, times, status, message", [
    ("frames", StageLost("frames"), 1, "done", None),
    ("frames", StageLost("frames"), 2, "failed", "the worker running the frames stage stopped twice during this "
                                                 "render; submit it again"),
    ("motion", DawnError("PBNet needs at least 4 frames"), 1, "failed", "PBNet needs at least 4 frames"),
    ("frames", ZeroDivisionError("secret detail at 0x7f"), 1, "failed",
     "internal error in the frames stage; the service's log has the details")])
def test_failures_are_retried_once_or_recorded_plainly(fail_at, error, times, status, message, pipeline,
                                                       astronaut_png, one_second, tmp_path):
    async def scenario():
        stages = ScriptedStages(pipeline, fail_at=fail_at, error=error, times=times)
        frontend, queue = _frontend(stages, tmp_path)
        await queue.start()
        render = await _submit(frontend, astronaut_png.read_bytes(), one_second)
        await queue.wait_idle()
        return frontend.status(render["id"])

    record = asyncio.run(scenario())
    assert record["status"] == status and record["error"] == message


def test_decoding_problems_end_the_render_with_the_reason(pipeline, astronaut_png, one_second, tmp_path):
    import cv2

    blank = cv2.imencode(".png", np.full((256, 256, 3), 200, np.uint8))[1].tobytes()

    async def scenario():
        frontend, queue = _frontend(InProcessStages(pipeline), tmp_path)
        await queue.start()
        render = await _submit(frontend, blank, one_second)
        await queue.wait_idle()
        with pytest.raises(RequestError, match="empty"):
            await _submit(frontend, b"", one_second)
        with pytest.raises(OptionError, match="steps must be at least 1"):
            await _submit(frontend, astronaut_png.read_bytes(), one_second, steps=0)
        return frontend.status(render["id"]), await queue.health()

    record, health = asyncio.run(scenario())
    assert record["status"] == "failed" and "no face found" in record["error"] and record["stage"] == "inputs"
    assert health["renders"] == {"queued": 0, "running": 0, "done": 0, "failed": 1}  # refusals leave no record


def test_rate_limit_per_key_and_paged_list(tmp_path):
    from dawn.serving import RateLimited, RenderQueue, RenderStore

    async def scenario():
        stages = ScriptedStages(None, hold_at="inputs")  # renders wait: only admission and listing matter
        queue = RenderQueue(stages, RenderStore(tmp_path), ServeLimits(renders_per_minute=3, max_queued_renders=50))
        ids = []
        for k in range(3):
            ids.append((await queue.submit(f"{k:032x}", RenderOptions(seed=k), owner="alice"))["id"])
            queue.records[ids[-1]].created += k  # distinct creation times
        with pytest.raises(RateLimited) as limited:
            await queue.submit("f" * 32, RenderOptions(), owner="alice")
        await queue.submit("e" * 32, RenderOptions(), owner="bob")  # another key has its own budget
        first = await queue.list("alice", limit=2)
        second = await queue.list("alice", limit=2, after=first["next"])
        for task in queue._tasks:
            task.cancel()
        return limited.value, ids, first, second, await queue.list("bob")

    limited, ids, first, second, bob = asyncio.run(scenario())
    assert error_status(limited) == 429 and 1 <= limited.retry_after_s <= 60
    assert "limit is 3" in str(limited) and error_body(limited)[1]["Retry-After"] == str(limited.retry_after_s)
    assert [r["id"] for r in first["renders"]] == [ids[2], ids[1]] and first["next"] == ids[1]
    assert [r["id"] for r in second["renders"]] == [ids[0]] and second["next"] is None
    assert [r["id"] for r in bob["renders"]] == ["e" * 32]
    assert "owner" not in first["renders"][0]


def test_retry_after_follows_measured_render_time(tmp_path):
    from dawn.serving import RenderQueue, RenderRecord, RenderStore

    queue = RenderQueue(None, RenderStore(tmp_path), ServeLimits(max_active_renders=2, max_queued_renders=0))
    queue._durations.append(29.0)  # one render took 29 s
    assert queue.retry_after() == 15  # ceil(29 s x (nobody waiting + this one) / 2 slots)
    for k in range(2):
        queue.records[f"{k:032x}"] = RenderRecord(id=f"{k:032x}")
        queue._active.add(f"{k:032x}")
    assert queue.retry_after() == 44  # ceil(29 s x (2 waiting + this one) / 2 slots)


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
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["http_options"]["host"] == "127.0.0.1"  # not exposed unless told so
    assert embedded["http_options"]["host"] == "0.0.0.0"  # the Kubernetes Service reaches the pod
    assert embedded["applications"][0]["args"].pop("api_key_file") == "/etc/dawn/api-keys/keys"  # the Secret
    embedded["http_options"]["host"] = "127.0.0.1"
    assert embedded == config
    app = config["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["DawnAPI"]["num_replicas"] == 2 and deployments["Renders"]["num_replicas"] == 1
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
    assert total + out["ingress_cpus"] * out["ingress_replicas"] + out["queue_cpus"] == pytest.approx(2.0)
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
    from dawn.serving import RenderStore

    async def scenario():
        frontend, queue = _frontend(InProcessStages(pipeline), tmp_path)
        await queue.start()
        render = await _submit(frontend, astronaut_png.read_bytes(), one_second, owner="alice")
        await queue.wait_idle()
        return frontend, render["id"]

    frontend, render_id = asyncio.run(scenario())
    assert frontend.status(render_id, "alice")["status"] == "done" and "owner" not in frontend.status(render_id, "alice")
    assert frontend.video_path(render_id, "alice").is_file()
    for other in ("bob", None):
        with pytest.raises(RequestError) as error:
            frontend.status(render_id, other)
        assert error.value.status_code == 404
        with pytest.raises(RequestError):
            frontend.video_path(render_id, other)
    another_replica = RenderStore(tmp_path)  # what a second ingress replica reads
    assert another_replica.read(render_id, "alice").status == "done"


def test_the_openapi_document_says_what_the_api_answers():
    """Every status the API returns is documented with one error shape, 2xx bodies are typed, and no form
    field is declared nullable (a multipart form cannot send null)."""
    from dawn.serve.app import api

    spec = api.openapi()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    create = paths["/v1/renders"]["post"]
    assert set(create["responses"]) == {"202", "400", "401", "413", "422", "429", "503"}
    assert create["responses"]["503"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}
    assert set(paths["/v1/renders"]["get"]["responses"]) == {"200", "401", "422", "503"}
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
