"""Methods that resize frames with a rule, not a model: Vanilla, FixedScale and the Oracle.

FixedScale is the paper's strongest simple baseline (a uniform downscale to the target retention); the
Oracle knows from the benchmark which chunks hold the evidence and is the upper bound an allocator at the
same retention could reach.
"""

from __future__ import annotations

import math

import numpy as np

from resadapt.baselines.base import Method, keep_chunks
from resadapt.baselines.selection import chunks_for_budget
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
    """The upper bound of every input-side method: it knows which chunks hold the evidence, and the answer.

    Its plan: evidence chunks at full resolution first, as many as fit (those with more evidence frames
    first); the other chunks at s_min when the budget allows it (any budget left over spread over them), else
    dropped. Only when not even one evidence chunk fits at full resolution is the evidence shrunk: the
    fullest evidence chunk alone at the largest scale that fits, the rest dropped. An image is its own
    evidence: it is FixedScale. A video without evidence frames gets FixedScale too.

    One rule is not an upper bound of every method (measured: at retention 0.096 the shrunk chunk alone
    scored 6% on detail QA, while the deterministic ResAdapt, keeping the timeline at s_min and the evidence at
    about 7 x 7 tokens, read 75% at 0.119; on 32- and 64-frame videos keeping fewer frames beat keeping them
    all, by 0.31 and 0.49). So a sample the plan gets
    wrong is tried again with each `alternatives` plan and the best is kept, as an oracle may.
    """

    name = "oracle"

    def _video(self, sample: LoadedSample, budget: float):
        """(sizes, token limit, evidence chunks fullest first) of a video with evidence, else None."""
        tp = self.geometry.temporal_patch_size
        n = len(sample.frames)
        evidence = sample.chunk_evidence(tp)
        if sample.is_image or not evidence.any():
            return None
        sizes = [min(tp, n - c * tp) for c in range(len(evidence))]
        limit = math.floor(budget * video_tokens(n, *sample.size, self.geometry))
        weight = [int(sample.evidence_mask[c * tp : c * tp + k].sum()) for c, k in enumerate(sizes)]
        return sizes, limit, sorted(np.flatnonzero(evidence).tolist(), key=lambda c: (-weight[c], c))

    def alternatives(self, sample: LoadedSample, budget: float | None) -> list[Plan]:
        """(1) the timeline kept: every chunk at s_min, the fullest evidence chunk at the largest scale that
        fits; (2) frame selection with the evidence known: as many whole chunks as selection keeps, the
        evidence first, then chunks evenly spaced in time, at the largest common scale that fits."""
        self.check_budget(budget)
        video = self._video(sample, budget)
        if video is None:
            return []
        sizes, limit, ranked = video
        geom, s_min, tp = self.geometry, self.context.s_min, self.geometry.temporal_patch_size
        h, w = sample.size
        n = len(sample.frames)
        plans = []
        top = ranked[0]

        def tokens(s: float) -> int:
            return sum(video_tokens(k, h, w, geom, s if c == top else s_min) for c, k in enumerate(sizes))

        s = largest_scale(tokens, limit, h, w)
        if s is not None and s > s_min:
            plans.append(Plan(scales=np.repeat(np.where(np.arange(len(sizes)) == top, s, s_min), tp)[:n]))
        k = chunks_for_budget(len(sizes), budget)
        rest = [c for c in range(len(sizes)) if c not in ranked]
        spaced = (
            [rest[int(i)] for i in np.linspace(0, len(rest) - 1, max(0, k - len(ranked)))] if rest else []
        )
        plans.append(keep_chunks(sample, sorted(set(ranked[:k]) | set(spaced)), budget, geom))
        return plans

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        self.check_budget(budget)
        geom = self.geometry
        if sample.is_image:
            return Plan(scales=np.array([image_scale_for_retention(budget, *sample.size, geom)]))
        n = len(sample.frames)
        h, w = sample.size
        video = self._video(sample, budget)
        if video is None:
            return Plan(scales=np.full(n, video_scale_for_retention(budget, h, w, n, geom)))
        sizes, limit, ranked = video
        tp = geom.temporal_patch_size
        s_min = self.context.s_min

        def tokens(full: set[int], rest_scale: float | None) -> int:
            """Tokens with `full` chunks at full resolution and the rest at `rest_scale` (None: dropped)."""
            return sum(
                video_tokens(k, h, w, geom, 1.0 if c in full else rest_scale)
                for c, k in enumerate(sizes)
                if c in full or rest_scale is not None
            )

        def most(rest_scale: float | None) -> set[int]:
            full: set[int] = set()
            for c in ranked:
                if tokens(full | {c}, rest_scale) > limit:
                    break
                full.add(c)
            return full

        kept, alone = most(s_min), most(None)
        if kept and len(kept) >= len(alone):
            if len(kept) == len(sizes):
                return Plan(scales=np.ones(n))
            rest = max(s_min, largest_scale(lambda s: tokens(kept, s), limit, h, w) or s_min)
            in_full = np.array([c in kept for c in range(len(sizes))])
            return Plan(scales=np.repeat(np.where(in_full, 1.0, rest), tp)[:n])
        return keep_chunks(sample, sorted(alone) or ranked[:1], budget, geom)
