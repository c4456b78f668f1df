"""The render service behind the HTTP API, without Ray: limits, API keys, upload checks, durable render
records, admission and the render sequence (`dawn serve` itself is dawn/serve/command.py).

Three parts, so that any number of ingress replicas can answer for the same renders:

    RenderStore   the output volume: <id>.json (the render's record, rewritten atomically at every change),
                  <id>.mp4, and .inputs/<id>/ (the stored uploads and options until the render ends)
    RenderQueue   one per application: admission (queue limits, per-key rate limit), the render sequence
                  over the stage replicas (`RenderStages`), one retry of a stage whose replica died, and on
                  start-up the records a restart left unfinished (resumed once, or failed with a reason)
    Frontend      one per ingress replica: checks the options and the uploads (size, type, a WAV's declared
                  length), stores them and answers 202 at once; status and video come from the store

    POST /v1/renders        -> Frontend.submit      (202 + id; 4xx for bad input; 429 / 503 + Retry-After)
    GET  /v1/renders        -> Frontend.list        (the caller's renders, newest first, paged)
    GET  /v1/renders/ID     -> Frontend.status      (queued / running / done / failed, progress, error)
    GET  /v1/renders/ID/video -> Frontend.video_path  (404 unknown id, 409 not done)

Every user-caused problem is a `DawnError`; `error_status` / `error_body` turn one into an HTTP status and
a JSON body naming the problem. Problems found while decoding (no face, speech too long) end the render
`failed` with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import re
import shutil
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from dawn import DawnError
from dawn.audio import wav_seconds
from dawn.config import SAMPLE_RATE
from dawn.checkpoint import atomic_write_bytes
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
    """The render queue is full (or restarting): 503 with a Retry-After hint in seconds."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s)


class RateLimited(ServiceBusy):
    """This API key submitted more renders in the last minute than the per-key limit: 429 + Retry-After."""

    status_code = 429


class StageLost(Exception):
    """The replica running a stage died (or could not be reached) before it answered; raised by a
    RenderStages so that the queue can retry the stage once."""

    def __init__(self, stage: str):
        super().__init__(f"the {stage} stage's replica stopped before it answered")
        self.stage = stage

    def __reduce__(self):
        return type(self), (self.stage,)


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
    renders_per_minute: int = 0  # per API key (or per service without keys); 0: no rate limit

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_active_renders", "max_steps", "default_steps", "retry_after_s",
                     "max_output_side"):
            if getattr(self, name) < 1:
                raise DawnError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")
        if self.max_queued_renders < 0 or self.max_audio_seconds <= 0 or self.renders_per_minute < 0:
            raise DawnError("serve limits max_queued_renders and renders_per_minute must be >= 0 and "
                            "max_audio_seconds > 0")
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
# Uploads: checked before a render is admitted by what their first bytes say (no decoding)

def upload(role: str, filename: str | None, data: bytes) -> Media:
    """An uploaded file as a render input."""
    return Media(role=role, name=filename or role, data=data)


def check_upload_size(media: Media, limits: ServeLimits) -> None:
    if not media.data:
        raise RequestError(f"{media.role} upload {media.name!r} is empty", 422)
    if len(media.data) > limits.max_upload_bytes:
        raise RequestError(f"{media.role} upload {media.name!r} is larger than the limit of "
                           f"{limits.max_upload_bytes} bytes", 413)


