"""Evaluation (paper §4.1): render held-out videos, measure them, and report a metrics table with plots.

Three sources of videos, each giving `EvalItem`s (generated frames + audio + source portrait, and the ground
truth where there is one):

- `shard_items`: the test split of preprocessed shards (docs/data_schema.md). As in the paper's held-out
  evaluation, the source portrait is the first frame of the test video and the audio is its audio; the
  video is cut to `max_frames` (HDTF: 200). Rendering uses the shard's HuBERT features and the pipeline's
  stage methods (PBNet motion, or the ground-truth pose/blink with `ground_truth_motion`); the ground-truth
  frames, pose, eye ratios and mouth opening come from the shard.
- `manifest_items`: a CSV/JSONL manifest (id, portrait, audio, optional pose_video, seed) rendered with
  `RenderPipeline.render`; there is no ground truth (identity is measured against the portrait crop).
- `video_items`: already rendered mp4s (with their audio track); the portrait is each video's first frame,
  or, with a reference folder holding ground-truth videos of the same names, the reference's first frame.

`evaluate_items` scores each item as it comes (frames are not kept), then computes the set-level metrics,
writes OUT/metrics.json, OUT/metrics.md and OUT/plots/<id>_lipsync.png, <id>_pose.png, and logs all of it to
an MLflow run. Always measured (no weights needed): the lip-sync proxy, the offline identity similarity,
blink/s, BAS and pose statistics vs the ground truth. With the weight files given (`MetricWeights`): FID, FVD16,
FVD32, DR25, DR50 (need ground-truth frames), LSE-C / LSE-D and CSIM. Nothing here knows about Ray.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dawn import DawnError
from dawn.config import FPS, SAMPLES_PER_FRAME

DR_LENGTHS = (25, 50)
# Per-video table columns (a missing measure is None): name -> description (for the report).
COLUMNS = {
    "frames": "frames scored",
    "lipsync": "lip-sync proxy: corr(mouth opening, speech envelope), best lag within +-2 frames",
    "lipsync_lag": "that lag in frames (positive: mouth follows the audio)",
    "mouth_corr_gt": "corr(generated mouth opening, ground-truth mouth opening), best lag within +-2",
    "identity": "offline identity similarity to the source portrait (geometry + colour + texture, 0-1)",
    "blink_per_s": "blinks per second of the generated video",
    "blink_per_s_gt": "blinks per second of the ground truth",
    "bas": "beat align score of the generated head motion vs audio onsets",
    "bas_gt": "beat align score of the ground-truth head motion",
    "pose_mae": "mean abs error of yaw/pitch/roll vs ground truth (degrees)",
    "pose_std_ratio": "std(generated) / std(ground truth) of yaw/pitch/roll, averaged",
    "pose_corr": "Pearson correlation of yaw/pitch/roll with the ground truth, averaged",
    "pose_jitter": "jitter of the measured yaw/pitch/roll: mean |x[t+1] - 2 x[t] + x[t-1]| * fps^2 (deg/s^2), averaged",
    "pose_jitter_gt": "the same for the ground truth",
    "pose_jitter_ratio": "pose_jitter / pose_jitter_gt (1 = as smooth as the truth)",
    "pose_jitter_requested": "the same jitter of the pose the renderer was asked for (PBNet's or the driving video's)",
    "landmark_jitter": "jitter of the 478 face landmarks (x, y), averaged (pixels/s^2)",
    "landmark_jitter_gt": "the same for the ground-truth frames",
    "landmark_jitter_ratio": "landmark_jitter / landmark_jitter_gt",
    "csim": "ArcFace cosine similarity to the ground-truth frames (or the portrait)",
    "lse_c": "SyncNet confidence (LSE-C)",
    "lse_d": "SyncNet distance (LSE-D)",
}
SET_COLUMNS = ("fid", "fvd16", "fvd32", "dr25", "dr50")
ANGLES = ("yaw", "pitch", "roll")


@dataclass
class EvalItem:
    """One video to score. Frames (T, S, S, 3) uint8 RGB at 25 fps; waveform 16 kHz mono float32;
    portrait (H, W, 3) uint8 RGB. Ground truth (when known): frames (T, S, S, 3), pose (T, 6), eyes (T, 2),
    mouth (T,). requested_pose (T, 6): the pose the renderer was asked to produce (PBNet's or the driving
    video's), plotted next to the measured one."""

    id: str
    frames: np.ndarray
    waveform: np.ndarray
    portrait: np.ndarray
    real_frames: np.ndarray | None = None
    real_pose: np.ndarray | None = None
    real_eyes: np.ndarray | None = None
    real_mouth: np.ndarray | None = None
    requested_pose: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class MetricWeights:
    """Weight files of the metric networks; a metric whose file is None is skipped."""

    inception: str | Path | None = None  # FID, DR (pt_inception-2015-12-05-6726825d.pth)
    i3d: str | Path | None = None  # FVD16 / FVD32 (i3d_pretrained_400.pt)
    syncnet: str | Path | None = None  # LSE-C / LSE-D (syncnet_v2.model)
    arcface: str | Path | None = None  # CSIM (arcface_torch IResNet-50 backbone.pth)


@dataclass
class MetricNetworks:
    """Loaded feature extractors (any may be None): callables as in dawn.metrics (tests can pass stand-ins)."""

    inception: object = None  # frames (N, H, W, 3) uint8 -> (N, D)
    i3d: object = None  # clips (B, T, H, W, 3) uint8 -> (B, D)
    syncnet: object = None  # (frames, waveform) -> SyncScores
    arcface: object = None  # frames -> ((N, D) embeddings, (N,) found)

    @classmethod
    def load(cls, weights: MetricWeights, device: str = "cpu") -> "MetricNetworks":
        from dawn.metrics.frechet import I3DFeatures, InceptionFeatures
        from dawn.metrics.identity import ArcFaceEmbedder
        from dawn.metrics.sync import SyncNetScorer

        return cls(inception=InceptionFeatures(weights.inception, device) if weights.inception else None,
                   i3d=I3DFeatures(weights.i3d, device) if weights.i3d else None,
                   syncnet=SyncNetScorer(weights.syncnet, device) if weights.syncnet else None,
                   arcface=ArcFaceEmbedder(weights.arcface, device) if weights.arcface else None)


@dataclass
class EvaluationSettings:
    steps: int = 20  # sampling steps
    sampler: str = "ddim"
    seed: int = 0
    max_frames: int | None = 200  # frames per test video (the paper's HDTF setting); None: whole videos
    max_videos: int | None = None
    ground_truth_motion: bool = False  # drive A2V-FDM with the ground-truth pose/blink instead of PBNet
    identity_frames: int = 16  # frames sampled per video for the identity measures
    decode_batch: int | None = None  # None: the pipeline's default for the device
    device: str = "cpu"
    save_videos: bool = True  # OUT/videos/<id>.mp4 of the rendered videos


# ----------------------------------------------------------------------------------------------------
# Sources

def _render_options(settings: EvaluationSettings, crop: str):
    from dawn.pipeline import RenderOptions

    return RenderOptions(steps=settings.steps, sampler=settings.sampler, seed=settings.seed, crop=crop,
                         decode_batch=settings.decode_batch)


def _test_videos(shards_dir: str | Path, max_frames: int | None) -> Iterator[dict]:
    """Test-split videos of a shards folder, segments joined in order, cut to max_frames."""
    from dawn.data.readers import iter_shard_rows

    if not (Path(shards_dir) / "shards").is_dir():
        raise DawnError(f"{shards_dir} is not a preprocessed shards folder (no shards/ inside; see "
                        f"docs/data_schema.md)")
    current: list[dict] = []
    for row in iter_shard_rows(shards_dir, split="test"):  # one file per video: its rows are consecutive
        if current and row["video_id"] != current[0]["video_id"]:
            yield _join_segments(current, max_frames)
            current = []
        current.append(row)
    if current:
        yield _join_segments(current, max_frames)


def _join_segments(rows: list[dict], max_frames: int | None) -> dict:
    rows = sorted(rows, key=lambda r: r["segment"])
    video = {"video_id": rows[0]["video_id"]}
    per_frame = ("frames", "hubert", "pose", "eyes", "mouth", "face_box")
    for name in ("audio", *per_frame):
        video[name] = np.concatenate([r[name] for r in rows])
    length = len(video["frames"]) if max_frames is None else min(max_frames, len(video["frames"]))
    for name in per_frame:
        video[name] = video[name][:length]
    video["audio"] = video["audio"][:length * SAMPLES_PER_FRAME]
    return video


def shard_items(shards_dir: str | Path, pipeline, settings: EvaluationSettings) -> Iterator[EvalItem]:
    """Render each test video of a shards folder from its first frame and its audio (see the module doc).

    `pipeline`: a dawn.pipeline.RenderPipeline holding PBNet (unless ground_truth_motion), A2V-FDM and LFG.
    The source state (pose, eye ratios, face box) is the shard's measurement of frame 0, as in training.
    """
    from dawn.pipeline import Motion, Portrait, RenderState

    count = 0
    for video in _test_videos(shards_dir, settings.max_frames):
        if settings.max_videos is not None and count >= settings.max_videos:
            return
        if pipeline.resolution != video["frames"].shape[1]:
            raise DawnError(f"the shards in {shards_dir} are {video['frames'].shape[1]} px but the checkpoints "
                            f"render {pipeline.resolution} px")
        hubert = video["hubert"].astype(np.float32)
        portrait = Portrait(image=video["frames"][0], pose=video["pose"][0].astype(np.float32),
                            eyes=video["eyes"][0].astype(np.float32), face_box=video["face_box"][0].astype(np.float32))
        state = RenderState(options=_render_options(settings, crop="none"), name=video["video_id"],
                            waveform=video["audio"], portrait=portrait, hubert=hubert)
        if settings.ground_truth_motion:
            state.motion = Motion(pose=video["pose"].astype(np.float32), eyes=video["eyes"].astype(np.float32))
        state = pipeline.render(state)
        frames, motion = state.frames, state.motion
        count += 1
        yield EvalItem(id=video["video_id"], frames=frames, waveform=video["audio"], portrait=video["frames"][0],
                       real_frames=video["frames"], real_pose=video["pose"], real_eyes=video["eyes"],
                       real_mouth=video["mouth"], requested_pose=motion.pose)


def manifest_items(manifest: str | Path, pipeline, settings: EvaluationSettings) -> Iterator[EvalItem]:
    """Render each row of a batch-render manifest (id, portrait, audio, optional pose_video and seed)."""
    from dawn.batch_render import check_row, read_manifest
    from dawn.pipeline import RenderState

    rows, seen = read_manifest(manifest), set()
    for number, row in enumerate(rows[:settings.max_videos], 1):
        problem = check_row(row, seen, _render_options(settings, "face"))
        if problem:
            raise DawnError(f"{manifest} row {number}: {problem}")
        seen.add(row["id"])
        state = pipeline.inputs(RenderState.from_files(row["portrait"], row["audio"], row["pose_video"],
                                                       options=row["options"], name=row["id"]))
        if settings.max_frames is not None:
            state.waveform = state.waveform[:settings.max_frames * SAMPLES_PER_FRAME]
        state = pipeline.render(state)
        yield EvalItem(id=row["id"], frames=state.frames, waveform=state.waveform, portrait=state.portrait.image,
                       requested_pose=state.motion.pose, notes=list(state.notes))


def video_items(videos_dir: str | Path, reference_dir: str | Path | None = None,
                max_frames: int | None = None, max_videos: int | None = None) -> Iterator[EvalItem]:
    """Rendered mp4s of a folder (sorted by name), each with its audio track. With `reference_dir`, the
    ground-truth video of the same file name gives the portrait (its first frame), the ground-truth frames
    (resized to the rendered size) and the pose / eye / mouth tracks measured on them."""
    import cv2

    from dawn.audio import load_audio
    from dawn.metrics.lipsync import analyze_frames
    from dawn.pipeline import load_pose_frames as read_video_25fps  # any video, resampled to 25 fps

    videos = sorted(Path(videos_dir).glob("*.mp4"))
    if not videos:
        raise DawnError(f"no .mp4 files in {videos_dir}")
    for path in videos[:max_videos]:
        frames, waveform = read_video_25fps(path), load_audio(path)
        length = min(len(frames), len(waveform) // SAMPLES_PER_FRAME, max_frames or len(frames))
        real = None
        if reference_dir is not None:
            reference = Path(reference_dir) / path.name
            if not reference.is_file():
                raise DawnError(f"no ground-truth video {reference} for {path}")
            real = read_video_25fps(reference)
            length = min(length, len(real))
            size = (frames.shape[2], frames.shape[1])
            real = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in real[:length]])
        item = EvalItem(id=path.stem, frames=frames[:length], waveform=waveform[:length * SAMPLES_PER_FRAME],
                        portrait=frames[0] if real is None else real[0], real_frames=real)
        if real is not None:
            analysis = analyze_frames(real)
            item.real_pose, item.real_eyes = analysis["pose"], analysis["eye_ratios"]
            item.real_mouth = analysis["mouth_opening"]
        yield item


