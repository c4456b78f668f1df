"""The render service behind the HTTP API, without Ray: limits, API keys, upload checks, the job table and
the render sequence (`dawn serve` itself is dawn/serve/command.py).

The Serve app (dawn/serve/app.py) is a thin layer over this module: its deployments hold `RenderPipeline`s and
run the stages of dawn.pipeline; its ingress holds one `RenderService`, which checks the options and the
uploads, admits or refuses renders (503 + Retry-After when the queue is full), runs the `inputs` stage before
answering (so bad media is a 4xx), the other stages in the background through a `RenderStages` object (the
deployment handles; states cross as `RenderState.to_bytes()`), and writes the mp4 and a status JSON
atomically to the output directory:

    POST /v1/renders     -> RenderService.submit   (202 + render id; 4xx for bad input; 503 when full)
    GET  /v1/renders/ID  -> RenderService.status   (queued / running / done / failed, progress, error)
    GET  .../ID/video    -> RenderService.video_path  (404 unknown id, 409 not done)

Every user-caused problem is a `DawnError`; `error_status` / `error_body` turn one into an HTTP status and
a JSON body naming the problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from dawn import DawnError
from dawn.config import SAMPLE_RATE
from dawn.pipeline import SAMPLERS, STAGES, Media, RenderOptions, RenderState, write_video

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "done", "failed")
RENDER_ID = re.compile(r"^[0-9a-f]{32}$")


# ----------------------------------------------------------------------------------------------------
# Errors with an HTTP status

class RequestError(DawnError):
    """A user-caused problem with an explicit HTTP status (a plain DawnError maps to 422)."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code

    def __reduce__(self):  # keep the status when the error crosses processes (a replica -> the ingress)
        return type(self), (str(self), self.status_code)