# Containers the audio decoder (FFmpeg through PyAV) is offered: (what, test on the first 16 bytes).
AUDIO_CONTAINERS = (
    ("WAV", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE"),
    ("AVI", lambda h: h[:4] == b"RIFF" and h[8:12] == b"AVI "),
    ("AIFF", lambda h: h[:4] == b"FORM" and h[8:12] in (b"AIFF", b"AIFC")),
    ("FLAC", lambda h: h[:4] == b"fLaC"),
    ("Ogg", lambda h: h[:4] == b"OggS"),
    ("MP3", lambda h: h[:3] == b"ID3" or (h[0] == 0xFF and h[1] & 0xE0 == 0xE0)),  # also AAC ADTS
    ("MP4/M4A/MOV", lambda h: h[4:8] == b"ftyp"),
    ("WebM/Matroska", lambda h: h[:4] == b"\x1a\x45\xdf\xa3"),
)
VIDEO_CONTAINERS = ("AVI", "MP4/M4A/MOV", "WebM/Matroska")


def check_upload(media: Media, limits: ServeLimits) -> None:
    """Size, then type: a portrait must be an image Pillow can open (its header; dimensions within
    Pillow's decompression-bomb limit), speech a container of AUDIO_CONTAINERS (a WAV also complete and no
    longer than max_audio_seconds), a pose video one of VIDEO_CONTAINERS. A 4xx naming the upload otherwise."""
    check_upload_size(media, limits)
    data = media.data
    if media.role == "portrait":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.size  # noqa: B018 - the header was parsed
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise RequestError(f"portrait upload {media.name!r} is too large an image: {e}", 413) from None
        except Exception:  # noqa: BLE001 - Pillow raises many types for bytes that are no image
            raise RequestError(f"portrait upload: cannot read the image {media.name} (not an image file "
                               f"Pillow can open)", 422) from None
        return
    head = data[:16].ljust(16, b"\0")
    kind = next((what for what, test in AUDIO_CONTAINERS if test(head)), None)
    allowed = VIDEO_CONTAINERS if media.role == "pose_video" else tuple(w for w, _ in AUDIO_CONTAINERS)
    if kind not in allowed:
        what = "a video" if media.role == "pose_video" else "an audio"
        raise RequestError(f"{media.role} upload {media.name!r} is not {what} file dawn reads ({', '.join(allowed)})",
                           422)
    if kind == "WAV":
        seconds = wav_seconds(data[:1 << 16], len(data), f"{media.role} upload {media.name!r}")
        if seconds > limits.max_audio_seconds:
            raise RequestError(f"{media.role} upload {media.name!r} is {seconds:.1f} s long; the limit is "
                               f"{limits.max_audio_seconds:g} s", 422)


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
# Render records on the output volume

@dataclass
class RenderRecord:
    id: str
    status: str = "queued"  # queued | running | done | failed
    stage: str = "queued"
    progress: float = 0.0
    error: str | None = None
    frames: int | None = None
    seed: int = 0
    steps: int = 20
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # times the render was started (a restart in the middle of it starts it again)
    owner: str | None = None  # the API key's owner id; not shown to clients

    @property
    def finished_ok(self) -> bool:
        return self.status in ("done", "failed")

    def public(self) -> dict:
        """The record as the API shows it."""
        out = asdict(self)
        del out["owner"], out["attempts"]
        return out


class RenderStore:
    """Render records, uploads and videos in one directory (a volume every ingress replica mounts):

        <id>.json            the record, replaced atomically at every change (readers never see half of one)
        <id>.mp4             the video, once done
        .inputs/<id>/        request.json (options, file names, owner) and one file per upload, from admission
                             until the render ends

    Plain files need no server and survive any restart; one writer (the RenderQueue) changes records, any
    number of readers read them."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.inputs_root = self.directory / ".inputs"
        self.inputs_root.mkdir(parents=True, exist_ok=True)

    # records
    def write(self, record: RenderRecord) -> None:
        atomic_write_bytes(self.directory / f"{record.id}.json",
                           lambda p: Path(p).write_text(json.dumps(asdict(record))))

    def read(self, render_id: str, owner: str | None = None) -> RenderRecord:
        """The record of a render, or RequestError 404 (also for a render of another owner)."""
        if RENDER_ID.match(render_id or ""):
            try:
                record = RenderRecord(**json.loads((self.directory / f"{render_id}.json").read_text()))
            except (OSError, ValueError, TypeError):
                record = None
            if record is not None and record.owner == owner:
                return record
        raise RequestError(f"unknown render id {render_id!r}", 404)

    def records(self) -> list[RenderRecord]:
        """Every readable record (at start-up of the queue)."""
        out = []
        for path in self.directory.glob("*.json"):
            if RENDER_ID.match(path.stem):
                try:
                    out.append(RenderRecord(**json.loads(path.read_text())))
                except (OSError, ValueError, TypeError):
                    log.warning("skipping the unreadable render record %s", path.name)
        return out

    def video_path(self, render_id: str, owner: str | None = None) -> Path:
        """The finished mp4 of a render: 404 for an unknown id, 409 while not done (or failed)."""
        record = self.read(render_id, owner)
        if record.status != "done":
            detail = f": {record.error}" if record.error else ""
            raise RequestError(f"render {render_id} is {record.status}{detail}; its video is not available", 409)
        return self.directory / f"{render_id}.mp4"

    # uploads
    def save_inputs(self, render_id: str, inputs: dict[str, Media], options: RenderOptions,
                    owner: str | None) -> None:
        folder = self.inputs_root / render_id
        for role, media in inputs.items():
            atomic_write_bytes(folder / role, lambda p, data=media.data: Path(p).write_bytes(data))
        request = {"options": options.to_dict(), "owner": owner,
                   "names": {role: media.name for role, media in inputs.items()}}
        # written last: a folder without request.json is an upload that never completed
        atomic_write_bytes(folder / "request.json", lambda p: Path(p).write_text(json.dumps(request)))

    def load_inputs(self, render_id: str) -> RenderState | None:
        """The render's stored request as the inputs stage takes it; None when the uploads are gone."""
        folder = self.inputs_root / render_id
        try:
            request = json.loads((folder / "request.json").read_text())
            inputs = {role: upload(role, name, (folder / role).read_bytes())
                      for role, name in request["names"].items()}
        except (OSError, ValueError, KeyError):
            return None
        return RenderState(options=RenderOptions(**request["options"]), name=render_id, inputs=inputs)

    def drop_inputs(self, render_id: str) -> None:
        shutil.rmtree(self.inputs_root / render_id, ignore_errors=True)

    def stored_inputs(self) -> list[str]:
        return [p.name for p in self.inputs_root.iterdir() if RENDER_ID.match(p.name)]


# ----------------------------------------------------------------------------------------------------
# The queue: admission and the render sequence (one per application)

class RenderStages(Protocol):
    """Where the stages run: Serve deployment handles in dawn/serve/app.py, or anything with these methods.
    `run` takes and returns a `RenderState.to_bytes()`; it raises StageLost when the stage's replica died."""

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
MAX_ATTEMPTS = 2  # a render interrupted by a restart is started once more, then failed


class RenderQueue:
    """Admission and background rendering for the whole application: exactly one per application (the
    `Renders` deployment of dawn/serve/app.py), so that queue limits and rate limits count every ingress
    replica's submissions. Its state is the RenderStore's; `start()` picks up what a restart left."""

    def __init__(self, stages: RenderStages, store: RenderStore, limits: ServeLimits | None = None):
        self.stages = stages
        self.store = store
        self.limits = limits or ServeLimits()
        self.records: dict[str, RenderRecord] = {}
        self._active: set[str] = set()  # ids of the queued and running renders (what admission counts)
        self._durations: deque[float] = deque(maxlen=20)
        self._submissions: dict[str | None, deque[float]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Load every record; resume the renders a restart interrupted (once), fail the others with a reason;
        remove uploads of submissions that were never admitted."""
        self.records = {r.id: r for r in await asyncio.to_thread(self.store.records)}
        for render_id in await asyncio.to_thread(self.store.stored_inputs):
            if render_id not in self.records or self.records[render_id].finished_ok:
                self.store.drop_inputs(render_id)
        for record in sorted(self.records.values(), key=lambda r: r.created):
            if record.finished_ok:
                continue
            if record.attempts >= MAX_ATTEMPTS:
                self._finish(record, "failed", error="the service restarted while this render was running, "
                                                     "and it had already been started twice; submit it again")
            elif self.store.load_inputs(record.id) is None:
                self._finish(record, "failed", error="the service restarted and this render's uploads are gone; "
                                                     "submit it again")
            else:
                self._update(record, status="queued", stage="queued", progress=0.0)
                self._launch(record.id)

    # -- admission
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for record in self.records.values():
            counts[record.status] += 1
        return counts

    def _unfinished(self) -> list[RenderRecord]:
        return [self.records[render_id] for render_id in self._active]

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: mean recent render time x waiting renders / slots."""
        if not self._durations:
            return self.limits.retry_after_s
        waiting = sum(r.status == "queued" for r in self._unfinished()) + 1
        estimate = sum(self._durations) / len(self._durations) * waiting / self.limits.max_active_renders
        return int(min(600, max(1, math.ceil(estimate))))

    async def check_admission(self, owner: str | None = None) -> None:
        """RateLimited (429) past the per-key rate, ServiceBusy (503) when queued + running are at the limit."""
        if self.limits.renders_per_minute:
            recent = self._submissions.setdefault(owner, deque())
            while recent and recent[0] < time.monotonic() - 60:
                recent.popleft()
            if len(recent) >= self.limits.renders_per_minute:
                wait = int(math.ceil(60 - (time.monotonic() - recent[0]))) or 1
                raise RateLimited(f"this API key submitted {len(recent)} renders in the last minute; the limit is "
                                  f"{self.limits.renders_per_minute}", wait)
        if len(self._active) >= self.limits.max_active_renders + self.limits.max_queued_renders:
            running = sum(r.status == "running" for r in self._unfinished())
            raise ServiceBusy(f"the render queue is full ({running} running, {len(self._active) - running} "
                              f"queued); retry later", self.retry_after())

    async def submit(self, render_id: str, options: RenderOptions, owner: str | None = None) -> dict:
        """Admit a render whose uploads the store holds (status queued) and start it; RateLimited /
        ServiceBusy when it cannot be admitted. Returns the public record."""
        await self.check_admission(owner)
        if render_id in self.records or not RENDER_ID.match(render_id):
            raise RequestError(f"render id {render_id!r} is taken or malformed", 400)
        if self.limits.renders_per_minute:
            self._submissions[owner].append(time.monotonic())
        record = RenderRecord(id=render_id, seed=options.seed, steps=options.steps, owner=owner)
        self.records[render_id] = record
        self.store.write(record)
        self._launch(render_id)
        return record.public()

    async def list(self, owner: str | None, limit: int = 20, after: str | None = None) -> dict:
        """The owner's renders, newest first: {"renders": [...], "next": id to pass as `after`, or None}."""
        mine = sorted((r for r in self.records.values() if r.owner == owner), key=lambda r: (-r.created, r.id))
        if after:
            keys = [r.id for r in mine]
            mine = mine[keys.index(after) + 1:] if after in keys else []
        page = mine[:limit]
        return {"renders": [r.public() for r in page], "next": page[-1].id if len(mine) > limit else None}

    async def health(self) -> dict:
        return {"renders": self.counts()}

    async def wait_idle(self) -> None:
        """Wait for every render started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- the render sequence
    def _launch(self, render_id: str) -> None:
        self._active.add(render_id)
        task = asyncio.get_running_loop().create_task(self._run(render_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _update(self, record: RenderRecord, **changes) -> None:
        for key, value in changes.items():
            setattr(record, key, value)
        self.store.write(record)

    def _finish(self, record: RenderRecord, status: str, **changes) -> None:
        record.finished = time.time()
        if status == "done":
            changes["progress"] = 1.0
            self._durations.append(record.finished - (record.started or record.created))
        self._update(record, status=status, **changes)
        self._active.discard(record.id)
        self.store.drop_inputs(record.id)

    async def _run(self, render_id: str) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_active_renders)
        record = self.records[render_id]
        async with self._slots:
            try:
                await self._render(record)
            except Exception as e:  # noqa: BLE001 - every failure ends up in the render's record
                cause = getattr(e, "cause", None) or e
                if isinstance(cause, DawnError):
                    message = str(cause)
                elif isinstance(cause, StageLost):
                    message = (f"the worker running the {cause.stage} stage stopped twice during this render; "
                               f"submit it again")
                else:  # the details are for the operator's log, not for the client
                    log.error("render %s failed in stage %s", render_id, record.stage, exc_info=cause)
                    message = f"internal error in the {record.stage} stage; the service's log has the details"
                self._finish(record, "failed", error=message)

    async def _stage(self, stage: str, data: bytes) -> bytes:
        """One stage, retried once when its replica died before answering."""
        try:
            return await self.stages.run(stage, data)
        except StageLost:
            log.warning("a %s replica stopped during a render; retrying the stage once", stage)
            return await self.stages.run(stage, data)

    async def _render(self, record: RenderRecord) -> None:
        state = await asyncio.to_thread(self.store.load_inputs, record.id)
        if state is None:
            raise DawnError("this render's uploads are gone from the output volume; submit it again")
        self._update(record, status="running", attempts=record.attempts + 1, started=record.started or time.time())
        data = state.to_bytes()
        for stage in STAGES:
            self._update(record, stage=stage, progress=STAGE_PROGRESS[stage])
            data = await self._stage(stage, data)
            if stage == "inputs":
                check_decoded(RenderState.from_bytes(data), self.limits)
        self._update(record, stage="writing", progress=STAGE_PROGRESS["writing"])
        state = RenderState.from_bytes(data)
        await asyncio.to_thread(write_video, state, self.store.directory / f"{record.id}.mp4")  # atomic
        self._finish(record, "done", stage="done", frames=state.num_frames)


# ----------------------------------------------------------------------------------------------------
# The front end: one per ingress replica

class Queue(Protocol):
    """The RenderQueue as an ingress sees it (in-process, or the `Renders` deployment's handle)."""

    async def check_admission(self, owner: str | None = None) -> None: ...
    async def submit(self, render_id: str, options: RenderOptions, owner: str | None = None) -> dict: ...
    async def list(self, owner: str | None, limit: int, after: str | None) -> dict: ...
    async def health(self) -> dict: ...


class Frontend:
    """What an ingress replica does: checks requests, stores uploads, asks the queue to admit, and answers
    status and video from the store (so every replica gives the same answer)."""

    def __init__(self, queue: Queue, store: RenderStore, stages: RenderStages, limits: ServeLimits):
        self.queue, self.store, self.stages, self.limits = queue, store, stages, limits
        self._full_until = 0.0  # while the queue was recently full, ask before storing uploads

    async def submit(self, portrait: Media, audio: Media, pose_video: Media | None = None,
                     fields: dict | None = None, owner: str | None = None) -> dict:
        """Check and admit a render: 202 as soon as its uploads are stored. Raises OptionError /
        RequestError / RateLimited / ServiceBusy."""
        options = self.limits.options(fields or {})
        inputs = {"portrait": portrait, "audio": audio}
        if pose_video is not None:
            inputs["pose_video"] = pose_video
        for media in inputs.values():
            check_upload(media, self.limits)
        if time.monotonic() < self._full_until:  # a burst: refuse without writing anything
            await self.queue.check_admission(owner)
        render_id = uuid.uuid4().hex
        await asyncio.to_thread(self.store.save_inputs, render_id, inputs, options, owner)
        try:
            return await self.queue.submit(render_id, options, owner)  # admission, in one call to the queue
        except BaseException as e:
            self.store.drop_inputs(render_id)
            if isinstance(e, ServiceBusy) and not isinstance(e, RateLimited):
                self._full_until = time.monotonic() + 1.0
            raise

    def status(self, render_id: str, owner: str | None = None) -> dict:
        return self.store.read(render_id, owner).public()

    def video_path(self, render_id: str, owner: str | None = None) -> Path:
        return self.store.video_path(render_id, owner)

    async def list(self, owner: str | None, limit: int = 20, after: str | None = None) -> dict:
        if not 1 <= limit <= 100:
            raise RequestError(f"limit must be between 1 and 100, got {limit}", 422)
        if after is not None and not RENDER_ID.match(after):
            raise RequestError(f"after must be a render id, got {after!r}", 422)
        return await self.queue.list(owner, limit, after)

    async def locate_face(self, portrait: Media) -> dict:
        return await self.stages.locate_face(portrait, self.limits)

    async def health(self, auth_required: bool = False) -> dict:
        """/healthz: 'ok' with the render counts, or 'degraded' while the queue does not answer."""
        try:
            renders = (await asyncio.wait_for(self.queue.health(), timeout=5))["renders"]
            status = "ok"
        except Exception:  # noqa: BLE001 - a queue replica restarting
            renders, status = dict.fromkeys(STATUSES, 0), "degraded"
        return {"status": status, "auth_required": auth_required, "renders": renders, "limits": asdict(self.limits)}
