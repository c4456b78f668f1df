"""The dawn Ray Serve application: three scalable stage deployments behind a FastAPI ingress.

    DawnAPI (ingress, FastAPI, N replicas) --> Renders (one: the RenderQueue) --> Features (uploads decoded,
                 |  stores uploads, reads records      admission, render sequence      face analysis, HuBERT)
                 |  and videos on the output volume                                   PBNet    (pose + blink)
                 '--> Features (POST /v1/faces)                                       A2VFDM   (diffusion +
                                                                                        LFG decode, batched)

Each stage deployment holds a `RenderPipeline` with only its own models and calls its stage methods; the
request logic (limits, upload checks, records, admission, the render sequence) is dawn.serving's.

    serve run dawn.serve.app:build_app checkpoints=/path/to/ckpt output=/path/to/renders
    serve deploy serve/config.yaml
"""


import asyncio
import os
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match
from ray import serve
from ray.serve.handle import DeploymentHandle

from dawn import DawnError
from dawn.pipeline import Media, RenderOptions, RenderPipeline, RenderState
from dawn.serving import (ApiKeys, Frontend, RenderQueue, RenderStore, ServeLimits, ServiceBusy, StageLost,
                          error_body, error_status, locate_face, upload)


def _device(device: str) -> str:
    """A stage replica's device: 'auto' -> cuda when this replica was given a GPU, else cpu. A replica that
    renders on the CPU lowers its scheduling priority, so that where it shares a machine with the ingress,
    accepting requests is never starved by rendering."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.nice(10)
    return device


# ---- stage deployments ---------------------------------------------------------------------------

@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class Features:
    """The inputs stage (uploads decoded, face analysis, driving-video track) and the features stage (HuBERT)."""

    def __init__(self, checkpoints: str, hubert: str | None = None, device: str = "cpu"):
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, hubert_dir=hubert,
                                                        stages=("inputs", "features"), device=_device(device))

    def run(self, stage: str, data: bytes) -> bytes:
        return self.pipeline.run_bytes(stage, data)

    def locate_face(self, portrait: Media, limits: ServeLimits) -> dict:
        return locate_face(portrait, limits)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class PBNet:
    """The motion stage: pose and blink sequences (PBNet, or the driving video's track)."""

    def __init__(self, checkpoints: str, device: str = "cpu", dtype: str = "fp32"):
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, stages=("motion",), device=_device(device),
                                                        dtype=dtype)

    def run(self, stage: str, data: bytes) -> bytes:
        return self.pipeline.run_bytes(stage, data)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class A2VFDM:
    """The frames stage: flow + occlusion for all frames in one diffusion pass, then LFG decode. Concurrent
    requests are collected by @serve.batch and sampled together where their shapes match."""

    def __init__(self, checkpoints: str, device: str = "cpu", dtype: str = "fp32", max_batch_size: int = 4,
                 batch_wait_s: float = 0.05):
        self.pipeline = RenderPipeline.from_checkpoints(checkpoints, stages=("frames",), device=_device(device),
                                                        dtype=dtype)
        self.frames_batch.set_max_batch_size(max_batch_size)
        self.frames_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def run(self, stage: str, data: bytes) -> bytes:
        result = await self.frames_batch(data)
        if isinstance(result, BaseException):  # this request's group failed; the others are unaffected
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def frames_batch(self, batch: list[bytes]) -> list[bytes | BaseException]:
        # The work runs in a thread so this replica keeps accepting (and batching) requests meanwhile.
        def work() -> list[bytes | BaseException]:
            states = [RenderState.from_bytes(data) for data in batch]
            results = self.pipeline.run_stage("frames", states)
            return [r if isinstance(r, BaseException) else r.to_bytes() for r in results]

        return await asyncio.to_thread(work)


# ---- the queue and the ingress --------------------------------------------------------------------

