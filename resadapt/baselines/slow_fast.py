"""A slow-fast heuristic allocator in the style of Keye-VL 1.5: inter-frame change decides resolution.

Keye-VL encodes a frame as "slow" (full resolution) when it differs from the last slow frame and as "fast"
(about 30% of a slow frame's tokens) when it is nearly the same. Here the unit is the temporal chunk: its
novelty is the fraction of 28 px cells (one merged token at full resolution) of its first frame whose mean
absolute change from the previous chunk's first frame exceeds `cell_threshold` grey levels; the first chunk
is always slow. At a target retention the most novel chunks are slow, as many as fit with the others at the
fast scale; if even one slow chunk does not fit, the fast scale drops (down to s_min), then the slow one.
It needs no question and no training: the strongest non-learned baseline (design decision 7).
"""

from __future__ import annotations

import math

import numpy as np

from resadapt.baselines.base import Method, num_chunks
from resadapt.budget import Plan, image_scale_for_retention, largest_scale, video_tokens
from resadapt.data.sample import LoadedSample


def chunk_novelty(frames: np.ndarray, temporal_patch_size: int, cell: int = 28, cell_threshold: float = 8.0):
    """Per chunk: fraction of cells that changed since the previous chunk (the first chunk gets +inf)."""
    firsts = frames[::temporal_patch_size].astype(np.float32)
    t, h, w, _ = firsts.shape
    gh, gw = max(1, h // cell), max(1, w // cell)
    cells = firsts[:, : gh * cell, : gw * cell].reshape(t, gh, cell, gw, cell, 3).mean(axis=(2, 4))
    change = np.abs(np.diff(cells, axis=0)).mean(axis=-1) > cell_threshold
    return np.concatenate([[np.inf], change.reshape(t - 1, -1).mean(axis=1)])


class SlowFast(Method):
    name = "slow_fast"

    fast_token_fraction = 0.3

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        self.check_budget(budget)
        geom = self.geometry
        h, w = sample.size
        if sample.is_image:
            return Plan(scales=np.array([image_scale_for_retention(budget, h, w, geom)]))
        tp = geom.temporal_patch_size
        n = len(sample.frames)
        novelty = chunk_novelty(sample.frames, tp)
        order = np.argsort(-novelty, kind="stable")
        sizes = [min(tp, n - c * tp) for c in range(num_chunks(sample, geom))]
        limit = math.floor(budget * video_tokens(n, h, w, geom))
        s_min = self.context.s_min
        s_fast = math.sqrt(self.fast_token_fraction)

        def tokens(slow: set, slow_scale: float, fast_scale: float) -> int:
            return sum(
                video_tokens(k, h, w, geom, slow_scale if c in slow else fast_scale)
                for c, k in enumerate(sizes)
            )

        def scales(slow: set, slow_scale: float, fast_scale: float) -> Plan:
            per_chunk = [slow_scale if c in slow else fast_scale for c in range(len(sizes))]
            return Plan(scales=np.repeat(per_chunk, tp)[:n])

        for k in range(len(sizes), 0, -1):
            slow = {int(c) for c in order[:k]}
            if tokens(slow, 1.0, s_fast) <= limit:
                return scales(slow, 1.0, s_fast)
        slow = {int(order[0])}
        fast = largest_scale(lambda s: tokens(slow, 1.0, s), limit, h, w, top=s_fast)
        if fast is not None and fast >= s_min:
            return scales(slow, 1.0, fast)
        top = largest_scale(lambda s: tokens(slow, s, s_min), limit, h, w) or s_min
        return scales(slow, top, s_min)
