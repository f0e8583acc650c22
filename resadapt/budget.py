"""Visual budget operators and all visual-token arithmetic: one home for the heart of the method.

The operators act on decoded frames *before* the unchanged Qwen-VL processor sees them, so the backbone
keeps its native token interface (design decision 1). Qwen2.5-VL fuses `temporal_patch_size` consecutive
frames into one temporal patch and gives all frames of one video item one size, so a per-frame allocation
is applied per chunk of `temporal_patch_size` frames (scale = mean of its frames' scales) and every chunk
becomes its own video item. Tokens are counted exactly as the processor's `video_grid_thw` will count them,
and retention is always measured against the same frames unmodified (design decision 2), never estimated
from the mean scale.

Here: the resize operator (`resize_video`, `resize_image`) and its application to a decoded sample
(`Plan` -> `realise`); token counts (`video_tokens`, `image_tokens`, `allocation_tokens`); retention; the
token saturation scale (above it a scale adds no tokens); the largest scale within a token limit
(`largest_scale`, `uniform_scale_for_retention`); and the hard budget (`hard_budget_scales`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from resadapt.backbone import VisualInput
from resadapt.config import positive_number
from resadapt.data.sample import LoadedSample
from resadapt.processing import smart_resize

__all__ = [
    "VisionGeometry",
    "TransformedVideo",
    "scaled_size",
    "chunk_scales",
    "resize_video",
    "resize_image",
    "video_tokens",
    "image_tokens",
    "retention",
    "retention_of_tokens",
    "uniform_scale_for_retention",
    "scale_breakpoints",
    "largest_scale",
    "image_scale_for_retention",
    "video_scale_for_retention",
    "token_saturation_scale",
    "clip_to_saturation",
    "allocation_tokens",
    "allocation_retention",
    "hard_budget_scales",
    "Plan",
    "Realised",
    "realise",
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
    s = positive_number("scale", scale)
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

    The reference is every input frame at scale 1 with the same chunking, so frames a plan dropped still
    count: they are part of the unmodified input.
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
    top = positive_number("max_scale", max_scale)
    height, width, num_frames = int(height), int(width), int(num_frames)
    ref = video_tokens(num_frames, height, width, geom)

    def ret(s: float) -> float:
        return video_tokens(num_frames, height, width, geom, s) / ref

    if ret(top) <= t:
        return top
    grid = sorted({0.0, top} | scale_breakpoints(height, width, top))
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


# ---------------------------------------------------------------------------------------------------------
# Scales within a token limit. The size at scale s depends on s only through floor(H*s) and floor(W*s), so
# every token count is a step function of s that can change only at s = k/H or k/W.


def scale_breakpoints(height: int, width: int, top: float) -> set[float]:
    """Every scale k/H, k/W in (0, top] at which a `height` x `width` frame's resized size can change."""
    return {k / side for side in (int(height), int(width)) for k in range(1, math.floor(side * top) + 1)}


def largest_scale(
    tokens_of: Callable[[float], int], limit: int, height: int, width: int, top: float = 1.0
) -> float | None:
    """Largest scale in (0, top] with tokens_of(scale) <= limit, or None (checked at every breakpoint)."""
    for s in sorted({top} | scale_breakpoints(height, width, top), reverse=True):
        if tokens_of(s) <= limit:
            return s
    return None


def image_scale_for_retention(target: float, height: int, width: int, geom: VisionGeometry) -> float:
    """Largest image scale whose tokens are <= target * tokens at full size (at least the smallest image)."""
    ref = image_tokens(height, width, geom)
    s = largest_scale(lambda x: image_tokens(height, width, geom, x), math.floor(target * ref), height, width)
    return s if s is not None else 1.0 / max(height, width)


def video_scale_for_retention(
    target: float, height: int, width: int, num_frames: int, geom: VisionGeometry
) -> float:
    """The FixedScale scale: the largest uniform scale whose measured retention is <= target, or the
    processor's smallest frame when even that keeps more."""
    try:
        return uniform_scale_for_retention(target, height, width, num_frames, geom)
    except ValueError:
        return float(geom.min_pixels**0.5 / max(height, width))


