"""Lossless MP4 writing and frame-sampled reading with PyAV.

The benchmark draws 6x10-pixel digits and 1-2 px structures into frames that a
model must read back after decoding, so the writer must not blur them: a
lossy or chroma-subsampled codec (e.g. H.264 yuv420p) smears thin coloured
strokes. Readers decode sequentially and keep only the sampled frames, so any
MP4 works (not only ours), including streams whose header frame count is 0.

Codec choice (measured with PyAV 18.1.0 on an 8-frame 128x160 clip of black
1-px digit strokes on white, saturated 2-px coloured borders and a moving
magenta square, round trip RGB -> MP4 -> RGB):

==========================================  =========  ==========
encoder / pix_fmt / options                 max |err|  mean |err|
==========================================  =========  ==========
libx264rgb / rgb24 / qp=0   (chosen)        0          0.0
libx264    / yuv444p / qp=0 (or crf=0)      1          0.0154
libx265    / yuv444p / lossless=1           1          0.0154
libx264    / yuv420p / crf=0                160        1.40
mpeg4      / yuv420p / qscale=1             183        2.25
==========================================  =========  ==========

``libx264rgb`` with ``qp=0`` encodes the RGB planes directly (H.264 High 4:4:4
Predictive, decoded as ``gbrp``), so the round trip is bit-exact, also on
uniform random noise and on odd frame sizes (63x65 tested). Any FFmpeg-based
decoder (PyAV, decord, torchcodec, OpenCV) reads it; some browsers do not.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = [
    "ENCODER",
    "MEASURED_MAX_ABS_ERROR",
    "VideoError",
    "VideoInfo",
    "VideoMetadata",
    "probe_video",
    "read_video",
    "sample_frame_indices",
    "write_video",
]

#: Encoder, pixel format and options used by :func:`write_video` (see module docstring).
ENCODER = "libx264rgb"
_PIX_FMT = "rgb24"
# threads=1 keeps the bytes machine-independent: x264 records its thread count in the stream.
_ENCODER_OPTIONS = {"qp": "0", "threads": "1", "preset": "ultrafast"}
#: Largest per-pixel round-trip error measured for :data:`ENCODER` (bit-exact).
MEASURED_MAX_ABS_ERROR = 0


class VideoError(ValueError):
    """Raised for unreadable/unwritable videos and bad arguments; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    """Stream-level facts about a video file, obtained without decoding pixels."""

    path: Path
    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int


@dataclass(frozen=True)
class VideoMetadata:
    """What a video-LLM processor (e.g. Qwen-VL) needs to place sampled frames in time."""

    fps: float
    total_num_frames: int
    frame_indices: list[int]
    duration_s: float
    timestamps_s: list[float]