# ----------------------------------------------------------------------------------------------------
# Scoring

@dataclass
class VideoScore:
    row: dict  # the table row: id + COLUMNS
    tracks: dict  # per-frame series for the plots and the JSON
    details: dict  # per-angle pose statistics, identity components, SyncNet offset, notes
    features: dict  # per-video features for the set-level metrics


def _mean(values) -> float | None:
    """Mean over the known values (None when all are nan, e.g. correlations of constant tracks)."""
    values = np.asarray(values, np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def score_item(item: EvalItem, networks: MetricNetworks, identity_frames: int = 16) -> VideoScore:
    """All per-video measures of one item; face-based ones are None (with a note) when no face is found."""
    from dawn.metrics import frechet, identity, lipsync, motion

    frames, waveform = item.frames, item.waveform
    length = len(frames)
    row = {"id": item.id, **{name: None for name in COLUMNS}, "frames": length}
    details: dict = {"notes": list(item.notes)}
    tracks: dict = {"envelope": None, "mouth": None, "pose": None, "real_pose": item.real_pose,
                    "real_mouth": item.real_mouth, "requested_pose": item.requested_pose}
    features: dict = {}
    try:
        analysis = lipsync.analyze_frames(frames)
    except DawnError as error:
        analysis = None
        details["notes"].append(f"generated frames: {error}; face-based measures skipped")
    if analysis is not None:
        if not analysis["found"].all():
            details["notes"].append(f"no face in {int((~analysis['found']).sum())} of {length} frames "
                                    f"(nearest detection used)")
        sync = lipsync.lip_sync_proxy(analysis["mouth_opening"], waveform)
        row["lipsync"], row["lipsync_lag"] = sync["correlation"], sync["lag"]
        tracks.update(envelope=sync["envelope"], mouth=analysis["mouth_opening"], pose=analysis["pose"])
        row["blink_per_s"] = motion.blinks_per_second(analysis["eye_ratios"])
        row["bas"] = motion.head_motion_bas(analysis["pose"], waveform)
        try:
            similarity = identity.video_identity_similarity(frames, item.portrait, analysis["landmarks"],
                                                            analysis["found"], max_frames=identity_frames)
            row["identity"], details["identity"] = similarity["identity"], similarity
        except DawnError as error:
            details["notes"].append(f"offline identity: {error}")
        row["pose_jitter"] = _mean(motion.jitter(analysis["pose"][:, :3]))
        row["landmark_jitter"] = _mean(motion.jitter(analysis["landmarks"][:, :, :2].reshape(length, -1)))
        if item.real_frames is not None:
            try:
                real = lipsync.analyze_frames(np.asarray(item.real_frames[:length]))
                row["landmark_jitter_gt"] = _mean(motion.jitter(real["landmarks"][:, :, :2].reshape(len(real["landmarks"]), -1)))
                row["landmark_jitter_ratio"] = _ratio(row["landmark_jitter"], row["landmark_jitter_gt"])
            except DawnError as error:
                details["notes"].append(f"ground-truth frames: {error}; landmark jitter of the truth skipped")
        if item.real_pose is not None:
            row["pose_jitter_gt"] = _mean(motion.jitter(item.real_pose[:length, :3]))
            row["pose_jitter_ratio"] = _ratio(row["pose_jitter"], row["pose_jitter_gt"])
            stats = motion.track_statistics(analysis["pose"][:, :3], item.real_pose[:, :3])
            details["pose"] = {key: dict(zip(ANGLES, np.round(value, 6).tolist())) for key, value in stats.items()}
            row["pose_mae"], row["pose_std_ratio"], row["pose_corr"] = (
                _mean(stats["mae"]), _mean(stats["std_ratio"]), _mean(stats["correlation"]))
        if item.real_mouth is not None:
            row["mouth_corr_gt"] = lipsync.lag_correlation(analysis["mouth_opening"], item.real_mouth)[0]
    if tracks["envelope"] is None:
        from dawn.audio import speech_envelope

        tracks["envelope"] = speech_envelope(waveform, length)
    if item.real_eyes is not None:
        row["blink_per_s_gt"] = motion.blinks_per_second(item.real_eyes)
    if item.real_pose is not None:
        row["bas_gt"] = motion.head_motion_bas(item.real_pose, waveform)
    if item.requested_pose is not None:
        row["pose_jitter_requested"] = _mean(motion.jitter(np.asarray(item.requested_pose)[:, :3]))
    if networks.syncnet is not None:
        scores = networks.syncnet(frames, waveform)
        row["lse_c"], row["lse_d"], details["sync_offset"] = scores.lse_c, scores.lse_d, scores.offset
    if networks.arcface is not None:
        picks = np.unique(np.linspace(0, length - 1, min(identity_frames, length)).round().astype(int))
        generated, _ = networks.arcface(frames[picks])
        if item.real_frames is not None:
            reference, _ = networks.arcface(item.real_frames[picks])
        else:
            reference, _ = networks.arcface(item.portrait[None])
        row["csim"] = identity.csim(generated, reference)
    if networks.inception is not None and item.real_frames is not None:
        features["inception"] = (networks.inception(frames), networks.inception(item.real_frames))
    if networks.i3d is not None and item.real_frames is not None:
        for clip_length in frechet.FVD_CLIP_LENGTHS:
            if length >= clip_length:
                features[f"i3d{clip_length}"] = tuple(frechet.clip_features(v, networks.i3d, clip_length)
                                                      for v in (frames, item.real_frames))
    return VideoScore(row=row, tracks=tracks, details=details, features=features)


def set_metrics(scores: list[VideoScore]) -> dict:
    """FID, FVD16, FVD32, DR25, DR50 over all videos with the needed features (None where not computable)."""
    from dawn.metrics import frechet, motion

    out: dict = {name: None for name in SET_COLUMNS}
    notes = []
    pairs = [s.features["inception"] for s in scores if "inception" in s.features]
    if pairs:
        generated, real = (np.concatenate(side) for side in zip(*pairs))
        if min(len(generated), len(real)) >= 2:
            out["fid"] = frechet.fid(generated, real)
        for n in DR_LENGTHS:
            try:
                out[f"dr{n}"] = motion.degradation_rate([g for g, _ in pairs], [r for _, r in pairs], n)
            except ValueError as error:
                notes.append(str(error))
    for clip_length in frechet.FVD_CLIP_LENGTHS:
        pairs = [s.features[f"i3d{clip_length}"] for s in scores if f"i3d{clip_length}" in s.features]
        if pairs:
            generated, real = (np.concatenate(side) for side in zip(*pairs))
            if min(len(generated), len(real)) >= 2:
                out[f"fvd{clip_length}"] = frechet.frechet_distance_features(generated, real)
            else:
                notes.append(f"FVD{clip_length} needs at least 2 clips of {clip_length} frames")
    out["notes"] = notes
    return out


def mean_row(rows: list[dict]) -> dict:
    """Mean of each column over the videos where it is known (None where it is known for none)."""
    out = {"id": "mean"}
    for name in COLUMNS:
        values = [r[name] for r in rows if r[name] is not None and not (isinstance(r[name], float) and
                                                                          math.isnan(r[name]))]
        out[name] = float(np.mean(values)) if values else None
    return out


# ----------------------------------------------------------------------------------------------------
# Reports

def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.4g}"