class ServiceBusy(RequestError):
    """The render queue is full: 503 with a Retry-After hint in seconds."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s)


def error_status(error: BaseException) -> int:
    """HTTP status for an error: RequestError's own, 422 for any other DawnError. A Ray task error that
    wraps a DawnError (raised in another replica) is unwrapped through its `.cause`."""
    error = getattr(error, "cause", None) or error
    if isinstance(error, RequestError):
        return error.status_code
    return 422


def error_body(error: BaseException) -> tuple[dict, dict]:
    """(JSON body, extra headers) for an error: {"error": message}; Retry-After for ServiceBusy."""
    error = getattr(error, "cause", None) or error
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, ServiceBusy) else {}
    return {"error": str(error), "status": error_status(error)}, headers


# ----------------------------------------------------------------------------------------------------
# API keys

class ApiKeys:
    """Bearer keys of the HTTP API (one per line of a key file; blank lines and lines starting with # are
    skipped). No keys: the API is open. Keys are compared in constant time and never logged; a render belongs
    to the key that made it, recorded as an opaque owner id (a hash of the key), never the key itself."""

    def __init__(self, keys: list[str] | None = None):
        self._keys = [k.encode() for k in (keys or [])]

    @classmethod
    def from_file(cls, path: str | Path | None) -> "ApiKeys":
        if not path:
            return cls()
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise DawnError(f"cannot read the API key file {path}: {e.strerror}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise DawnError(f"the API key file {path} holds no key")
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id for an `Authorization` header value; None when no keys are configured. RequestError 401
        for a missing or unknown key."""
        if not self._keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode()
        # every key is compared (constant time each), so the time taken does not tell which one matched
        matched = [hmac.compare_digest(presented, key) for key in self._keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise RequestError("a valid API key is required (header Authorization: Bearer <key>)", 401)
        return hashlib.sha256(b"dawn-owner:" + presented).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------
# Limits and request options

@dataclass
class ServeLimits:
    max_upload_bytes: int = 20 * 2**20  # per uploaded file
    max_audio_seconds: float = 60.0  # longer speech is refused (422)
    max_active_renders: int = 4  # renders in the pipeline at once (the rest wait, status "queued")
    max_queued_renders: int = 16  # waiting renders; one more is refused with 503 + Retry-After
    max_steps: int = 100  # sampling steps a request may ask for
    max_output_side: int = 1920  # paste-back videos: the longer side a request may ask for
    default_steps: int = 20
    default_eta: float = 1.0  # DDIM eta of requests that name none (1: the reference's stochastic DDIM)
    default_sampler: str = "ddim"
    retry_after_s: int = 10  # Retry-After before any render has finished (later: from measured durations)

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_active_renders", "max_steps", "default_steps", "retry_after_s",
                     "max_output_side"):
            if getattr(self, name) < 1:
                raise DawnError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")
        if self.max_queued_renders < 0 or self.max_audio_seconds <= 0:
            raise DawnError("serve limits max_queued_renders must be >= 0 and max_audio_seconds > 0")
        if not 0 <= self.default_eta <= 1 or self.default_sampler not in SAMPLERS:
            raise DawnError(f"serve limits: default_eta must be in [0, 1] and default_sampler one of {SAMPLERS}")

    def options(self, fields: dict) -> RenderOptions:
        """A request's RenderOptions from its form fields (those absent take the limits' defaults);
        OptionError names a bad value, RequestError steps above max_steps."""
        base = RenderOptions(steps=self.default_steps, eta=self.default_eta, sampler=self.default_sampler)
        options = RenderOptions.from_fields(fields, base=base)
        if options.steps > self.max_steps:
            raise RequestError(f"steps must be at most {self.max_steps} here, got {options.steps}", 422)
        if "max_side" not in fields or fields["max_side"] in (None, ""):
            options = dataclasses.replace(options, max_side=min(options.max_side, self.max_output_side))
        elif options.max_side > self.max_output_side:
            raise RequestError(f"max_side must be at most {self.max_output_side} here, got {options.max_side}", 422)
        return options

    @classmethod
    def from_args(cls, args: dict) -> "ServeLimits":
        """Limits from string/number arguments (serve config `args`, CLI); unknown keys are ignored."""
        types = {f: type(v) for f, v in asdict(cls()).items()}
        try:
            return cls(**{k: types[k](v) for k, v in args.items() if k in types})
        except ValueError as e:
            raise DawnError(f"bad serve limit: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Uploads

def upload(role: str, filename: str | None, data: bytes) -> Media:
    """An uploaded file as a render input."""
    return Media(role=role, name=filename or role, data=data)


def check_upload_size(media: Media, limits: ServeLimits) -> None:
    if not media.data:
        raise RequestError(f"{media.role} upload {media.name!r} is empty")
    if len(media.data) > limits.max_upload_bytes:
        raise RequestError(f"{media.role} upload {media.name!r} is larger than the limit of "
                           f"{limits.max_upload_bytes} bytes", 413)


def check_decoded(state: RenderState, limits: ServeLimits) -> None:
    """The limits on decoded inputs: speech no longer than max_audio_seconds."""
    seconds = len(state.waveform) / SAMPLE_RATE
    if seconds > limits.max_audio_seconds:
        raise RequestError(f"audio upload {state.inputs['audio'].name!r} is {seconds:.1f} s long; the limit is "
                           f"{limits.max_audio_seconds:g} s", 422)


def locate_face(portrait: Media, limits: ServeLimits) -> dict:
    """Where the render's crop lies in an uploaded portrait (for the web page's preview): the crop box
    (x0, y0, x1, y1) in the image's pixels, the image size and the number of faces. RequestError (4xx) when
    the upload is not an image or holds no face."""
    from dawn.face import analyze_portrait, load_image

    check_upload_size(portrait, limits)
    image = portrait.decode(load_image, "image")
    try:
        analysis = analyze_portrait(image, size=64, crop="face", name=f"portrait {portrait.name!r}")
    except DawnError as e:
        raise RequestError(f"portrait upload: {e}", 422) from None
    height, width = image.shape[:2]
    return {"crop_box": [int(v) for v in analysis.crop_box], "width": int(width), "height": int(height),
            "faces": int(analysis.num_faces)}


# ----------------------------------------------------------------------------------------------------
# Job table

@dataclass
class RenderJob:
    id: str
    status: str = "queued"
    stage: str = "queued"
    progress: float = 0.0
    error: str | None = None
    frames: int | None = None
    seed: int = 0
    steps: int = 20
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    owner: str | None = None  # the API key's owner id; not shown to clients

    def to_dict(self) -> dict:
        return asdict(self)

    def public(self) -> dict:
        """The record as the API shows it."""
        out = asdict(self)
        del out["owner"]
        return out


class JobTable:
    """Render records in memory, terminal ones also as `<id>.json` next to `<id>.mp4` in the output
    directory (so a restarted ingress, or another ingress replica on a shared volume, still answers).
    Thread-safe; admission (queued count vs max_queued_renders) happens here."""

    def __init__(self, output_dir: str | Path, limits: ServeLimits, keep_in_memory: int = 10000):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.keep_in_memory = keep_in_memory
        self._jobs: dict[str, RenderJob] = {}
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=20)

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for job in self._jobs.values():
                counts[job.status] += 1
            return counts

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: mean recent render time x waiting renders / slots."""
        with self._lock:
            if not self._durations:
                return self.limits.retry_after_s
            waiting = sum(j.status == "queued" for j in self._jobs.values()) + 1
            estimate = sum(self._durations) / len(self._durations) * waiting / self.limits.max_active_renders
        return int(min(600, max(1, math.ceil(estimate))))

    def check_capacity(self) -> None:
        """Raise ServiceBusy when no render can be admitted (queued + running at the limit)."""
        counts = self.counts()
        capacity = self.limits.max_active_renders + self.limits.max_queued_renders
        if counts["queued"] + counts["running"] >= capacity:
            raise ServiceBusy(f"the render queue is full ({counts['running']} running, {counts['queued']} "
                              f"queued); retry later", self.retry_after())

    def submit(self, options: RenderOptions, owner: str | None = None) -> RenderJob:
        """Admit a new render (status queued) or raise ServiceBusy."""
        self.check_capacity()
        job = RenderJob(id=uuid.uuid4().hex, seed=options.seed, steps=options.steps, owner=owner)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        return job

    def update(self, render_id: str, **changes) -> RenderJob:
        with self._lock:
            job = self._jobs[render_id]
            for key, value in changes.items():
                setattr(job, key, value)
            if changes.get("status") == "running" and job.started is None:
                job.started = time.time()
            if job.status in ("done", "failed"):
                job.finished = time.time()
                if job.status == "done":
                    job.progress = 1.0
                    self._durations.append(job.finished - (job.started or job.created))
            record = RenderJob(**job.to_dict())
        if record.status in ("done", "failed"):
            self._write_record(record)
        return record

    def get(self, render_id: str, owner: str | None = None) -> RenderJob:
        """The record of a render (memory, then the output directory), or RequestError 404 (also for a render
        of another owner)."""
        if not RENDER_ID.match(render_id or ""):
            raise RequestError(f"unknown render id {render_id!r}", 404)
        with self._lock:
            job = self._jobs.get(render_id)
            if job is not None and job.owner == owner:
                return RenderJob(**job.to_dict())
        path = self.output_dir / f"{render_id}.json"
        if path.is_file():
            record = RenderJob(**json.loads(path.read_text()))
            if record.owner == owner:
                return record
        raise RequestError(f"unknown render id {render_id!r}", 404)

    def video_path(self, render_id: str, owner: str | None = None) -> Path:
        """The finished mp4 of a render: 404 for an unknown id, 409 while not done (or failed)."""
        job = self.get(render_id, owner)
        if job.status != "done":
            detail = f": {job.error}" if job.error else ""
            raise RequestError(f"render {render_id} is {job.status}{detail}; its video is not available", 409)
        return self.output_dir / f"{render_id}.mp4"

    def _write_record(self, job: RenderJob) -> None:
        from dawn.checkpoint import atomic_write_bytes

        atomic_write_bytes(self.output_dir / f"{job.id}.json",
                           lambda p: Path(p).write_text(json.dumps(job.to_dict())))

    def _forget_old(self) -> None:
        """Keep at most keep_in_memory records: drop the oldest finished ones (their JSON stays on disk)."""
        excess = len(self._jobs) - self.keep_in_memory
        if excess > 0:
            finished = [j.id for j in self._jobs.values() if j.status in ("done", "failed")]
            for render_id in finished[:excess]:
                del self._jobs[render_id]


# ----------------------------------------------------------------------------------------------------
# The service

class RenderStages(Protocol):
    """Where the stages run: Serve deployment handles in dawn/serve/app.py, or anything with these methods.
    `run` takes and returns a `RenderState.to_bytes()`."""

    async def run(self, stage: str, state: bytes) -> bytes: ...
    async def locate_face(self, portrait: Media, limits: ServeLimits) -> dict: ...


class InProcessStages:
    """RenderStages that run every stage in this process on one RenderPipeline holding all the networks
    (a single-process service; the tests). States still cross as bytes, as they do between replicas."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    async def run(self, stage: str, state: bytes) -> bytes:
        return await asyncio.to_thread(self.pipeline.run_bytes, stage, state)

    async def locate_face(self, portrait: Media, limits: ServeLimits) -> dict:
        return await asyncio.to_thread(locate_face, portrait, limits)


