"""Video out and in: H.264 + AAC mp4 writing (PyAV), frame reading (decord), probing (PyAV).

Frames are uint8 RGB (T, H, W, 3); audio is float32 mono at 16 kHz.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

from dawn import DawnError
from dawn.config import FPS, SAMPLE_RATE


def _batches(frames: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    if isinstance(frames, np.ndarray):
        yield frames
    else:
        yield from frames


def write_mp4(path: str | Path, frames: np.ndarray | Iterable[np.ndarray], fps: int = FPS,
              audio: np.ndarray | None = None, crf: int = 18, preset: str = "medium",
              sample_rate: int = SAMPLE_RATE) -> Path:
    """Write uint8 RGB frames (T, H, W, 3), or an iterable of such batches, as an H.264/yuv420p mp4.

    `audio` (float32 mono at `sample_rate`) is encoded as AAC next to the frames, cut or zero-padded to the
    video's duration (T / fps). Odd frame sides are padded by one replicated row/column (yuv420p needs even
    sides). The file appears atomically: written to a temporary file in the same folder, then renamed; on
    any error the temporary file is removed and nothing is left at `path`.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.mp4", dir=path.parent)
    os.close(handle)
    try:
        with av.open(temp_name, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            video = None
            if audio is not None:
                audio = np.asarray(audio, dtype=np.float32).reshape(-1)
                sound = container.add_stream("aac", rate=sample_rate, layout="mono")
            written = 0  # frames so far
            for batch in _batches(frames):
                batch = np.asarray(batch)
                if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
                    raise ValueError(f"frames must be uint8 (T, H, W, 3), got {batch.dtype} {batch.shape}")
                pad_h, pad_w = batch.shape[1] % 2, batch.shape[2] % 2
                if pad_h or pad_w:
                    batch = np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                if video is None:
                    video = container.add_stream("libx264", rate=fps)
                    video.width, video.height = batch.shape[2], batch.shape[1]
                    video.pix_fmt = "yuv420p"
                    video.options = {"crf": str(crf), "preset": preset}
                elif (batch.shape[2], batch.shape[1]) != (video.width, video.height):
                    raise ValueError(f"frame size changed from {video.width}x{video.height} to "
                                     f"{batch.shape[2]}x{batch.shape[1]}")
                for image in batch:
                    container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                if audio is not None:  # the audio of the same time span, interleaved with the video
                    _encode_audio(container, sound, audio, written, written + len(batch), fps, sample_rate)
                written += len(batch)
            if video is None or written == 0:
                raise ValueError("no frames to write")
            container.mux(video.encode(None))
            if audio is not None:
                container.mux(sound.encode(None))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def _encode_audio(container, stream, audio: np.ndarray, first_frame: int, end_frame: int, fps: int,
                  sample_rate: int) -> None:
    """Encode the audio samples of video frames [first_frame, end_frame), zero-padded past its end."""
    import av

    start, stop = first_frame * sample_rate // fps, end_frame * sample_rate // fps
    samples = np.zeros(stop - start, dtype=np.float32)
    available = audio[start:stop]
    samples[:len(available)] = available
    frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
    container.mux(stream.encode(frame))


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video with decord: ((T, H, W, 3) uint8 RGB, frames per second)."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise DawnError(f"video file not found: {path}")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        if len(reader) == 0:
            raise DawnError(f"{path} contains no video frames")
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        fps = float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError) as error:
        raise DawnError(f"cannot decode the video {path}: {error}") from error
    return frames, fps


def probe(path: str | Path) -> dict:
    """Container facts from PyAV: frames, fps, width, height, duration (s), has_audio, audio_duration (s),
    video_codec, audio_codec (None where there is no such stream). Frames are counted by demuxing."""
    import av

    path = Path(path)
    if not path.is_file():
        raise DawnError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DawnError(f"{path} has no video stream")
            video = container.streams.video[0]
            audio = container.streams.audio[0] if container.streams.audio else None
            frames, audio_end = 0, 0.0
            for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                if packet.size == 0 or packet.pts is None:
                    continue
                if packet.stream is video:
                    frames += 1
                else:
                    audio_end = max(audio_end, float((packet.pts + packet.duration) * packet.time_base))
            if video.frames > frames:
                raise DawnError(f"{path} is truncated: its header lists {video.frames} video frames, "
                                f"only {frames} are present")
            fps = float(video.average_rate) if video.average_rate else 0.0
            info = dict(frames=frames, fps=fps, width=video.codec_context.width, height=video.codec_context.height,
                        duration=frames / fps if fps else 0.0, has_audio=audio is not None,
                        audio_duration=None, video_codec=video.codec_context.name,
                        audio_codec=audio.codec_context.name if audio is not None else None)
            if audio is not None:
                start = float(audio.start_time * audio.time_base) if audio.start_time is not None else 0.0
                info["audio_duration"] = audio_end - start
    except DawnError:
        raise
    except (av.FFmpegError, ValueError) as error:
        raise DawnError(f"cannot read the video {path}: {error}") from error
    if frames == 0:
        raise DawnError(f"{path} contains no video frames")
    return info
