"""Visual budget operators (resize, frame selection) and exact visual-token accounting.

The operators act on decoded frames *before* the unchanged Qwen-VL processor sees them, so the backbone
keeps its native token interface (design decision 1). Qwen2.5-VL fuses `temporal_patch_size` consecutive
frames into one temporal patch and gives all frames of one video item one size, so a per-frame allocation
is applied per chunk of `temporal_patch_size` frames (scale = mean of its frames' scales) and every chunk
becomes its own video item. Tokens are counted exactly as the processor's `video_grid_thw` will count them,
and retention is always measured against the same frames unmodified (design decision 2), never estimated
from the mean scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from resadapt.processing import smart_resize

__all__ = [
    "VisionGeometry",
    "TransformedVideo",
    "scaled_size",
    "chunk_scales",
    "resize_video",
    "resize_image",
    "select_topk",
    "select_threshold",
    "select_chunks_topk",
    "frames_of_chunks",
    "drop_frames",
    "video_tokens",
    "image_tokens",
    "retention",
    "retention_of_tokens",
    "uniform_scale_for_retention",
]

# Qwen's reference pixel limits (reference-implementation.md §2.3): videos 768 tokens, images 16384 tokens.
_VIDEO_MAX_PIXELS = 768 * 28 * 28
_IMAGE_MAX_PIXELS = 16384 * 28 * 28
_MIN_PIXELS = 56 * 56
# smart_resize may not be idempotent for extreme aspect ratios (a side clamped to `factor` keeps the area
# above max_pixels); we iterate it to a fixed point so the processor never resizes our output again.
_MAX_FIXED_POINT_STEPS = 16


@dataclass(frozen=True)
class VisionGeometry:
    """Patch geometry and pixel limits of a Qwen-VL vision processor: all the token arithmetic needs.

    Defaults are Qwen2.5-VL's with the reference implementation's limits (video max 768 tokens, image max
    16384 tokens, min 56x56 pixels). Use `from_processor` to read the limits a real processor applies.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = _MIN_PIXELS
    max_pixels: int = _VIDEO_MAX_PIXELS
    image_min_pixels: int = _MIN_PIXELS
    image_max_pixels: int = _IMAGE_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "merge_size",
            "temporal_patch_size",
            "min_pixels",
            "max_pixels",
            "image_min_pixels",
            "image_max_pixels",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VisionGeometry.{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"VisionGeometry.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})"
            )
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(
                f"VisionGeometry.image_min_pixels ({self.image_min_pixels}) exceeds "
                f"image_max_pixels ({self.image_max_pixels})"
            )

    @property
    def factor(self) -> int:
        """Side multiple of a resized frame: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def pixel_limits(self, image: bool = False) -> tuple[int, int]:
        """(min_pixels, max_pixels) for images or videos."""
        if image:
            return self.image_min_pixels, self.image_max_pixels
        return self.min_pixels, self.max_pixels

    @classmethod
    def from_processor(cls, processor: Any) -> VisionGeometry:
        """Read the geometry from a Qwen-VL processor (its `video_processor` and `image_processor`).

        Reading the limits from the processor that will encode the frames keeps the accounting exact
        for any checkpoint (tiny, 7B, Qwen3-VL with patch 16).
        """
        vp = getattr(processor, "video_processor", None)
        ip = getattr(processor, "image_processor", None)
        if vp is None or ip is None:
            raise ValueError(
                f"processor {type(processor).__name__} needs both a video_processor and an image_processor"
            )
        video_patch = int(vp.patch_size)
        video_merge = int(vp.merge_size)
        image_patch = int(getattr(ip, "patch_size", video_patch))
        image_merge = int(getattr(ip, "merge_size", video_merge))
        if (image_patch, image_merge) != (video_patch, video_merge):
            raise ValueError(
                f"processor: image patch/merge ({image_patch}/{image_merge}) differ from video "
                f"({video_patch}/{video_merge}); one VisionGeometry cannot describe both"
            )
        v_min, v_max = _limits_of(vp, "video_processor")
        i_min, i_max = _limits_of(ip, "image_processor")
        return cls(
            patch_size=video_patch,
            merge_size=video_merge,
            temporal_patch_size=int(vp.temporal_patch_size),
            min_pixels=v_min,
            max_pixels=v_max,
            image_min_pixels=i_min,
            image_max_pixels=i_max,
        )


def _limits_of(proc: Any, name: str) -> tuple[int, int]:
    """(min, max) pixels of a processor: `size` (shortest/longest edge) first, then min/max_pixels attrs."""
    size = getattr(proc, "size", None)

    def from_size(key: str) -> Any:
        if size is None:
            return None
        if isinstance(size, dict):
            return size.get(key)
        return getattr(size, key, None)

    lo = from_size("shortest_edge") or getattr(proc, "min_pixels", None)
    hi = from_size("longest_edge") or getattr(proc, "max_pixels", None)
    if lo is None or hi is None:
        raise ValueError(
            f"processor.{name} has no pixel limits (size shortest_edge/longest_edge or min/max_pixels)"
        )
    return int(lo), int(hi)


def _check_scale(scale: float, name: str = "scale") -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {scale!r}")
    return value


def _fixed_point_resize(height: int, width: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    """smart_resize applied until its output no longer changes (the processor then keeps it as is)."""
    h, w = smart_resize(height, width, factor, lo, hi)
    for _ in range(_MAX_FIXED_POINT_STEPS):
        nh, nw = smart_resize(h, w, factor, lo, hi)
        if (nh, nw) == (h, w):
            return h, w
        h, w = nh, nw
    raise ValueError(
        f"size {height}x{width} has no stable Qwen resize with factor {factor} and pixels [{lo}, {hi}]"
    )


def scaled_size(
    height: int, width: int, scale: float, geom: VisionGeometry, image: bool = False
) -> tuple[int, int]:
    """Size a frame of `height` x `width` gets at `scale`, exactly as the backbone will encode it.

    Reference rule (reference-implementation.md §2.3): h' = max(patch, floor(H*s)), w' likewise, then
    Qwen's smart_resize (sides multiples of `factor`, area clamped into the pixel limits). The result is
    iterated to a fixed point of smart_resize, which only differs from the reference for aspect ratios
    where a clamped side keeps the area over the cap; there the processor would otherwise resize again.
    """
    s = _check_scale(scale)
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"frame size must be positive, got height={height}, width={width}")
    h = max(geom.patch_size, math.floor(int(height) * s))
    w = max(geom.patch_size, math.floor(int(width) * s))
    lo, hi = geom.pixel_limits(image)
    return _fixed_point_resize(h, w, geom.factor, lo, hi)


def _tokens_of_size(num_frames: int, height: int, width: int, geom: VisionGeometry) -> int:
    """Merged tokens of one video item of `num_frames` frames already at a processor-stable size."""
    f = geom.factor
    return math.ceil(num_frames / geom.temporal_patch_size) * (height // f) * (width // f)


def _as_float_array(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def chunk_scales(frame_scales: Sequence[float] | np.ndarray, temporal_patch_size: int) -> list[float]:
    """One scale per chunk of `temporal_patch_size` consecutive frames: the mean of its frames' scales.

    The backbone fuses those frames into one temporal patch of one size, so a chunk is the finest unit a
    resize can act on. The last chunk may be shorter.
    """
    if int(temporal_patch_size) < 1:
        raise ValueError(f"temporal_patch_size must be >= 1, got {temporal_patch_size}")
    scales = _as_float_array(frame_scales, "frame_scales")
    tp = int(temporal_patch_size)
    return [float(scales[i : i + tp].mean()) for i in range(0, len(scales), tp)]


@dataclass
class TransformedVideo:
    """A video after a budget operator: one video item per chunk, ready for the processor.

    `chunks[k]` is a (t, h, w, 3) uint8 array already at a processor-stable size, so the processor encodes
    it without resizing again and `visual_tokens` is exactly what the LLM receives.
    """

    chunks: list[np.ndarray]
    chunk_frame_indices: list[list[int]]
    chunk_sizes: list[tuple[int, int]]
    chunk_scales: list[float]
    original_size: tuple[int, int]
    geom: VisionGeometry = field(default_factory=VisionGeometry)
    num_input_frames: int | None = None  # frames of the input video (None: those in the chunks)

    @property
    def tokens_per_chunk(self) -> list[int]:
        """Merged visual tokens of each chunk: ceil(t/tp) * (h/factor) * (w/factor)."""
        return [
            _tokens_of_size(len(c), h, w, self.geom)
            for c, (h, w) in zip(self.chunks, self.chunk_sizes, strict=True)
        ]

    @property
    def visual_tokens(self) -> int:
        """Total visual tokens the LLM gets for this video (the sum over its chunk items)."""
        return sum(self.tokens_per_chunk)

    @property
    def frame_indices(self) -> list[int]:
        """Input positions of every kept frame, in time order."""
        return [i for idx in self.chunk_frame_indices for i in idx]

    @property
    def input_frames(self) -> int:
        """Number of frames the input video had (the retention reference)."""
        return self.num_input_frames if self.num_input_frames is not None else len(self.frame_indices)

    def reference_tokens(self, geom: VisionGeometry | None = None) -> int:
        """Tokens of the whole input video unmodified (every frame, scale 1, same chunking)."""
        g = geom or self.geom
        h, w = self.original_size
        return video_tokens(self.input_frames, h, w, g)


def _check_frames(frames: Any, name: str = "frames") -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (T, H, W, 3) uint8, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"{name} must be a (T, H, W, 3) uint8 array, got shape {frames.shape} dtype {frames.dtype}"
        )
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"{name} must hold at least one non-empty frame, got shape {frames.shape}")
    return frames


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic PIL resize of (t, H, W, 3) uint8 frames, as Qwen's PIL processors do; no-op at same size."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in frames]
    )


def _chunked(
    frames: np.ndarray,
    positions: list[int],
    scales: list[float],
    geom: VisionGeometry,
    num_input_frames: int,
) -> TransformedVideo:
    """Resize frames[positions] in chunks of temporal_patch_size, chunk k at scales[k]."""
    height, width = int(frames.shape[1]), int(frames.shape[2])
    tp = geom.temporal_patch_size
    chunks, indices, sizes = [], [], []
    for k, start in enumerate(range(0, len(positions), tp)):
        idx = positions[start : start + tp]
        h, w = scaled_size(height, width, scales[k], geom)
        chunks.append(_resize(frames[idx], h, w))
        indices.append(list(idx))
        sizes.append((h, w))
    return TransformedVideo(
        chunks=chunks,
        chunk_frame_indices=indices,
        chunk_sizes=sizes,
        chunk_scales=list(scales),
        original_size=(height, width),
        geom=geom,
        num_input_frames=num_input_frames,
    )


def resize_video(
    frames: np.ndarray, frame_scales: Sequence[float] | np.ndarray, geom: VisionGeometry
) -> TransformedVideo:
    """Apply a per-frame allocation: chunk k of temporal_patch_size frames is resized by its mean scale.

    This is the ResAdapt operator: the Allocator predicts per frame, the backbone can only change size
    per temporal patch, so each chunk becomes its own video item at `scaled_size(H, W, mean scale)`.
    """
    frames = _check_frames(frames)
    scales = _as_float_array(frame_scales, "frame_scales")
    if len(scales) != frames.shape[0]:
        raise ValueError(f"frame_scales has {len(scales)} entries but frames has {frames.shape[0]} frames")
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError(f"frame_scales must be positive and finite, got min {np.nanmin(scales)!r}")
    per_chunk = chunk_scales(scales, geom.temporal_patch_size)
    return _chunked(frames, list(range(frames.shape[0])), per_chunk, geom, frames.shape[0])


def resize_image(image: np.ndarray, scale: float, geom: VisionGeometry) -> tuple[np.ndarray, int]:
    """Resize one (H, W, 3) uint8 image by `scale` with the image pixel limits; returns (image, tokens)."""
    if (
        not isinstance(image, np.ndarray)
        or image.ndim != 3
        or image.shape[-1] != 3
        or image.dtype != np.uint8
    ):
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"image must be a (H, W, 3) uint8 array, got shape {shape} dtype {getattr(image, 'dtype', None)}"
        )
    h, w = scaled_size(image.shape[0], image.shape[1], scale, geom, image=True)
    out = _resize(image[None], h, w)[0]
    return out, (h // geom.factor) * (w // geom.factor)


def _check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    arr = _as_float_array(scores, name)
    if len(arr) == 0:
        raise ValueError(f"{name} is empty: nothing to select from")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def select_topk(scores: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores in time order (ties: earlier index first; k clipped to [1, len]).

    Frame selection is the zero-budget limit of resizing (a dropped frame costs nothing); keeping at least
    one frame means the model always sees something.
    """
    arr = _check_scores(scores)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = min(max(int(k), 1), len(arr))
    order = np.argsort(-arr, kind="stable")  # stable: equal scores keep time order
    return sorted(int(i) for i in order[:k])


