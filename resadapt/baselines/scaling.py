"""Methods that resize frames with a rule, not a model: Vanilla, FixedScale and the Oracle.

FixedScale is the paper's strongest simple baseline (a uniform downscale to the target retention); the
Oracle knows from the benchmark which chunks hold the evidence and is the upper bound an allocator at the
same retention could reach.
"""

from __future__ import annotations

import math

import numpy as np

from resadapt.baselines.base import Method, keep_chunks
from resadapt.budget import (
    Plan,
    image_scale_for_retention,
    largest_scale,
    video_scale_for_retention,
    video_tokens,
)
from resadapt.data.sample import LoadedSample


class Vanilla(Method):
    """The unmodified input: every frame at full resolution (retention 1)."""

    name = "vanilla"
    budgeted = False

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        return Plan(scales=np.ones(1 if sample.is_image else len(sample.frames)))


class FixedScale(Method):
    """Every frame at the largest uniform scale whose measured retention is <= the target."""

    name = "fixed_scale"

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        self.check_budget(budget)
        if sample.is_image:
            return Plan(scales=np.array([image_scale_for_retention(budget, *sample.size, self.geometry)]))
        n = len(sample.frames)
        return Plan(scales=np.full(n, video_scale_for_retention(budget, *sample.size, n, self.geometry)))


class Oracle(Method):
    """The upper bound of every input-side method: it knows which chunks hold the evidence.

    Evidence chunks at full resolution first; the other chunks at s_min when the budget allows it (and any
    budget left over spread over them), else dropped; the evidence is shrunk (to the largest common scale
    that fits, the rest dropped) only when it alone exceeds the budget. An image is its own evidence: it is
    FixedScale. A video without evidence frames gets FixedScale too.
    """

    name = "oracle"

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        self.check_budget(budget)
        geom = self.geometry
        if sample.is_image:
            return Plan(scales=np.array([image_scale_for_retention(budget, *sample.size, geom)]))
        tp = geom.temporal_patch_size
        n = len(sample.frames)
        h, w = sample.size
        evidence = sample.chunk_evidence(tp)
        if not evidence.any():
            return Plan(scales=np.full(n, video_scale_for_retention(budget, h, w, n, geom)))
        sizes = [min(tp, n - c * tp) for c in range(len(evidence))]
        limit = math.floor(budget * video_tokens(n, h, w, geom))
        s_min = self.context.s_min

        def tokens(rest_scale: float) -> int:
            return sum(
                video_tokens(k, h, w, geom, 1.0 if e else rest_scale)
                for k, e in zip(sizes, evidence, strict=True)
            )

        if tokens(s_min) <= limit:
            rest = s_min if evidence.all() else max(s_min, largest_scale(tokens, limit, h, w) or s_min)
            return Plan(scales=np.repeat(np.where(evidence, 1.0, rest), tp)[:n])
        return keep_chunks(sample, [int(c) for c in np.flatnonzero(evidence)], budget, geom)