@functools.lru_cache(maxsize=4096)
def _saturation(height: int, width: int, geom: VisionGeometry, s_max: float) -> float:
    tp = geom.temporal_patch_size

    def tokens(s: float) -> int:
        return video_tokens(tp, height, width, geom, s)

    # constant on [breakpoint, next breakpoint): one probe per interval
    points = sorted({0.0, s_max} | {p for p in scale_breakpoints(height, width, s_max) if p < s_max})
    candidates = [(lo, tokens((lo + hi) / 2)) for lo, hi in zip(points[:-1], points[1:], strict=True)]
    candidates.append((s_max, tokens(s_max)))
    best = max(t for _, t in candidates)
    lo = next(p for p, t in candidates if t == best)
    if lo == 0.0:
        return 0.0  # no scale in (0, s_max] changes the token count
    s = lo
    for _ in range(8):  # k/side * side may floor to k - 1 in floating point: step just inside the interval
        if tokens(s) == best:
            return s
        s = math.nextafter(s, math.inf)
    return lo + (points[points.index(lo) + 1] - lo) / 2 if lo < s_max else lo


def token_saturation_scale(height: int, width: int, geom: VisionGeometry, s_max: float) -> float:
    """Smallest scale in (0, s_max] at which a `height` x `width` frame reaches its largest token count.

    Above it no scale adds tokens (the frame is at the processor's pixel cap), so the cost proxy and the
    operator clip scales there (design decision 2, reference §8.2). Qwen's smart_resize is *not* monotone at
    the cap (112x112 with max_pixels 112*112: 16 tokens at s=1 but 9 at s=1.34), so this is the smallest
    scale reaching the *maximum* count, not the count at s_max. Exact; cached per (height, width, geom, s_max).
    """
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"frame size must be positive, got height={height}, width={width}")
    return _saturation(int(height), int(width), geom, positive_number("s_max", s_max))


# ---------------------------------------------------------------------------------------------------------
# Per-frame allocations: tokens, retention, saturation clip and the hard budget.

_U_EPS = 1e-6  # the Beta latent is kept in [eps, 1 - eps], as the Allocator and CAPO keep it


