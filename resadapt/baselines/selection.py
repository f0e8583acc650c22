"""Methods that keep some temporal chunks and drop the rest: random chunk drop and Allocator frame selection.

Both keep k = max(1, floor(R * chunks)) whole chunks (dropping single frames would break the backbone's
two-frame temporal patches) at the largest common scale that fits the budget, which is full resolution
unless one chunk alone exceeds it. Dropped chunks cost nothing and their timestamps disappear.
"""

from __future__ import annotations

import math

import numpy as np

from resadapt.baselines.base import BatchedMethod, Method, keep_chunks, num_chunks, sample_rng
from resadapt.budget import Plan, image_scale_for_retention
from resadapt.data.sample import LoadedSample


def chunks_for_budget(total: int, budget: float) -> int:
    return max(1, min(total, math.floor(budget * total + 1e-9)))


class RandomChunkDrop(Method):
    """Keep a uniformly random subset of whole chunks before the encoder (seeded per sample). The paper's
    Random Drop drops tokens after the encoder instead: `token_pruning.RandomTokenDrop`."""

    name = "random_chunk_drop"
    supports_images = False

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        self.check_budget(budget)
        n = num_chunks(sample, self.geometry)
        k = chunks_for_budget(n, budget)
        chosen = sample_rng(self.context, sample, self.name).choice(n, size=k, replace=False)
        return keep_chunks(sample, sorted(int(c) for c in chosen), budget, self.geometry)


class FrameSelection(BatchedMethod):
    """Keep the chunks the trained Allocator scores highest (its deterministic chunk scales), drop the rest."""

    name = "frame_selection"

    def plan_batch(self, samples: list[LoadedSample], budget: float | None) -> list[Plan]:
        from resadapt.baselines.allocated import deterministic_allocations

        self.check_budget(budget)
        allocs = deterministic_allocations(self.context, samples)
        plans = []
        tp = self.geometry.temporal_patch_size
        for sample, alloc in zip(samples, allocs, strict=True):
            if sample.is_image:
                s = image_scale_for_retention(budget, *sample.size, self.geometry)
                plans.append(Plan(scales=np.array([s]), timings=dict(alloc.timings)))
                continue
            scales = alloc.raw  # unclipped: clipping at token saturation ties the top chunks
            chunk_score = np.array(
                [scales[c * tp : (c + 1) * tp].mean() for c in range(num_chunks(sample, self.geometry))]
            )
            k = chunks_for_budget(len(chunk_score), budget)
            top = np.argsort(-chunk_score, kind="stable")[:k]
            plan = keep_chunks(sample, sorted(int(c) for c in top), budget, self.geometry)
            plan.timings = dict(alloc.timings)
            plans.append(plan)
        return plans
