"""The render pipeline (paper §3.6): portrait + speech -> talking-head frames, all frames in one pass.

A render is a `RenderState` that moves through four stages, in this order (`STAGES`):

    inputs    the media decoded: portrait image -> face crop + source pose/eyes/face box;   (CPU, mediapipe)
              speech -> 16 kHz waveform; a driving video -> its measured pose/eye track
    features  speech -> HuBERT features at 25 fps                                         (HuBERT)
    motion    pose + blink for every frame: the driving video's track, else PBNet (§3.4)   (PBNet)
    frames    flow + occlusion for all frames in one diffusion pass (A2V-FDM, §3.3),       (A2V-FDM + LFG)
              then LFG decode; several states of one shape are sampled together

Each stage is a `RenderPipeline` method taking and returning states, so a stage can run in another process
(a Serve replica, a Ray Data actor): states cross processes as `RenderState.to_bytes()` (arrays in an npz,
the rest as JSON; no pickles). A stage whose output the state already holds leaves it as it is (evaluation
from preprocessed shards brings its own portrait and features, and optionally the ground-truth motion).
`render` runs every stage in one process (the CLI, the evaluation); `write_video` writes the mp4.

Every entry point builds its options as a `RenderOptions`, which checks itself: a bad value raises
`OptionError` with the same one-line reason wherever it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dawn import DawnError
from dawn.config import FPS
from dawn.models import native

STAGES = ("inputs", "features", "motion", "frames")
# The networks each stage needs (RenderPipeline.from_checkpoints(stages=...) loads only these).
STAGE_MODELS = {"inputs": (), "features": ("hubert",), "motion": ("pbnet_pose", "pbnet_blink"),
                "frames": ("lfg", "a2v")}
SAMPLERS = ("ddim", "dpm-solver++")
CROPS = ("face", "none")

# progress(what, done, total): what is "sampling" (steps) or "decoding" (frames)
Progress = Callable[[str, int, int], None]


class OptionError(DawnError):
    """A render option out of range or of the wrong type; the message is the one-line reason shown by every
    entry point (the CLI's error line, the HTTP API's error body, the batch job's failed row)."""


# ----------------------------------------------------------------------------------------------------
# Options

_FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


@dataclass(frozen=True)
class RenderOptions:
    """How to render; checked on construction (OptionError)."""

    steps: int = 20  # sampling steps
    eta: float = 1.0  # DDIM eta: 1 the reference's stochastic DDIM, 0 deterministic
    seed: int = 0  # PBNet and diffusion noise
    sampler: str = "ddim"  # "ddim" (the reference's) or "dpm-solver++" (faster, off by default)
    crop: str = "face"  # "face": crop/align around the face; "none": resize the whole image (reference)
    decode_batch: int | None = None  # frames per LFG decode batch; None: 4 on CPU (cache-friendly), 32 on CUDA
    cond_scale: float = 1.0  # classifier-free guidance scale (1: none)
    paste_back: bool = False  # write the whole portrait with the rendered head blended in (dawn.composite)
    max_side: int = 1920  # paste-back: the video's longer side at most this (the portrait scaled down)
    # Gaussian smoothing over time (sigma, in frames) of A2V-FDM's sampled flows before the LFG decode: 0, the
    # paper's, leaves them as sampled; ~1 removes the frame-to-frame shake of briefly trained models
    # (docs/demo.md: "Where the jitter comes from")
    motion_smoothing: float = 0.0

    # the fields a request or a manifest row may set, with their types
    FIELDS = {"steps": int, "eta": float, "seed": int, "sampler": str, "crop": str, "decode_batch": int,
              "cond_scale": float, "paste_back": bool, "max_side": int, "motion_smoothing": float}

    def __post_init__(self):
        for name, kind in self.FIELDS.items():
            value = getattr(self, name)
            if value is None and name == "decode_batch":
                continue
            if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise OptionError(f"{name} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
                raise OptionError(f"{name} must be a number, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise OptionError(f"{name} must be text, got {value!r}")
            if kind is bool and not isinstance(value, (bool, np.bool_)):
                raise OptionError(f"{name} must be true or false, got {value!r}")
            object.__setattr__(self, name, kind(value))
        if self.steps < 1:
            raise OptionError(f"steps must be at least 1, got {self.steps}")
        if not 0 <= self.eta <= 1:  # also refuses nan
            raise OptionError(f"eta must be between 0 and 1, got {self.eta:g}")
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.sampler not in SAMPLERS:
            raise OptionError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.crop not in CROPS:
            raise OptionError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.decode_batch is not None and self.decode_batch < 1:
            raise OptionError(f"decode_batch must be at least 1, got {self.decode_batch}")
        if not math.isfinite(self.cond_scale):
            raise OptionError(f"cond_scale must be a finite number, got {self.cond_scale:g}")
        if self.max_side < 16:
            raise OptionError(f"max_side must be at least 16, got {self.max_side}")
        if not 0 <= self.motion_smoothing <= 10:
            raise OptionError(f"motion_smoothing must be between 0 and 10 frames, got {self.motion_smoothing:g}")

    @classmethod
    def from_fields(cls, fields: Mapping, base: "RenderOptions | None" = None) -> "RenderOptions":
        """Options from text or numbers (form fields, a manifest row): the FIELDS present and not empty
        replace `base`'s (default: the defaults); other keys are ignored."""
        changes = {}
        for name, kind in cls.FIELDS.items():
            value = fields.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if isinstance(value, str):
                text = value.strip()
                if kind is bool:
                    flag = _FLAGS.get(text.lower())
                    if flag is None:
                        raise OptionError(f"{name} must be true or false, got {text!r}")
                    changes[name] = flag
                    continue
                try:
                    value = text if kind is str else kind(text)
                except ValueError:
                    noun = "an integer" if kind is int else "a number"
                    raise OptionError(f"{name} must be {noun}, got {text!r}") from None
            changes[name] = value
        return dataclasses.replace(base or cls(), **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Records

@dataclass
class Media:
    """An input file of a render: a path to read, or uploaded bytes with the client's file name.
    `role` is what it is for: "portrait", "audio" or "pose_video" (it names the input in error messages)."""

    role: str
    name: str  # the path, or the uploaded file's name
    path: str | None = None
    data: bytes | None = None

    @classmethod
    def from_path(cls, role: str, path: str | Path) -> "Media":
        return cls(role=role, name=str(path), path=str(path))

    def decode(self, reader: Callable, what: str):
        """reader(path) on the file (uploaded bytes go to a temporary file first). A failure to read the
        bytes is a DawnError naming the input: a reader's own DawnError, or any library error as
        '<role> <name> is not a readable <what>'."""
        if self.path is not None:
            path = Path(self.path)
            if not path.is_file():
                raise DawnError(f"{self.role} file not found: {self.name}")
            return self._read(reader, path, what)
        suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(self.name).suffix)[:12]
        with tempfile.TemporaryDirectory(prefix="dawn-input-") as tmp:
            path = Path(tmp) / f"{self.role}{suffix}"
            path.write_bytes(self.data or b"")
            return self._read(reader, path, what)

    def _read(self, reader: Callable, path: Path, what: str):
        try:
            return reader(path)
        except Exception as e:  # readers raise DawnError, but garbage bytes may trip any library error
            message = str(e).replace(str(path), self.name)
            if not isinstance(e, DawnError):
                message = f"{self.name} is not a readable {what} ({type(e).__name__}: {message})"
            if self.data is not None:
                message = f"{self.role} upload: {message}"
            raise DawnError(message) from None


@dataclass
class Portrait:
    """The source frame and its state, measured on the cropped image the models see."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    pose: np.ndarray  # (6,) yaw, pitch, roll (deg), scale, tx, ty
    eyes: np.ndarray  # (2,) left, right eye ratios
    face_box: np.ndarray  # (6,) [x_min, x_max, y_min, y_max, H, W]
    crop_box: np.ndarray | None = None  # (4,) x0, y0, x1, y1 of the crop in the original image (crop "face")


@dataclass
class Motion:
    pose: np.ndarray  # (T, 6) absolute, raw units
    eyes: np.ndarray  # (T, 2) absolute eye ratios


# The array fields of a state, as npz keys -> (record attribute, field).
_ARRAYS = {"image": (None, "image"), "waveform": (None, "waveform"), "hubert": (None, "hubert"),
           "frames": (None, "frames"),
           "portrait.image": ("portrait", "image"), "portrait.pose": ("portrait", "pose"),
           "portrait.eyes": ("portrait", "eyes"), "portrait.face_box": ("portrait", "face_box"),
           "portrait.crop_box": ("portrait", "crop_box"),
           "pose_track.pose": ("pose_track", "pose"), "pose_track.eyes": ("pose_track", "eyes"),
           "motion.pose": ("motion", "pose"), "motion.eyes": ("motion", "eyes")}
_RECORDS = {"portrait": Portrait, "pose_track": Motion, "motion": Motion}


@dataclass
class RenderState:
    """One render on its way through the stages; each stage fills its fields.

    inputs: the media by role ("portrait", "audio", optional "pose_video"), read by the inputs stage.
    image (H, W, 3) uint8: the whole portrait; waveform (N,) float32 16 kHz mono; portrait: the crop the
    models see; pose_track: pose/eyes measured on each frame of the driving video; hubert (T, 1024);
    motion: pose/eyes for each of the T frames; frames (T, S, S, 3) uint8.
    """

    options: RenderOptions = field(default_factory=RenderOptions)
    name: str = "render"
    inputs: dict[str, Media] = field(default_factory=dict)
    image: np.ndarray | None = None
    waveform: np.ndarray | None = None
    portrait: Portrait | None = None
    pose_track: Motion | None = None
    hubert: np.ndarray | None = None
    motion: Motion | None = None
    frames: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @classmethod
    def from_files(cls, portrait: str | Path, audio: str | Path, pose_video: str | Path | None = None,
                   options: RenderOptions | None = None, name: str | None = None) -> "RenderState":
        inputs = {"portrait": Media.from_path("portrait", portrait), "audio": Media.from_path("audio", audio)}
        if pose_video:
            inputs["pose_video"] = Media.from_path("pose_video", pose_video)
        return cls(options=options or RenderOptions(), name=name or Path(portrait).stem, inputs=inputs)

    @property
    def num_frames(self) -> int:
        """Video frames of the speech (25 fps)."""
        from dawn.audio import num_frames

        if self.hubert is not None:
            return int(self.hubert.shape[0])
        return num_frames(len(self.waveform))

    # ---- one serialisation for every process boundary -------------------------------------------
    def to_bytes(self) -> bytes:
        arrays = {}
        for key, (record, name) in _ARRAYS.items():
            owner = self if record is None else getattr(self, record)
            value = None if owner is None else getattr(owner, name)
            if value is not None:
                arrays[key] = np.asarray(value)
        for role, media in self.inputs.items():
            if media.data is not None:
                arrays[f"data.{role}"] = np.frombuffer(media.data, np.uint8)
        meta = {"options": self.options.to_dict(), "name": self.name, "notes": self.notes,
                "timings": self.timings,
                "inputs": {role: {"role": m.role, "name": m.name, "path": m.path} for role, m in self.inputs.items()}}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "RenderState":
        with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        meta = json.loads(str(arrays.pop("meta")))
        inputs = {role: Media(**m) for role, m in meta["inputs"].items()}
        for role, media in inputs.items():
            if f"data.{role}" in arrays:
                media.data = arrays.pop(f"data.{role}").tobytes()
        state = cls(options=RenderOptions(**meta["options"]), name=meta["name"], inputs=inputs,
                    notes=meta["notes"], timings=meta["timings"])
        records: dict[str, dict] = {}
        for key, value in arrays.items():
            record, name = _ARRAYS[key]
            if record is None:
                setattr(state, name, value)
            else:
                records.setdefault(record, {})[name] = value
        for record, values in records.items():
            setattr(state, record, _RECORDS[record](**values))
        return state


# ----------------------------------------------------------------------------------------------------
# The pipeline

def decode_batch_size(requested: int | None, device) -> int:
    """Frames per LFG decode batch: `requested`, else 32 on CUDA and 4 on CPU (where larger batches leave
    the caches: a 32-frame batch is ~25% slower per frame at hdtf128)."""
    return requested or (32 if torch.device(device).type == "cuda" else 4)


class NoiseDraws(Sequence):
    """The sampler's noise draws for a batch of renders, each made when the sampler asks for it (in order),
    so that a long render holds one draw at a time: draw k is render b's k-th (1, C, T, L, L) randn from
    its own generator seeded with seeds[b], concatenated over b."""

    def __init__(self, seeds: list[int], shape: tuple, count: int, device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.shape, self.count, self.device, self.made = shape, count, device, 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> torch.Tensor:
        if k != self.made:
            raise IndexError(f"noise draws are made in order: asked for draw {k}, next is {self.made}")
        self.made += 1
        return torch.cat([torch.randn(self.shape, generator=g, device=self.device) for g in self.generators])


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class RenderPipeline:
    """Holds the networks (any subset: a Serve replica or a Ray Data actor holds only its stage's) and runs
    the render stages on one device."""

    def __init__(self, lfg=None, a2v=None, pbnet_pose=None, pbnet_blink=None, hubert=None,
                 device: str = "cpu", dtype: str = "fp32", image_size: int | None = None):
        if dtype not in DTYPES:
            raise DawnError(f"unknown dtype {dtype!r} (use one of {sorted(DTYPES)})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DawnError("--device cuda was asked for but no CUDA device is available")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.lfg, self.a2v, self.pbnet_pose, self.pbnet_blink = (
            m.to(self.device).eval() if m is not None else None for m in (lfg, a2v, pbnet_pose, pbnet_blink))
        self.hubert = hubert
        self.image_size = lfg.config.image_size if lfg is not None else image_size
        if lfg is not None and a2v is not None:
            _check_compatible(lfg, a2v)
        if a2v is not None and self.device.type == "cpu":
            native.load()  # the native CPU kernels: built here (seconds, once per machine), not mid-render

    # ---- loading ---------------------------------------------------------------------------------
    def use_channels_last(self) -> "RenderPipeline":
        """Store the U-Net's convolution weights channels_last, the layout its per-frame convolutions read, so
        they are not converted at every call. In place: the loaders call it on
        models they own; a caller passing in a model it still trains should not (DeepSpeed's parameter
        broadcast needs contiguous parameters)."""
        if self.a2v is not None:
            self.a2v.unet.to(memory_format=torch.channels_last)
        return self

    @classmethod
    def from_checkpoints(cls, directory: str | Path, hubert_dir: str | Path | None = None,
                         stages: tuple[str, ...] = STAGES, device: str = "cpu",
                         dtype: str = "fp32") -> "RenderPipeline":
        """Load a dawn checkpoint directory (see dawn.checkpoint) with the networks of `stages` (STAGES)."""
        from dawn.checkpoint import load_model

        directory = Path(directory)
        if not directory.is_dir():
            raise DawnError(f"checkpoint directory not found: {directory}")
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)} (known: {STAGES})")
        names = {name for stage in stages for name in STAGE_MODELS[stage]}
        models = {name: load_model(directory, name) for name in ("lfg", "a2v", "pbnet_pose", "pbnet_blink")
                  if name in names}
        if "hubert" in names:
            models["hubert"] = _load_hubert(hubert_dir or directory / "hubert", device)
        image_size = None if "lfg" in models else _image_size(directory)
        return cls(**models, device=device, dtype=dtype, image_size=image_size).use_channels_last()

    @classmethod
    def from_official(cls, lfg: str | Path, a2v: str | Path, pbnet_pose: str | Path, pbnet_blink: str | Path,
                      hubert_dir: str | Path, device: str = "cpu", dtype: str = "fp32") -> "RenderPipeline":
        """Load the officially released DAWN files through the state-dict adapters."""
        from dawn.adapters.a2v import load_official_a2v
        from dawn.adapters.lfg import load_official_lfg
        from dawn.adapters.pbnet import load_official_pbnet

        return cls(lfg=load_official_lfg(lfg), a2v=load_official_a2v(a2v),
                   pbnet_pose=load_official_pbnet(pbnet_pose, "pose"),
                   pbnet_blink=load_official_pbnet(pbnet_blink, "blink"),
                   hubert=_load_hubert(hubert_dir, device), device=device, dtype=dtype).use_channels_last()

    @property
    def resolution(self) -> int:
        """The size S of the rendered S x S frames (the LFG's image size)."""
        if self.image_size is None:
            raise RuntimeError("this pipeline knows no LFG image size")
        return self.image_size

    # ---- the stages --------------------------------------------------------------------------------
    def run_stage(self, stage: str, states: list[RenderState], progress: Progress | None = None
                  ) -> list[RenderState | Exception]:
        """Run one stage on several renders. A render's failure is returned in its place instead of being
        raised (a whole sampling group fails together); the time spent is added to each state's timings."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {STAGES})")
        start = time.perf_counter()
        if stage == "frames":
            results = self.frames(states, progress=progress)
        else:
            results = []
            for state in states:
                try:
                    results.append(getattr(self, stage)(state))
                except Exception as e:  # noqa: BLE001 - handed back in the render's place
                    results.append(e)
        share = (time.perf_counter() - start) / max(1, len(states))
        for result in results:
            if isinstance(result, RenderState):
                result.timings[stage] = result.timings.get(stage, 0.0) + share
        return results

    def run_bytes(self, stage: str, data: bytes) -> bytes:
        """`run_stage` on one serialised state (`RenderState.to_bytes()`), for stages in other processes;
        a failure is raised."""
        (result,) = self.run_stage(stage, [RenderState.from_bytes(data)])
        if isinstance(result, Exception):
            raise result
        return result.to_bytes()

    def render(self, state: RenderState, progress: Progress | None = None) -> RenderState:
        """Every stage in order, in this process; raises the first failure."""
        for stage in STAGES:
            (state,) = self.run_stage(stage, [state], progress=progress)
            if isinstance(state, Exception):
                raise state
        return state

    def inputs(self, state: RenderState) -> RenderState:
        """Decode the media: the portrait analysed and cropped, the speech at 16 kHz, the driving video's
        pose/eye track measured (paper A.4.1)."""
        from dawn.audio import load_audio
        from dawn.face import load_image

        if state.portrait is None:
            if state.image is None:
                if "portrait" not in state.inputs:
                    raise DawnError("no portrait given")
                state.image = state.inputs["portrait"].decode(load_image, "image")
            media = state.inputs.get("portrait")
            name = "the portrait" if media is None else (
                f"portrait {media.name!r}" if media.data is not None else media.name)
            state.portrait, notes = self.analyze_portrait(state.image, crop=state.options.crop, name=name)
            state.notes.extend(notes)
        if state.waveform is None:
            if "audio" not in state.inputs:
                raise DawnError("no speech audio given")
            state.waveform = state.inputs["audio"].decode(load_audio, "audio file")
        if state.motion is None and state.pose_track is None and "pose_video" in state.inputs:
            media = state.inputs["pose_video"]
            frames = media.decode(load_pose_frames, "video")
            if len(frames) == 0:
                raise DawnError(f"the pose video {media.name} has no frames")
            state.pose_track = self.measure_pose_track(frames, name=media.name)
        for media in state.inputs.values():
            media.data = None  # decoded: the uploaded bytes need not travel to the next stages
        return state

    def features(self, state: RenderState) -> RenderState:
        """HuBERT features of the speech, one per video frame."""
        if state.hubert is None:
            state.hubert = self.audio_features(state.waveform)
        return state

    def motion(self, state: RenderState) -> RenderState:
        """Pose and blink for every frame: the driving video's track when there is one (cut to the speech's
        length, or its last frame held), else sampled by PBNet with the render's seed."""
        if state.motion is None:
            if state.pose_track is not None:
                index = np.minimum(np.arange(state.num_frames), len(state.pose_track.pose) - 1)
                state.motion = Motion(pose=state.pose_track.pose[index], eyes=state.pose_track.eyes[index])
            else:
                state.motion = self.sample_motion(state.portrait, state.hubert, seed=state.options.seed)
        return state

    def frames(self, states: list[RenderState], progress: Progress | None = None
               ) -> list[RenderState | Exception]:
        """A2V-FDM flows and LFG decode for each state. States of the same frame count, crop size and sampler
        settings are sampled in one batched pass (each with its own seed, so a render's frames do not depend
        on what it was batched with); each is then decoded on its own."""
        results: list[RenderState | Exception | None] = list(states)
        groups: dict[tuple, list[int]] = {}
        for i, state in enumerate(states):
            if state.frames is None:
                o = state.options
                key = (state.num_frames, state.portrait.image.shape, o.steps, o.sampler, o.eta, o.cond_scale,
                       o.motion_smoothing)
                groups.setdefault(key, []).append(i)
        for indices in groups.values():
            chosen = [states[i] for i in indices]
            try:
                sampling = None if progress is None else (lambda done, total: progress("sampling", done, total))
                flows = self.sample_flows_batch([s.portrait for s in chosen], [s.hubert for s in chosen],
                                                [s.motion for s in chosen], chosen[0].options,
                                                seeds=[s.options.seed for s in chosen], progress=sampling)
                if chosen[0].options.motion_smoothing:
                    flows = smooth_over_time(flows, chosen[0].options.motion_smoothing)
                decoding = None if progress is None else (lambda done, total: progress("decoding", done, total))
                for k, state in enumerate(chosen):
                    state.frames = self.decode_frames(state.portrait, flows[k:k + 1],
                                                      batch_size=state.options.decode_batch, progress=decoding)
            except Exception as e:  # noqa: BLE001 - handed back to each render of the group
                for i in indices:
                    results[i] = e
        return results

    # ---- the work inside the stages ----------------------------------------------------------------
    def analyze_portrait(self, image: np.ndarray, crop: str = "face", name: str = "the portrait"
                         ) -> tuple[Portrait, list[str]]:
        """The crop the models see and its measured state, and notes for the user (e.g. several faces)."""
        from dawn.face import analyze_portrait

        analysis = analyze_portrait(image, size=self.resolution, crop=crop, name=name)
        box = None if analysis.crop_box is None else np.asarray(analysis.crop_box, np.int64)
        portrait = Portrait(image=analysis.image, pose=np.asarray(analysis.pose, np.float32),
                            eyes=np.asarray(analysis.eye_ratios, np.float32),
                            face_box=np.asarray(analysis.face_box, np.float32), crop_box=box)
        return portrait, list(analysis.notes)

    def audio_features(self, waveform: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 (N,) -> HuBERT features (T, 1024) at 25 fps, T = int(N / 16000 * 25)."""
        if self.hubert is None:
            raise RuntimeError("this pipeline holds no HuBERT model")
        return self.hubert(waveform)

    def measure_pose_track(self, frames: np.ndarray, name: str = "the pose video") -> Motion:
        """Pose and eye ratios measured on every frame of a driving video (F, H, W, 3) uint8."""
        from dawn.face import analyze_video_frames

        try:
            analysis = analyze_video_frames(frames)
        except DawnError:
            raise DawnError(f"no face found in any frame of the pose video {name}") from None
        return Motion(pose=analysis["pose"].astype(np.float32), eyes=analysis["eye_ratios"].astype(np.float32))

    @torch.no_grad()
    def sample_motion(self, portrait: Portrait, hubert: np.ndarray, seed: int = 0) -> Motion:
        """PBNet pose and blink sequences for every frame (paper §3.4), seeded."""
        audio = torch.as_tensor(hubert, dtype=torch.float32, device=self.device)[None]
        out = []
        for k, (model, state) in enumerate(((self.pbnet_pose, portrait.pose), (self.pbnet_blink, portrait.eyes))):
            generator = torch.Generator(device=self.device).manual_seed(seed * 2 + k)
            source = torch.as_tensor(state, dtype=torch.float32, device=self.device)[None]
            with _autocast(self.device, self.dtype):
                seq = model.generate(source, audio, generator=generator)
            out.append(seq[0].float().cpu().numpy())
        return Motion(pose=out[0], eyes=out[1])

    def condition(self, portrait: Portrait, hubert: np.ndarray, motion: Motion) -> torch.Tensor:
        """Per-frame condition (1, T, 1032) = [HuBERT, pose - source pose, eyes - source eyes] (§3.3)."""
        cond = np.concatenate([hubert, motion.pose - portrait.pose[None], motion.eyes - portrait.eyes[None]], axis=1)
        return torch.as_tensor(cond, dtype=torch.float32, device=self.device)[None]

    def source_tensor(self, portrait: Portrait) -> torch.Tensor:
        return torch.tensor(portrait.image, device=self.device).permute(2, 0, 1)[None].float() / 255.0  # copies: the array may be read-only

    def sample_flows(self, portrait: Portrait, hubert: np.ndarray, motion: Motion, options: RenderOptions,
                     progress: Progress | None = None) -> torch.Tensor:
        """Flow and occlusion for all T frames in one sampling pass: (1, 3, T, L, L), channels
        (flow x, flow y, 2 * occlusion - 1)."""
        return self.sample_flows_batch([portrait], [hubert], [motion], options, seeds=[options.seed],
                                       progress=progress)

    @torch.no_grad()
    def sample_flows_batch(self, portraits: list[Portrait], huberts: list[np.ndarray], motions: list[Motion],
                           options: RenderOptions, seeds: list[int], progress: Progress | None = None
                           ) -> torch.Tensor:
        """`sample_flows` for B renders with the same frame count T in one batched pass -> (B, 3, T, L, L).

        Render b draws its noise from its own generator seeded with seeds[b], in the order a single
        render draws it, so its flows do not depend on what it is batched with (options.seed is unused).
        """
        from dawn.models.diffusion import classifier_free_guidance, ddim_sample, ddim_timesteps, dpm_solver_sample

        if options.sampler not in SAMPLERS:
            raise DawnError(f"unknown sampler {options.sampler!r} (use one of {SAMPLERS})")
        if len({len(h) for h in huberts}) != 1 or not len(portraits) == len(motions) == len(seeds) == len(huberts):
            raise ValueError("sample_flows_batch needs one portrait, motion and seed per render, all of one length")
        cond = torch.cat([self.condition(p, h, m) for p, h, m in zip(portraits, huberts, motions)])
        source = torch.cat([self.source_tensor(p) for p in portraits])
        box = torch.as_tensor(np.stack([p.face_box for p in portraits]), dtype=torch.float32, device=self.device)
        latent = self.a2v.config.latent_size
        one = (1, 3, cond.shape[1], latent, latent)
        # x_T, then one draw per DDIM step that adds noise (t' > 0 and eta > 0); DPM-Solver++ draws x_T only.
        pairs = ddim_timesteps(options.steps, self.a2v.schedule.timesteps)
        draws = 1 + (sum(t_next > 0 for _, t_next in pairs) if options.sampler == "ddim" and options.eta > 0 else 0)
        noise = NoiseDraws(seeds, one, draws, self.device)
        with _autocast(self.device, self.dtype):
            features = self.a2v.source_features(self.lfg.source_latent(source), box)
            denoise = self.a2v.denoiser(features, cond)
            if options.cond_scale != 1.0:
                denoise = classifier_free_guidance(denoise, self.a2v.denoiser(features, torch.zeros_like(cond)),
                                                   options.cond_scale)
            shape = (len(seeds), *one[1:])
            if options.sampler == "ddim":
                motion = ddim_sample(self.a2v.schedule, denoise, shape, steps=options.steps, eta=options.eta,
                                     noise=noise, progress=progress, clip=self.a2v.clip_samples)
            else:
                motion = dpm_solver_sample(self.a2v.schedule, denoise, shape, steps=options.steps, noise=noise,
                                           progress=progress, clip=self.a2v.clip_samples)
        return self.a2v.flows_from_motion(motion.float())

    @torch.no_grad()
    def decode_frames(self, portrait: Portrait, flows: torch.Tensor, batch_size: int | None = None,
                      progress: Progress | None = None) -> np.ndarray:
        """LFG decode: the source encoded once, frames decoded in batches (`decode_batch_size`) ->
        (T, S, S, 3) uint8."""
        batch_size = decode_batch_size(batch_size, self.device)
        source = self.source_tensor(portrait)
        grids = flows[0, :2].permute(1, 2, 3, 0)  # (T, L, L, 2)
        occlusion = (flows[0, 2:3].transpose(0, 1) + 1) / 2  # (T, 1, L, L)
        t, s = grids.shape[0], source.shape[-1]
        frames = np.empty((t, s, s, 3), dtype=np.uint8)  # uint8 output keeps long videos small
        with _autocast(self.device, self.dtype):
            features = self.lfg.encode_source(source)
            for start in range(0, t, batch_size):
                stop = min(start + batch_size, t)
                batch = self.lfg.decode(features, source, grids[start:stop].to(self.device),
                                        occlusion[start:stop].to(self.device))
                frames[start:stop] = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                if progress is not None:
                    progress(stop, t)
        return frames

def smooth_over_time(flows: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian filter along the time axis of flows (B, C, T, L, L); sigma in frames, the ends reflected
    (a constant sequence stays as it is)."""
    radius = min(max(1, int(3 * sigma + 0.5)), flows.shape[2] - 1)
    if radius < 1:
        return flows
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=flows.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    b, c, t, h, w = flows.shape
    series = flows.float().permute(0, 1, 3, 4, 2).reshape(-1, 1, t)  # one row per channel and latent pixel
    series = torch.nn.functional.conv1d(torch.nn.functional.pad(series, (radius, radius), mode="reflect"), kernel)
    return series.reshape(b, c, h, w, t).permute(0, 1, 4, 2, 3).to(flows.dtype).contiguous()


def _check_compatible(lfg, a2v) -> None:
    s, latent = lfg.config.image_size, a2v.config.latent_size
    if s != 4 * latent:
        raise DawnError(f"checkpoints do not fit together: LFG renders {s}x{s} but A2V-FDM expects a "
                        f"{latent}x{latent} latent ({4 * latent}x{4 * latent} images)")


def _image_size(directory: Path) -> int:
    """The LFG image size, read from the checkpoint's config without loading its weights."""
    meta = directory / "lfg.json"
    if not meta.is_file():
        raise DawnError(f"checkpoint file missing: {meta}")
    try:
        return int(json.loads(meta.read_text())["config"]["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise DawnError(f"checkpoint config {meta} is not a dawn LFG config: {e}") from None


def _load_hubert(directory, device: str):
    from dawn.audio import HubertFeatureExtractor

    if directory is None:
        raise DawnError("no HuBERT model directory given (--hubert DIR)")
    return HubertFeatureExtractor(directory, device=device)


def load_pose_frames(path: str | Path) -> np.ndarray:
    """A driving video's frames resampled to 25 fps: (T, H, W, 3) uint8 RGB."""
    from dawn.data.preprocess import resample_indices
    from dawn.video import read_video

    video, fps = read_video(path)
    return video[resample_indices(len(video), fps)]


def write_video(state: RenderState, path: str | Path) -> Path:
    """The rendered frames as an H.264 mp4 with the speech as AAC, written atomically: the face crop, or
    with options.paste_back the whole portrait with the rendered head blended in (dawn.composite)."""
    from dawn.video import write_mp4

    frames = state.frames
    if state.options.paste_back:
        from dawn.composite import paste_back

        if state.image is None:
            raise DawnError(f"{state.name}: paste-back needs the original portrait, and this render has none")
        box = None if state.portrait.crop_box is None else tuple(int(v) for v in state.portrait.crop_box)
        frames = paste_back(state.image, state.frames, state.portrait.image, box, state.options.max_side,
                            face_box=state.portrait.face_box)
    write_mp4(path, frames, fps=FPS, audio=state.waveform)
    return Path(path)