def _check_allocation(scales: Any, name: str = "scales") -> np.ndarray:
    if hasattr(scales, "detach"):
        scales = scales.detach().cpu().numpy()
    arr = np.asarray(scales, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D per-frame allocation, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be positive and finite")
    return arr


def _is_image(scales: np.ndarray, image: bool | None) -> bool:
    if image is None:
        return len(scales) == 1
    if image and len(scales) != 1:
        raise ValueError(f"image=True needs exactly one scale, got {len(scales)}")
    return bool(image)


def allocation_tokens(
    scales: Sequence[float] | np.ndarray,
    height: int,
    width: int,
    geom: VisionGeometry,
    image: bool | None = None,
) -> int:
    """Visual tokens the backbone gets for a per-frame allocation, exactly as `resize_video` (chunk k at the
    mean scale of its frames) or `resize_image` (one scale; `image=None`: when T = 1)."""
    arr = _check_allocation(scales)
    if _is_image(arr, image):
        return image_tokens(height, width, geom, float(arr[0]))
    tp = geom.temporal_patch_size
    sizes = [min(tp, len(arr) - i) for i in range(0, len(arr), tp)]
    return sum(
        video_tokens(n, height, width, geom, s) for n, s in zip(sizes, chunk_scales(arr, tp), strict=True)
    )


def allocation_retention(
    scales: Sequence[float] | np.ndarray,
    height: int,
    width: int,
    geom: VisionGeometry,
    image: bool | None = None,
) -> float:
    """Measured retention of an allocation: its tokens / tokens of the same frames unmodified."""
    arr = _check_allocation(scales)
    ref = allocation_tokens(np.ones_like(arr), height, width, geom, image)
    return retention_of_tokens(allocation_tokens(arr, height, width, geom, image), ref)


def clip_to_saturation(
    scales: Sequence[float] | np.ndarray, height: int, width: int, geom: VisionGeometry, s_max: float
) -> np.ndarray:
    """Clip scales at the smallest scale that already gives a frame its most tokens.

    Above it a scale adds nothing, and at the pixel cap smart_resize's flooring can even take tokens away:
    a 224 px frame under a 224^2 cap is 224 px at s = 1 and at s = 1.25, but 196 px at s = 1.2499 (floor(279)
    is scaled back below 224 and floored to 7 x 28). The Allocator's actions above 1 must not cost it the
    frame it asked for, so the operator gets clipped scales (the cost proxy clips at the same point).
    """
    arr = _check_allocation(scales)
    return np.minimum(arr, _clip_point(int(height), int(width), geom, float(s_max)))


def _clip_point(height: int, width: int, geom: VisionGeometry, s_max: float) -> float:
    """Where scales stop adding tokens: the saturation scale, or s_max when no scale changes the count (a
    frame held at the processor's pixel floor has one size whatever the scale; clipping to 0 is no scale)."""
    return token_saturation_scale(height, width, geom, s_max) or s_max


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def hard_budget_scales(
    scales: Sequence[float] | np.ndarray,
    height: int,
    width: int,
    geom: VisionGeometry,
    target_retention: float,
    s_min: float,
    s_max: float,
    image: bool | None = None,
    iterations: int = 60,
    mode: str = "sharpen",
) -> np.ndarray:
    """Rescale a deterministic allocation so its measured retention is as close to `target_retention` as
    possible without exceeding it, keeping the ranking of the temporal chunks (the unit the operator resizes:
    every frame of a chunk gets the chunk's rescaled mean scale).

    Each scale is mapped to the latent u and transformed monotonically in logit space z = logit(u):
    `mode="shift"`: u' = sigmoid(z + b); `mode="sharpen"` (default): u' = sigmoid((z - z_top) / tau + 13.8),
    which pins the top-ranked chunk at s_max and lowers the others along the allocation's own ranking as tau
    shrinks, so a tight budget still gives the most important chunk full resolution (a shift would lower every
    chunk together). If even the top chunk alone at s_max exceeds the target, sharpen falls back to shift.
    The free parameter (b or log tau) is found by bisection (the largest value whose retention <= target).
    Token counts are step functions of the scale, so the result lands within one chunk's token step below
    the target. A single scale (T = 1) is treated as an image (its pixel limits) unless `image=False`. Input
    scales outside [s_min, s_max] are clipped into it first (the latent must lie in (0, 1)).
    Raises ValueError when the target is outside (0, 1] or below what all-s_min allocations keep.
    """
    try:
        target = float(target_retention)
    except (TypeError, ValueError):
        raise ValueError(f"target_retention must be a number in (0, 1], got {target_retention!r}") from None
    if not math.isfinite(target) or not 0.0 < target <= 1.0:
        raise ValueError(f"target_retention must be in (0, 1], got {target_retention!r}")
    lo_s = positive_number("hard_budget_scales.s_min", s_min)
    hi_s = positive_number("hard_budget_scales.s_max", s_max)
    if lo_s >= hi_s:
        raise ValueError(f"hard_budget_scales: s_min ({lo_s}) must be below s_max ({hi_s})")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if mode not in ("sharpen", "shift"):
        raise ValueError(f"hard_budget_scales: mode must be 'sharpen' or 'shift', got {mode!r}")
    arr = _check_allocation(scales)
    is_image = _is_image(arr, image)
    ref = allocation_tokens(np.ones_like(arr), height, width, geom, is_image)
    # The operator resizes per temporal chunk (mean of its frames' scales), so a video is rescaled chunk by
    # chunk: ranking frames instead could pin one frame of a chunk high and let its partner drag it down.
    if is_image:
        frames_of = np.zeros(1, dtype=int)
        units = arr
    else:
        tp = geom.temporal_patch_size
        frames_of = np.arange(len(arr)) // tp
        units = np.asarray(chunk_scales(arr, tp), dtype=np.float64)
    cap = hi_s if is_image else _clip_point(int(height), int(width), geom, hi_s)
    u = np.clip((units - lo_s) / (hi_s - lo_s), _U_EPS, 1.0 - _U_EPS)
    z = (np.log(u) - np.log1p(-u))[frames_of]

    def ratio(scales: np.ndarray) -> float:
        return allocation_tokens(scales, height, width, geom, is_image) / ref

    if mode == "sharpen" and len(units) > 1:
        pin = -math.log(_U_EPS)  # logit(1 - eps): the top frame at s_max

        def sharp(log_tau: float) -> np.ndarray:
            return np.minimum(lo_s + _sigmoid((z - z.max()) / math.exp(log_tau) + pin) * (hi_s - lo_s), cap)

        if ratio(sharp(-20.0)) <= target:
            return sharp(_largest_within(lambda t: ratio(sharp(t)), -20.0, 10.0, target, iterations))

    def at(b: float) -> np.ndarray:
        return np.minimum(lo_s + _sigmoid(z + b) * (hi_s - lo_s), cap)

    lo, hi = -50.0, 50.0  # |logit u| <= 13.9, so these pin every frame to s_min / s_max
    if ratio(at(lo)) > target:
        raise ValueError(
            f"target_retention {target} is below the smallest retention {ratio(at(lo)):.4f} reachable with "
            f"s_min={lo_s} for {len(arr)} frame(s) of {height}x{width}"
        )
    return at(_largest_within(lambda b: ratio(at(b)), lo, hi, target, iterations))


def _largest_within(ret, lo: float, hi: float, target: float, iterations: int) -> float:
    """The largest x in [lo, hi] with ret(x) <= target, for a non-decreasing `ret` with ret(lo) <= target."""
    if ret(hi) <= target:
        return hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if ret(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------------------
# The operator on a decoded sample.


@dataclass
class Plan:
    """A decision for one sample: kept frame positions (None: all) and one scale per kept frame (one for an
    image); `keep_ratio`: fraction of visual tokens kept after the encoder (token pruning, else 1);
    `timings`: seconds the deciding method spent on this sample (e.g. allocator encode / predict)."""

    scales: np.ndarray
    frames: list[int] | None = None
    keep_ratio: float = 1.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Realised:
    """A plan applied: what the processor gets, its visual tokens and the unmodified reference."""

    visual: VisualInput
    tokens: int  # visual tokens of the input (before any post-encoder pruning)
    reference_tokens: int  # the same frames unmodified
    frame_scales: list[float]  # per decoded frame: its scale, 0 for a dropped frame (heatmaps)
    apply_seconds: float = 0.0

    @property
    def retention(self) -> float:
        return retention_of_tokens(self.tokens, self.reference_tokens)


def realise(sample: LoadedSample, plan: Plan | np.ndarray, geom: VisionGeometry) -> Realised:
    """Apply a plan (or bare per-frame scales) to a sample; tokens counted as the processor will count them."""
    if not isinstance(plan, Plan):
        plan = Plan(scales=np.asarray(plan))
    t0 = time.perf_counter()
    scales = np.asarray(plan.scales, dtype=np.float64)
    if sample.is_image:
        if plan.frames not in (None, [0]) or len(scales) != 1:
            raise ValueError(
                f"plan for image sample {sample.row['id']} must have one scale and no frame list"
            )
        img, tokens = resize_image(sample.frames, float(scales[0]), geom)
        ref = image_tokens(*sample.size, geom)
        return Realised(VisualInput(image=img), tokens, ref, [float(scales[0])], time.perf_counter() - t0)
    n = len(sample.frames)
    frames = list(range(n)) if plan.frames is None else [int(f) for f in plan.frames]
    if len(frames) != len(scales):
        raise ValueError(f"plan for {sample.row['id']}: {len(frames)} frames but {len(scales)} scales")
    if not frames or sorted(set(frames)) != frames or frames[0] < 0 or frames[-1] >= n:
        raise ValueError(f"plan for {sample.row['id']}: frames must be increasing positions in [0, {n})")
    tv = resize_video(sample.frames[frames], scales, geom)
    times = [sample.frame_indices[frames[idx[0]]] / sample.fps for idx in tv.chunk_frame_indices]
    per_frame = np.zeros(n)
    per_frame[frames] = scales
    visual = VisualInput(chunks=tv.chunks, chunk_times=times, fps=sample.fps)
    ref = video_tokens(n, *sample.size, geom)
    return Realised(visual, tv.visual_tokens, ref, per_frame.tolist(), time.perf_counter() - t0)