# Progress reported when a stage starts (the stages run in other processes, so per-step progress is not
# visible here; the fractions roughly follow where the time goes).
STAGE_PROGRESS = {"inputs": 0.02, "features": 0.05, "motion": 0.15, "frames": 0.25, "writing": 0.9}


class RenderService:
    """Admission, validation and background rendering for the HTTP API (one per ingress replica)."""

    def __init__(self, stages: RenderStages, output_dir: str | Path, limits: ServeLimits | None = None):
        self.stages = stages
        self.limits = limits or ServeLimits()
        self.jobs = JobTable(output_dir, self.limits)
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, portrait: Media, audio: Media, pose_video: Media | None = None,
                     fields: dict | None = None, owner: str | None = None) -> RenderJob:
        """Check and admit a render; it then runs in the background. `fields`: the request's option values
        (RenderOptions.FIELDS). Raises OptionError / RequestError / ServiceBusy."""
        self.jobs.check_capacity()  # refuse early, before decoding anything
        options = self.limits.options(fields or {})
        inputs = {"portrait": portrait, "audio": audio}
        if pose_video is not None:
            inputs["pose_video"] = pose_video
        for media in inputs.values():
            check_upload_size(media, self.limits)
        data = await self.stages.run("inputs", RenderState(options=options, inputs=inputs).to_bytes())
        check_decoded(RenderState.from_bytes(data), self.limits)
        job = self.jobs.submit(options, owner)
        task = asyncio.get_running_loop().create_task(self._run(job.id, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def status(self, render_id: str, owner: str | None = None) -> RenderJob:
        return self.jobs.get(render_id, owner)

    async def locate_face(self, portrait: Media) -> dict:
        return await self.stages.locate_face(portrait, self.limits)

    def video_path(self, render_id: str, owner: str | None = None) -> Path:
        return self.jobs.video_path(render_id, owner)

    def health(self, auth_required: bool = False) -> dict:
        return {"status": "ok", "auth_required": auth_required, "renders": self.jobs.counts(), "limits": asdict(self.limits)}

    async def wait_idle(self) -> None:
        """Wait for every background render started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, render_id: str, data: bytes) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_active_renders)
        async with self._slots:
            try:
                await self._render(render_id, data)
            except Exception as e:  # noqa: BLE001 - every failure ends up in the render's record
                cause = getattr(e, "cause", None) or e
                if isinstance(cause, DawnError):
                    message = str(cause)
                else:
                    log.exception("render %s failed", render_id)
                    message = f"internal error ({type(cause).__name__}): {cause}"
                self.jobs.update(render_id, status="failed", error=message)

    async def _render(self, render_id: str, data: bytes) -> None:
        for stage in STAGES[1:]:  # the inputs stage ran before the render was admitted
            self.jobs.update(render_id, status="running", stage=stage, progress=STAGE_PROGRESS[stage])
            data = await self.stages.run(stage, data)
        self.jobs.update(render_id, status="running", stage="writing", progress=STAGE_PROGRESS["writing"])
        state = RenderState.from_bytes(data)
        # atomic: a temporary file renamed onto the name
        await asyncio.to_thread(write_video, state, self.jobs.output_dir / f"{render_id}.mp4")
        self.jobs.update(render_id, status="done", stage="done", frames=state.num_frames)