def markdown_report(rows: list[dict], mean: dict, set_level: dict, header: dict) -> str:
    """The metrics table (one row per video + the mean) and the set-level metrics as markdown."""
    columns = ["id", *[c for c in COLUMNS if any(r[c] is not None for r in rows)]]
    lines = ["# dawn evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in [*rows, mean]:
        cells = [row["id"] if c == "id" else _fmt(row[c]) for c in columns]
        if row is mean:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    known = {k: v for k, v in set_level.items() if k in SET_COLUMNS and v is not None}
    if known:
        lines += ["", "| " + " | ".join(known) + " |", "|" + "---|" * len(known),
                  "| " + " | ".join(_fmt(v) for v in known.values()) + " |"]
    lines += ["", "Columns:", ""] + [f"- {c}: {COLUMNS[c]}" for c in columns[1:]]
    lines += [f"- {c}: {d}" for c, d in (("fid", "FID, InceptionV3 pool3, all frames"),
                                         ("fvd16", "FVD over 16-frame clips (I3D)"),
                                         ("fvd32", "FVD over 32-frame clips (I3D)"),
                                         ("dr25", "degradation rate, last vs first 25 frames"),
                                         ("dr50", "degradation rate, last vs first 50 frames")) if c in known]
    return "\n".join(lines) + "\n"


def plot_video(score: VideoScore, plots_dir: Path) -> list[Path]:
    """<id>_lipsync.png (mouth opening vs speech envelope) and <id>_pose.png (yaw / pitch / roll: generated,
    ground truth, requested) for one video. Returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots_dir.mkdir(parents=True, exist_ok=True)
    video_id, tracks, written = score.row["id"], score.tracks, []
    seconds = np.arange(len(tracks["envelope"])) / FPS

    figure = Figure(figsize=(10, 3.2), tight_layout=True)
    axis = figure.add_subplot()
    axis.plot(seconds, tracks["envelope"], color="tab:gray", label="speech envelope (RMS)")
    axis.set_xlabel("time (s)")
    axis.set_ylabel("speech envelope")
    mouth_axis = axis.twinx()
    if tracks["mouth"] is not None:
        mouth_axis.plot(seconds[:len(tracks["mouth"])], tracks["mouth"], color="tab:red", label="mouth (generated)")
    if tracks["real_mouth"] is not None:
        mouth_axis.plot(seconds[:len(tracks["real_mouth"])], tracks["real_mouth"], color="tab:blue", alpha=0.7,
                        label="mouth (ground truth)")
    mouth_axis.set_ylabel("mouth opening (gap / width)")
    handles = axis.get_legend_handles_labels()[0] + mouth_axis.get_legend_handles_labels()[0]
    axis.legend(handles=handles, loc="upper right", fontsize=8)
    axis.set_title(f"{video_id}: lip-sync proxy {_fmt(score.row['lipsync'])} (lag {_fmt(score.row['lipsync_lag'])})")
    written.append(plots_dir / f"{video_id}_lipsync.png")
    FigureCanvasAgg(figure).print_png(str(written[-1]))

    figure = Figure(figsize=(10, 6), tight_layout=True)
    axes = figure.subplots(3, 1, sharex=True)
    for k, (axis, angle) in enumerate(zip(axes, ANGLES)):
        for name, label, colour in (("pose", "generated (measured)", "tab:red"), ("real_pose", "ground truth",
                                                                                 "tab:blue"),
                                    ("requested_pose", "requested (PBNet / driving video)", "tab:green")):
            if tracks[name] is not None:
                axis.plot(np.arange(len(tracks[name])) / FPS, tracks[name][:, k], color=colour, label=label,
                          linestyle="--" if name == "requested_pose" else "-")
        axis.set_ylabel(f"{angle} (deg)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"{video_id}: head pose (corr with ground truth {_fmt(score.row['pose_corr'])}; jitter "
                      f"{_fmt(score.row['pose_jitter'])} deg/s^2, ground truth {_fmt(score.row['pose_jitter_gt'])})")
    axes[-1].set_xlabel("time (s)")
    written.append(plots_dir / f"{video_id}_pose.png")
    FigureCanvasAgg(figure).print_png(str(written[-1]))
    return written


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class EvaluationResult:
    rows: list[dict]
    mean: dict
    set_metrics: dict
    json_path: Path
    markdown_path: Path
    plots: list[Path]
    mlflow_run_id: str | None


def log_to_mlflow(result: EvaluationResult, out: Path, params: dict, tracking_uri: str | None,
                  experiment: str, run_name: str | None) -> str:
    """One MLflow run: params, the mean and set-level metrics, per-video metrics as steps, and the table and
    plots as artifacts. Default tracking URI: sqlite:///OUT/mlflow.db (artifacts under OUT/mlartifacts)."""
    import mlflow

    uri = tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = (out / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"dawn.task": "evaluation"})
    run_id = run.info.run_id
    try:
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:500])
        for name, value in {**result.mean, **result.set_metrics}.items():
            if name in COLUMNS or name in SET_COLUMNS:
                if value is not None:
                    client.log_metric(run_id, name if name in SET_COLUMNS else f"mean_{name}", float(value))
        for step, row in enumerate(result.rows):
            for name in COLUMNS:
                if row[name] is not None and not (isinstance(row[name], float) and math.isnan(row[name])):
                    client.log_metric(run_id, f"video_{name}", float(row[name]), step=step)
        client.log_artifact(run_id, str(result.json_path))
        client.log_artifact(run_id, str(result.markdown_path))
        if result.plots:
            client.log_artifacts(run_id, str(result.plots[0].parent), artifact_path="plots")
        client.set_terminated(run_id)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def evaluate_items(items: Iterable[EvalItem], out: str | Path, networks: MetricNetworks | None = None,
                   settings: EvaluationSettings | None = None, params: dict | None = None,
                   tracking_uri: str | None = None, experiment: str = "dawn-evaluation",
                   run_name: str | None = None, mlflow: bool = True, progress=print) -> EvaluationResult:
    """Score every item, write OUT/metrics.json, OUT/metrics.md, OUT/plots/*.png (and OUT/videos/*.mp4 when
    settings.save_videos), and log them to MLflow. Returns the table, its mean row and the set metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    networks = networks or MetricNetworks()
    settings = settings or EvaluationSettings()
    scores, plots, started = [], [], time.perf_counter()
    for item in items:
        if settings.save_videos:
            from dawn.video import write_mp4

            write_mp4(out / "videos" / f"{item.id}.mp4", item.frames, fps=FPS, audio=item.waveform)
        score = score_item(item, networks, settings.identity_frames)
        plots += plot_video(score, out / "plots")
        scores.append(score)
        if progress:
            progress(f"{item.id}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in score.row.items()
                                                 if k != "id" and v is not None))
    if not scores:
        raise DawnError("nothing to evaluate: no test videos found")
    rows = [s.row for s in scores]
    mean, set_level = mean_row(rows), set_metrics(scores)
    header = {"videos": len(rows), "seconds": round(time.perf_counter() - started, 1), **(params or {})}
    report = {"settings": _jsonable(asdict(settings)), "params": _jsonable(params or {}), "columns": COLUMNS,
              "videos": _jsonable(rows), "mean": _jsonable(mean), "set": _jsonable(set_level),
              "details": {s.row["id"]: _jsonable(s.details) for s in scores},
              "tracks": {s.row["id"]: _jsonable({k: v for k, v in s.tracks.items() if v is not None})
                         for s in scores}}
    json_path, markdown_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(report, indent=1))
    markdown_path.write_text(markdown_report(rows, mean, set_level, header))
    result = EvaluationResult(rows=rows, mean=mean, set_metrics=set_level, json_path=json_path,
                              markdown_path=markdown_path, plots=plots, mlflow_run_id=None)
    if mlflow:
        result.mlflow_run_id = log_to_mlflow(result, out, {**asdict(settings), **(params or {})}, tracking_uri,
                                             experiment, run_name)
    return result


# ----------------------------------------------------------------------------------------------------
# Command line (jobs/evaluate.py and `dawn evaluate`)

def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="preprocessed shards folder: render and score its test split")
    source.add_argument("--manifest", help="CSV/JSONL manifest (id, portrait, audio, pose_video, seed) to render")
    source.add_argument("--videos", help="folder of already rendered .mp4 files (with audio) to score")
    parser.add_argument("--out", required=True, help="output folder (metrics.json, metrics.md, plots/, videos/)")
    parser.add_argument("--checkpoints", help="dawn checkpoint folder (needed with --shards / --manifest)")
    parser.add_argument("--hubert", help="HuBERT folder for --manifest (default CHECKPOINTS/hubert)")
    parser.add_argument("--reference", help="with --videos: folder of ground-truth videos with the same names")
    parser.add_argument("--inception", help="FID InceptionV3 weights pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--i3d", help="FVD I3D weights i3d_pretrained_400.pt")
    parser.add_argument("--syncnet", help="SyncNet weights syncnet_v2.model (LSE-C / LSE-D)")
    parser.add_argument("--arcface", help="ArcFace IResNet-50 weights backbone.pth (CSIM)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm-solver++"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-frames", type=int, default=200, help="frames per video (default 200; 0 = all)")
    parser.add_argument("--max-videos", type=int, default=None, help="score at most this many videos")
    parser.add_argument("--ground-truth-motion", action="store_true",
                        help="with --shards: drive the renderer with the ground-truth pose/blink (no PBNet)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-videos", action="store_true", help="do not write the rendered mp4s")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    parser.add_argument("--experiment", default="dawn-evaluation", help="MLflow experiment name")
    parser.add_argument("--run-name", help="MLflow run name")


def run_from_args(args) -> EvaluationResult:
    """Build the items from the parsed arguments, evaluate them, print where the results are."""
    settings = EvaluationSettings(steps=args.steps, sampler=args.sampler, seed=args.seed,
                                  max_frames=args.max_frames or None, max_videos=args.max_videos,
                                  ground_truth_motion=args.ground_truth_motion, device=args.device,
                                  save_videos=not args.no_videos and not args.videos)
    weights = MetricWeights(inception=args.inception, i3d=args.i3d, syncnet=args.syncnet, arcface=args.arcface)
    networks = MetricNetworks.load(weights, args.device)  # fail on a bad weight file before rendering
    params = {"source": "shards" if args.shards else "manifest" if args.manifest else "videos",
              "input": args.shards or args.manifest or args.videos, "checkpoints": args.checkpoints,
              **{f"weights_{k}": v for k, v in asdict(weights).items() if v}}
    if args.videos:
        items = video_items(args.videos, args.reference, settings.max_frames, settings.max_videos)
    else:
        from dawn.pipeline import STAGES, RenderPipeline

        if not args.checkpoints:
            raise DawnError("--checkpoints DIR is needed to render --shards or --manifest")
        if args.shards:
            stages = ("frames",) if args.ground_truth_motion else ("motion", "frames")
            pipeline = RenderPipeline.from_checkpoints(args.checkpoints, stages=stages, device=args.device)
            items = shard_items(args.shards, pipeline, settings)
        else:
            pipeline = RenderPipeline.from_checkpoints(args.checkpoints, hubert_dir=args.hubert, device=args.device,
                                                       stages=STAGES)
            items = manifest_items(args.manifest, pipeline, settings)
    result = evaluate_items(items, args.out, networks, settings, params, tracking_uri=args.tracking_uri,
                            experiment=args.experiment, run_name=args.run_name)
    print(result.markdown_path.read_text())
    print(f"wrote {result.json_path}, {result.markdown_path} and {len(result.plots)} plots; "
          f"MLflow run {result.mlflow_run_id}")
    return result


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score rendered talking heads (paper §4.1 metrics + proxies)")
    add_arguments(parser)
    parser.set_defaults(func=_evaluate_command)


def _evaluate_command(args) -> int:
    run_from_args(args)
    return 0