def select_threshold(scores: Sequence[float] | np.ndarray, threshold: float) -> list[int]:
    """Indices whose score is >= threshold, in time order.

    If no score reaches the threshold the single best (earliest on ties) is kept, so the model still sees
    one frame instead of an empty video the processor cannot encode.
    """
    arr = _check_scores(scores)
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold must not be NaN")
    keep = [int(i) for i in np.flatnonzero(arr >= t)]
    return keep or [int(np.argmax(arr))]


def select_chunks_topk(chunk_scores: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """Indices of the k best chunks (temporal patches), in time order; use `frames_of_chunks` to expand.

    Selecting whole chunks keeps the surviving frames on the backbone's temporal-patch grid.
    """
    return select_topk(_check_scores(chunk_scores, "chunk_scores"), k)


def frames_of_chunks(chunk_indices: Sequence[int], num_frames: int, temporal_patch_size: int) -> list[int]:
    """Frame positions covered by the given chunks of a `num_frames` video (last chunk may be short)."""
    tp = int(temporal_patch_size)
    n_chunks = math.ceil(int(num_frames) / tp)
    out: list[int] = []
    for c in sorted(set(int(c) for c in chunk_indices)):
        if not 0 <= c < n_chunks:
            raise ValueError(f"chunk index {c} out of range for {num_frames} frames ({n_chunks} chunks)")
        out.extend(range(c * tp, min((c + 1) * tp, int(num_frames))))
    return out


def drop_frames(
    frames: np.ndarray, keep_indices: Sequence[int], geom: VisionGeometry, scale: float = 1.0
) -> TransformedVideo:
    """Keep only `keep_indices` (grouped in time order into chunks of temporal_patch_size), all at `scale`.

    Retention of the result is measured against the whole input video, so dropping half the chunks at
    scale 1 reports about 0.5.
    """
    frames = _check_frames(frames)
    s = _check_scale(scale)
    idx = [int(i) for i in np.asarray(keep_indices).reshape(-1)]
    if not idx:
        raise ValueError("keep_indices is empty: keep at least one frame")
    if len(set(idx)) != len(idx):
        raise ValueError(f"keep_indices has duplicates: {sorted(idx)}")
    bad = [i for i in idx if not 0 <= i < frames.shape[0]]
    if bad:
        raise ValueError(f"keep_indices {bad} out of range for {frames.shape[0]} frames")
    idx.sort()
    n_chunks = math.ceil(len(idx) / geom.temporal_patch_size)
    return _chunked(frames, idx, [s] * n_chunks, geom, frames.shape[0])


def video_tokens(num_frames: int, height: int, width: int, geom: VisionGeometry, scale: float = 1.0) -> int:
    """Tokens of a `num_frames` video of `height` x `width` at a uniform scale: ceil(T/tp)*(h/f)*(w/f)."""
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    h, w = scaled_size(height, width, scale, geom)
    return _tokens_of_size(int(num_frames), h, w, geom)


def image_tokens(height: int, width: int, geom: VisionGeometry, scale: float = 1.0) -> int:
    """Tokens of one image of `height` x `width` at `scale` (image pixel limits)."""
    h, w = scaled_size(height, width, scale, geom, image=True)
    return (h // geom.factor) * (w // geom.factor)


def retention_of_tokens(tokens: int, reference_tokens: int) -> float:
    """tokens / reference_tokens, with both checked (a retention is only meaningful against a positive reference)."""
    if reference_tokens <= 0:
        raise ValueError(f"reference_tokens must be positive, got {reference_tokens}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return float(tokens) / float(reference_tokens)


def retention(transformed: TransformedVideo, geom: VisionGeometry) -> float:
    """Measured retention: visual tokens fed / tokens of the whole input video unmodified.

    For `resize_video` the reference is every chunk at scale 1 with the same chunking; for `drop_frames`
    it also counts the dropped frames, since they are part of the unmodified input.
    """
    return retention_of_tokens(transformed.visual_tokens, transformed.reference_tokens(geom))


def uniform_scale_for_retention(
    target: float,
    height: int,
    width: int,
    num_frames: int,
    geom: VisionGeometry,
    max_scale: float = 1.0,
) -> float:
    """Largest uniform scale in (0, max_scale] whose measured retention is <= target (FixedScale baselines).

    The size at scale s depends on s only through floor(H*s) and floor(W*s), so retention is a step
    function that can change only at s = k/H or k/W. We evaluate every step in (0, max_scale] (at the
    pixel cap and in smart_resize's min_pixels branch retention is not monotone, so no bisection) and return a point just below the lower
    end of the first step above the chosen one (at most 1e-6 below, so a float32 round trip stays in the
    step). Raises ValueError when even the smallest scale keeps more than `target`.
    """
    t = float(target)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"target must be a positive finite retention, got {target!r}")
    top = _check_scale(max_scale, "max_scale")
    height, width, num_frames = int(height), int(width), int(num_frames)
    ref = video_tokens(num_frames, height, width, geom)

    def ret(s: float) -> float:
        return video_tokens(num_frames, height, width, geom, s) / ref

    if ret(top) <= t:
        return top
    points = {0.0, top}
    for side in (height, width):
        points.update(k / side for k in range(1, math.floor(side * top) + 1))
    grid = sorted(p for p in points if p <= top)
    for lo, hi in zip(reversed(grid[:-1]), reversed(grid[1:]), strict=True):
        if hi - lo <= 0:
            continue
        if ret((lo + hi) / 2) <= t:
            s = hi - min((hi - lo) / 2, 1e-6)
            return s if ret(s) <= t else (lo + hi) / 2
    raise ValueError(
        f"target retention {t} is below the smallest reachable retention {ret(grid[1] / 2):.4f} "
        f"for {num_frames} frames of {height}x{width}"
    )
