"""The one interface every evaluated method implements, and the operator that turns its decision into input.

A method looks at a decoded sample (and, when it is budgeted, a target retention R) and returns a `Plan`:
which frames the backbone gets at which scale (input-side methods: the processor and the LLM are unchanged),
or which fraction of the visual tokens survives after the vision encoder (token pruning). `realise` applies
a plan with the budget operators of `resadapt.budget`, so every method's tokens are counted the same way and
retention is always tokens fed / tokens of the same frames unmodified (design decision 2).
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from resadapt.backbone import VisualInput
from resadapt.budget import (
    VisionGeometry,
    image_tokens,
    resize_image,
    resize_video,
    uniform_scale_for_retention,
    video_tokens,
)
from resadapt.calibration import LoadedSample


@dataclass
class Plan:
    """A method's decision for one sample.

    `frames`: kept positions in the decoded frames (None: all); `scales`: one scale per kept frame (one for
    an image); `keep_ratio`: the fraction of visual tokens kept after the encoder (token pruning, else 1);
    `timings`: seconds the method itself spent on this sample (e.g. allocator encode / predict).
    """

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


@dataclass
class MethodContext:
    """What methods may use: token geometry, the smallest scale, a seed and (for ResAdapt) the Allocator."""

    geometry: VisionGeometry
    s_min: float = 0.125
    seed: int = 0
    allocator: Any = None  # resadapt.allocator.Allocator
    allocator_tokenizer: Any = None
    cache: dict = field(default_factory=dict)  # per-sample results shared between methods (allocations)


class Method(ABC):
    """One evaluated method. `budgeted` methods are run once per target retention, the others once."""

    name: ClassVar[str]
    budgeted: ClassVar[bool] = True
    supports_images: ClassVar[bool] = True
    pruning: ClassVar[str | None] = None  # "tome" | "visionzip": the backend prunes after the encoder

    def __init__(self, context: MethodContext):
        self.context = context

    @property
    def geometry(self) -> VisionGeometry:
        return self.context.geometry

    def plan_batch(self, samples: list[LoadedSample], budget: float | None) -> list[Plan]:
        """Plans for several samples (methods with a model override this to batch it)."""
        return [self.plan(s, budget) for s in samples]

    @abstractmethod
    def plan(self, sample: LoadedSample, budget: float | None) -> Plan: ...

    def check_budget(self, budget: float | None) -> None:
        if self.budgeted and budget is None:
            raise ValueError(f"method {self.name!r} is budgeted: give a target retention")
        if budget is not None and not 0.0 < float(budget) <= 1.0:
            raise ValueError(f"method {self.name!r}: target retention must be in (0, 1], got {budget!r}")


class BatchedMethod(Method):
    """A method that decides for a whole batch at once (it runs a model); one sample is a batch of one."""

    @abstractmethod
    def plan_batch(self, samples: list[LoadedSample], budget: float | None) -> list[Plan]: ...

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        return self.plan_batch([sample], budget)[0]


# ---------------------------------------------------------------------------------------------------------
# Shared helpers.


def num_chunks(sample: LoadedSample, geom: VisionGeometry) -> int:
    return math.ceil(len(sample.frames) / geom.temporal_patch_size)


def frame_size(sample: LoadedSample) -> tuple[int, int]:
    return int(sample.frames.shape[-3]), int(sample.frames.shape[-2])


def sample_rng(context: MethodContext, sample: LoadedSample, salt: str) -> np.random.Generator:
    """A generator that depends on the seed and the sample only, so results do not depend on order."""
    return np.random.default_rng([context.seed, zlib.crc32(f"{salt}:{sample.row['id']}".encode())])


def largest_scale(tokens_of: Callable[[float], int], limit: int, height: int, width: int, top: float = 1.0):
    """Largest scale in (0, top] with tokens_of(scale) <= limit, or None. Sizes change only at k/H, k/W."""
    grid = {top} | {k / side for side in (height, width) for k in range(1, math.floor(side * top) + 1)}
    for s in sorted(grid, reverse=True):
        if tokens_of(s) <= limit:
            return s
    return None


def image_scale_for_retention(target: float, height: int, width: int, geom: VisionGeometry) -> float:
    """Largest image scale whose tokens are <= target * tokens at full size (at least the smallest image)."""
    ref = image_tokens(height, width, geom)
    s = largest_scale(lambda x: image_tokens(height, width, geom, x), math.floor(target * ref), height, width)
    return s if s is not None else 1.0 / max(height, width)


def video_scale_for_retention(target: float, sample: LoadedSample, geom: VisionGeometry) -> float:
    """The FixedScale scale: largest uniform scale whose measured retention is <= target."""
    h, w = frame_size(sample)
    n = len(sample.frames)
    try:
        return uniform_scale_for_retention(target, h, w, n, geom)
    except ValueError:
        return float(geom.min_pixels**0.5 / max(h, w))  # below the smallest size: the processor's floor


def keep_chunks(
    sample: LoadedSample, chunks: list[int], budget: float, geom: VisionGeometry, top: float = 1.0
) -> Plan:
    """Keep whole temporal chunks at the largest common scale whose tokens fit `budget` of the full video."""
    tp = geom.temporal_patch_size
    n = len(sample.frames)
    frames = [f for c in sorted(chunks) for f in range(c * tp, min((c + 1) * tp, n))]
    h, w = frame_size(sample)
    limit = math.floor(budget * video_tokens(n, h, w, geom))

    def tokens(s: float) -> int:
        return sum(video_tokens(min(tp, n - c * tp), h, w, geom, s) for c in chunks)

    s = largest_scale(tokens, limit, h, w, top)
    return Plan(scales=np.full(len(frames), s if s is not None else 1.0 / max(h, w)), frames=frames)


def realise(sample: LoadedSample, plan: Plan, geom: VisionGeometry) -> Realised:
    """Apply a plan with the budget operators; tokens counted as the processor will count them."""
    import time

    t0 = time.perf_counter()
    scales = np.asarray(plan.scales, dtype=np.float64)
    if sample.is_image:
        if plan.frames not in (None, [0]) or len(scales) != 1:
            raise ValueError(
                f"plan for image sample {sample.row['id']} must have one scale and no frame list"
            )
        img, tokens = resize_image(sample.frames, float(scales[0]), geom)
        ref = image_tokens(*sample.frames.shape[:2], geom)
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
    ref = video_tokens(n, *frame_size(sample), geom)
    return Realised(visual, tv.visual_tokens, ref, per_frame.tolist(), time.perf_counter() - t0)