def _lost(error: BaseException) -> bool:
    """A replica that died or could not be reached (as opposed to an error raised by its code)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(error, (RayActorError, ActorUnavailableError))


class HandleStages:
    """dawn.serving.RenderStages over the deployment handles: each stage goes to the deployment holding its
    networks; a replica lost in the middle is reported as StageLost (the queue retries once)."""

    def __init__(self, features: DeploymentHandle, pbnet: DeploymentHandle, a2v: DeploymentHandle):
        self.features = features
        self.handles = {"inputs": features, "features": features, "motion": pbnet, "frames": a2v}

    async def run(self, stage: str, data: bytes) -> bytes:
        try:
            return await self.handles[stage].run.remote(stage, data)
        except Exception as e:
            if _lost(e):
                raise StageLost(stage) from None
            raise

    async def locate_face(self, portrait: Media, limits: ServeLimits) -> dict:
        try:
            return await self.features.locate_face.remote(portrait, limits)
        except Exception as e:
            if _lost(e):
                raise ServiceBusy("the face analysis worker is restarting; retry shortly", 5) from None
            raise


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.25})
class Renders:
    """The application's one RenderQueue: admission counted across every ingress replica, the render
    sequence over the stage deployments, and the records on the output volume. Always one replica; when it
    restarts it resumes what was left unfinished (dawn.serving.RenderQueue.start)."""

    async def __init__(self, features: DeploymentHandle, pbnet: DeploymentHandle, a2v: DeploymentHandle,
                       output: str, limits: dict):
        self.queue = RenderQueue(HandleStages(features, pbnet, a2v), RenderStore(output), ServeLimits(**limits))
        await self.queue.start()

    # A refusal is returned, not raised: it is an answer, not a failure of this replica (a raised one would
    # be logged with its traceback for every 503 of a burst).
    async def check_admission(self, owner: str | None) -> DawnError | None:
        try:
            await self.queue.check_admission(owner)
        except DawnError as refusal:
            return refusal

    async def submit(self, render_id: str, options: RenderOptions, owner: str | None) -> dict | DawnError:
        try:
            return await self.queue.submit(render_id, options, owner)
        except DawnError as refusal:
            return refusal

    async def list(self, owner: str | None, limit: int, after: str | None) -> dict:
        return await self.queue.list(owner, limit, after)

    async def health(self) -> dict:
        return await self.queue.health()


class HandleQueue:
    """dawn.serving.Queue over the Renders handle: while its replica restarts, 503 + Retry-After."""

    def __init__(self, renders: DeploymentHandle):
        self.renders = renders

    async def _call(self, method: str, *args):
        try:
            answer = await getattr(self.renders, method).remote(*args)
        except Exception as e:
            if _lost(e):
                raise ServiceBusy("the render queue is restarting; retry shortly", 5) from None
            raise
        if isinstance(answer, DawnError):
            raise answer
        return answer

    async def check_admission(self, owner=None):
        return await self._call("check_admission", owner)

    async def submit(self, render_id, options, owner=None):
        return await self._call("submit", render_id, options, owner)

    async def list(self, owner, limit, after):
        return await self._call("list", owner, limit, after)

    async def health(self):
        return await self._call("health")


PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

api = FastAPI(title="dawn", version="1",
              description="DAWN talking-head rendering: portrait + speech in, mp4 out (all frames in one "
                          "diffusion pass). A render is accepted (202) once its uploads are stored; poll its "
                          "status until done or failed, then download the video.")


# ---- the API's bodies, as the OpenAPI document declares them --------------------------------------

class ErrorBody(BaseModel):
    """Every error: the reason in one line, and the HTTP status."""
    error: str
    status: int


class RenderAccepted(BaseModel):
    id: str
    status: str
    status_url: str
    video_url: str


class RenderStatus(BaseModel):
    id: str
    status: str  # queued | running | done | failed
    stage: str
    progress: float
    error: str | None
    frames: int | None
    seed: int
    steps: int
    created: float
    started: float | None
    finished: float | None


class RenderList(BaseModel):
    renders: list[RenderStatus]  # newest first
    next: str | None  # pass as `after` for the next page; null on the last one


class FaceLocation(BaseModel):
    crop_box: list[int]  # x0, y0, x1, y1 in the image's pixels
    width: int
    height: int
    faces: int


class Health(BaseModel):
    status: str  # ok | degraded (the render queue is restarting)
    auth_required: bool
    renders: dict[str, int]
    limits: dict[str, float | int | str]


REASONS = {400: "a malformed request (a multipart body that cannot be parsed)", 401: "no valid API key",
           404: "unknown render id", 409: "the render is not done", 413: "an upload over the size limit",
           422: "an invalid option or an upload dawn cannot use (empty, not an image, not audio, a truncated "
                "WAV, too long, ...)",
           429: "this API key's renders-per-minute limit is reached; retry after Retry-After seconds",
           503: "the render queue is full or restarting; retry after Retry-After seconds"}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody, "description": REASONS[code],
                   **({"headers": RETRY_AFTER} if code in (429, 503) else {})} for code in codes}


@api.exception_handler(DawnError)
async def _dawn_error(request: Request, error: DawnError) -> JSONResponse:
    body, headers = error_body(error)
    return JSONResponse(body, status_code=error_status(error), headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own form checks, in the API's one error shape: '<field>: <problem>' per problem."""
    problems = "; ".join(f"{(e.get('loc') or ['request'])[-1]}: {e.get('msg', 'invalid')}" for e in error.errors())
    return JSONResponse({"error": problems, "status": 422}, status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    headers = dict(getattr(error, "headers", None) or {})
    if error.status_code == 405:  # Allow: every method of the path, not only those of the route that matched
        methods = {m for route in request.app.router.routes if route.matches(request.scope)[0] != Match.NONE
                   for m in getattr(route, "methods", None) or ()}
        headers["Allow"] = ", ".join(sorted(methods))
    return JSONResponse({"error": str(error.detail), "status": error.status_code}, status_code=error.status_code,
                        headers=headers or None)


def _with_bearer_auth(schema: dict) -> dict:
    """The OpenAPI document of a service with API keys: bearer auth on every /v1 operation."""
    schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        if path.startswith("/v1"):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
    return schema


async def _read(file: UploadFile | None, role: str, limits: ServeLimits) -> Media | None:
    """An uploaded file's bytes, read no further than the size limit (+1 byte, to tell it was over)."""
    if file is None:
        return None
    return upload(role, file.filename, await file.read(limits.max_upload_bytes + 1))


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(api)
class DawnAPI:
    """The HTTP ingress: any number of replicas, each holding only a Frontend (the records are the store's,
    admission is the Renders deployment's)."""

    def __init__(self, renders: DeploymentHandle, features: DeploymentHandle, output: str, limits: dict,
                 api_key_file: str | None = None):
        self.frontend = Frontend(HandleQueue(renders), RenderStore(output), HandleStages(features, None, None),
                                 ServeLimits(**limits))
        self.keys = ApiKeys.from_file(api_key_file)
        if self.keys.required:
            plain = api.openapi
            api.openapi = lambda: api.openapi_schema or _with_bearer_auth(plain())

    def _owner(self, request: Request) -> str | None:
        return self.keys.owner(request.headers.get("authorization"))

    @api.post("/v1/renders", status_code=202, summary="Start a render (multipart: portrait, audio, ...)",
              response_model=RenderAccepted, responses=_errors(400, 401, 413, 422, 429, 503))
    async def create_render(self, request: Request, portrait: UploadFile = File(..., description="portrait image"),
                            audio: UploadFile = File(..., description="speech (any audio or video file)"),
                            pose_video: UploadFile = File(None, description="take head pose from this video"),
                            seed: int = Form(None, description="noise seed (default 0)"),
                            steps: int = Form(None, description="sampling steps (default: the service's)"),
                            eta: float = Form(None, description="DDIM eta, 0 (deterministic) to 1"),
                            sampler: str = Form(None, description="ddim or dpm-solver++"),
                            crop: str = Form(None, description="face (default) or none"),
                            paste_back: bool = Form(None, description="the whole portrait with the head "
                                                                      "blended in (default false)"),
                            max_side: int = Form(None, description="with paste_back: the video's longer side "
                                                                   "at most this"),
                            motion_smoothing: float = Form(None, description="smooth the motion over time, sigma "
                                                                             "in frames (default 0)")) -> dict:
        owner = self._owner(request)
        limits = self.frontend.limits
        fields = {"seed": seed, "steps": steps, "eta": eta, "sampler": sampler, "crop": crop,
                  "paste_back": paste_back, "max_side": max_side, "motion_smoothing": motion_smoothing}
        record = await self.frontend.submit(
            await _read(portrait, "portrait", limits), await _read(audio, "audio", limits),
            await _read(pose_video, "pose_video", limits), fields=fields, owner=owner)
        return {"id": record["id"], "status": record["status"], "status_url": f"/v1/renders/{record['id']}",
                "video_url": f"/v1/renders/{record['id']}/video"}

    @api.get("/v1/renders", summary="The caller's renders, newest first (paged: limit, after)",
             response_model=RenderList, responses=_errors(401, 422, 503))
    async def list_renders(self, request: Request,
                           limit: int = Query(20, ge=1, le=100, description="renders per page"),
                           after: str = Query(None, description="the previous page's `next`")) -> dict:
        return await self.frontend.list(self._owner(request), limit, after)

    @api.get("/v1/renders/{render_id}", summary="Status: queued / running / done / failed, progress, error",
             response_model=RenderStatus, responses=_errors(401, 404, 422))
    async def get_render(self, request: Request, render_id: str) -> dict:
        return self.frontend.status(render_id, self._owner(request))

    @api.get("/v1/renders/{render_id}/video", summary="The rendered mp4 (409 until done)",
             response_class=FileResponse, responses={200: {"content": {"video/mp4": {}}, "description": "the mp4"},
                                                     **_errors(401, 404, 409, 422)})
    async def get_video(self, request: Request, render_id: str) -> FileResponse:
        path = self.frontend.video_path(render_id, self._owner(request))
        return FileResponse(path, media_type="video/mp4", filename=f"{render_id}.mp4")

    @api.post("/v1/faces", summary="Where the render's face crop lies in a portrait (multipart: portrait)",
              response_model=FaceLocation, responses=_errors(400, 401, 413, 422, 503))
    async def locate_face(self, request: Request,
                          portrait: UploadFile = File(..., description="portrait image")) -> dict:
        self._owner(request)
        return await self.frontend.locate_face(await _read(portrait, "portrait", self.frontend.limits))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The browser page (dawn/serve/static/index.html): upload, options, progress, player."""
        return HTMLResponse(PAGE)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return await self.frontend.health(auth_required=self.keys.required)


# ---- application builder -------------------------------------------------------------------------

def _options(args: dict, stage: str) -> dict:
    """Deployment options from `<stage>_replicas`, `<stage>_cpus`, `<stage>_gpus` (replicas only when given,
    so that a config's autoscaling_config is not contradicted)."""
    options = {"ray_actor_options": {"num_cpus": float(args.get(f"{stage}_cpus", 1)),
                                     "num_gpus": float(args.get(f"{stage}_gpus", 0))}}
    if f"{stage}_replicas" in args:
        options["num_replicas"] = int(args[f"{stage}_replicas"])
    return options


def build_app(args: dict) -> serve.Application:
    """The application for `serve run dawn.serve.app:build_app checkpoints=DIR [key=value ...]` / serve deploy.

    args: checkpoints (required), hubert, output (default ./renders), device (auto|cpu|cuda), dtype,
    max_batch_size, batch_wait_s, <stage>_replicas / <stage>_cpus / <stage>_gpus for stage in features,
    pbnet, a2v (a replica count set in a config's `deployments:` section wins), ingress_replicas,
    ingress_cpus, queue_cpus, the ServeLimits fields (max_upload_bytes, max_audio_seconds, max_active_renders,
    max_queued_renders, max_steps, default_steps, default_eta, default_sampler, retry_after_s,
    renders_per_minute), and api_key_file (one bearer key per line; without it the API is open).
    """
    if "checkpoints" not in args:
        raise DawnError("build_app needs checkpoints=DIR (a dawn checkpoint directory)")
    checkpoints = str(Path(args["checkpoints"]).resolve())
    if not Path(checkpoints).is_dir():
        raise DawnError(f"checkpoint directory not found: {checkpoints}")
    hubert = str(Path(args["hubert"]).resolve()) if args.get("hubert") else None
    output = str(Path(args.get("output", "renders")).resolve())
    device, dtype = args.get("device", "auto"), args.get("dtype", "fp32")
    limits = ServeLimits.from_args(args)  # checked here, so a bad limit fails `serve run` at once

    features = Features.options(**_options(args, "features")).bind(checkpoints, hubert, device)
    pbnet = PBNet.options(**_options(args, "pbnet")).bind(checkpoints, device, dtype)
    a2v = A2VFDM.options(**_options(args, "a2v")).bind(
        checkpoints, device, dtype, int(args.get("max_batch_size", 4)), float(args.get("batch_wait_s", 0.05)))
    renders = Renders.options(ray_actor_options={"num_cpus": float(args.get("queue_cpus", 0.25))}).bind(
        features, pbnet, a2v, output, asdict(limits))
    ingress = {"ray_actor_options": {"num_cpus": float(args.get("ingress_cpus", 0.5))}}
    if "ingress_replicas" in args:
        ingress["num_replicas"] = int(args["ingress_replicas"])
    api_key_file = str(Path(args["api_key_file"]).resolve()) if args.get("api_key_file") else None
    ApiKeys.from_file(api_key_file)  # checked here, so a bad key file fails `serve run` at once
    return DawnAPI.options(**ingress).bind(renders, features, output, asdict(limits), api_key_file)