def _check_frames(frames: np.ndarray, path: Path) -> None:
    if not isinstance(frames, np.ndarray):
        raise VideoError(f"{path}: frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{path}: frames must have shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise VideoError(f"{path}: frames must be uint8 RGB, got dtype {frames.dtype}")
    if min(frames.shape[:3]) < 1:
        raise VideoError(f"{path}: frames must be non-empty, got shape {frames.shape}")


def write_video(
    path: str | os.PathLike[str], frames: np.ndarray, fps: float, *, overwrite: bool = False
) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 RGB as a bit-exact lossless MP4 and return its path.

    The file is written to a temporary sibling and renamed into place, so a failed
    write never leaves a half-written video at ``path``. Odd H/W are fine for this
    encoder (no chroma subsampling). Parent directories are created.
    """
    path = Path(path)
    _check_frames(frames, path)
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"{path}: fps must be a finite number > 0, got {fps!r}")
    if path.exists() and not overwrite:
        raise VideoError(f"{path}: file exists; pass overwrite=True to replace it")
    if ENCODER not in av.codecs_available:
        raise VideoError(f"{path}: encoder {ENCODER!r} is not available in this PyAV build")

    rate = Fraction(fps).limit_denominator(1_000_000)
    _, height, width, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial.mp4", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(ENCODER, rate=rate)
            stream.width = width
            stream.height = height
            stream.pix_fmt = _PIX_FMT
            stream.time_base = 1 / rate
            stream.options = dict(_ENCODER_OPTIONS)
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: encoding failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sample_frame_indices(num_frames: int, num_samples: int) -> list[int]:
    """Pick ``num_samples`` frames uniformly: the centre frame of each of ``num_samples`` equal segments.

    Centres (rather than segment starts or ``linspace`` endpoints) spread the samples
    symmetrically over the clip. If ``num_samples >= num_frames`` every frame is returned
    once: frames are never duplicated, so the result can be shorter than ``num_samples``.
    The result is sorted, unique and within ``[0, num_frames)``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples >= num_frames:
        return list(range(num_frames))
    # Segments are longer than one frame, so consecutive centres differ by > 1 and floors stay unique.
    return [int((2 * i + 1) * num_frames // (2 * num_samples)) for i in range(num_samples)]


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video container: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: file has no video stream")
    return container


def _stream_fps(stream: av.video.stream.VideoStream, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoError(f"{path}: cannot determine the frame rate")
    return float(rate)


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read stream facts of the first video stream; duration is ``num_frames / fps`` as processors assume.

    Frame count comes from the header, or from a full decode when the header says 0.
    """
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, path)
        num_frames = int(stream.frames)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if num_frames <= 0:
        _, num_frames = _decode_selected(path, [])
    return VideoInfo(path, num_frames, fps, num_frames / fps, width, height)


def _decode_selected(path: Path, wanted: list[int] | None) -> tuple[list[np.ndarray], int]:
    """Decode sequentially, keep frames whose index is in ``wanted`` (all if None); return them and the count."""
    wanted_set = None if wanted is None else set(wanted)
    kept: list[np.ndarray] = []
    count = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if wanted_set is None or count in wanted_set:
                    # gbrp (our lossless RGB encoding) already comes out as RGB; skipping swscale is 3x faster
                    rgb = (
                        frame.to_ndarray()
                        if frame.format.name == "gbrp"
                        else frame.to_ndarray(format="rgb24")
                    )
                    kept.append(rgb)
                count += 1
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: decoding failed after {count} frames: {exc}") from exc
    if count == 0:
        raise VideoError(f"{path}: video stream contains no decodable frames")
    return kept, count


def read_video(
    path: str | os.PathLike[str], num_frames: int | None = None
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode ``num_frames`` uniformly sampled frames (all if None) as (T, H, W, 3) uint8 RGB.

    Sampling follows :func:`sample_frame_indices`. Indices come from the header frame
    count; if decoding finds a different count (header 0 or wrong), the indices are
    recomputed from the decoded count and the file is decoded once more. Reading all
    frames needs a single pass whatever the header says.
    """
    path = Path(path)
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
            raise VideoError(f"{path}: num_frames must be an int >= 1 or None, got {num_frames!r}")
        num_frames = int(num_frames)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, path)
        header_total = int(stream.frames)

    if num_frames is None:
        kept, total = _decode_selected(path, None)
        indices = list(range(total))
    else:
        indices = sample_frame_indices(header_total, num_frames) if header_total > 0 else []
        kept, total = _decode_selected(path, indices)
        if total != header_total:
            indices = sample_frame_indices(total, num_frames)
            kept, recount = _decode_selected(path, indices)
            if recount != total:
                raise VideoError(f"{path}: frame count changed between decodes ({total} vs {recount})")
    if len(kept) != len(indices):
        raise VideoError(f"{path}: decoded {len(kept)} frames, expected {len(indices)}")
    if len({f.shape for f in kept}) != 1:
        raise VideoError(f"{path}: frames have varying sizes, cannot stack")
    metadata = VideoMetadata(
        fps=fps,
        total_num_frames=total,
        frame_indices=indices,
        duration_s=total / fps,
        timestamps_s=[i / fps for i in indices],
    )
    return np.stack(kept), metadata
