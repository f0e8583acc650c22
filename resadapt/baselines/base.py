"""The one interface every evaluated method implements, and the operator that turns its decision into input.

A method looks at a decoded sample (and, when it is budgeted, a target retention R) and returns a
`resadapt.budget.Plan`: which frames the backbone gets at which scale (input-side methods: the processor and
the LLM are unchanged), or which fraction of the visual tokens survives after the vision encoder (token
pruning). `resadapt.budget.realise` applies every plan, so all methods' tokens are counted the same way and
retention is always tokens fed / tokens of the same frames unmodified (design decision 2).
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from resadapt.budget import Plan, VisionGeometry, largest_scale, video_tokens
from resadapt.data.sample import LoadedSample


@dataclass
class MethodContext:
    """What methods may use: token geometry, the smallest scale, a seed and (for ResAdapt) the Allocator."""

    geometry: VisionGeometry
    s_min: float = 0.125
    seed: int = 0
    allocator: Any = None  # resadapt.allocator.Allocator (trained)
    prior_allocator: Any = None  # the untrained Allocator: its relevance prior alone (`prior_only` methods)
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

    def alternatives(self, sample: LoadedSample, budget: float | None) -> list[Plan]:
        """Further plans the evaluator tries, in order, on a sample the first plan did not answer perfectly,
        keeping the best scored. Only a method that may look at the answer has any: the Oracle."""
        return []

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


def sample_rng(context: MethodContext, sample: LoadedSample, salt: str) -> np.random.Generator:
    """A generator that depends on the seed and the sample only, so results do not depend on order."""
    return np.random.default_rng([context.seed, zlib.crc32(f"{salt}:{sample.row['id']}".encode())])


def same_plan(a: Plan, b: Plan) -> bool:
    """The same frames at the same scales (an alternative equal to a plan already tried is not re-run)."""
    return a.frames == b.frames and np.array_equal(a.scales, b.scales)


def best_of_alternatives(method, samples, budget, plans, results, run, score_of):
    """Per sample, the best of `results` (from `plans`) and the method's `alternatives`, each tried in order
    on the samples whose best score is still below 1 and not for a plan already tried.

    `run(indices, plans)` returns one result per index, `score_of(result)` its score. Returns (results,
    which plan each came from: 0 the first, k the k-th alternative)."""
    best, which = list(results), [0] * len(results)
    tried = [[p] for p in plans]
    extra = [method.alternatives(s, budget) for s in samples]
    for k in range(max(map(len, extra), default=0)):
        redo = [
            i
            for i, alts in enumerate(extra)
            if k < len(alts) and score_of(best[i]) < 1.0 and not any(same_plan(alts[k], p) for p in tried[i])
        ]
        if not redo:
            continue
        for i, result in zip(redo, run(redo, [extra[i][k] for i in redo]), strict=True):
            tried[i].append(extra[i][k])
            if score_of(result) > score_of(best[i]):
                best[i], which[i] = result, k + 1
    return best, which


def keep_chunks(
    sample: LoadedSample, chunks: list[int], budget: float, geom: VisionGeometry, top: float = 1.0
) -> Plan:
    """Keep whole temporal chunks at the largest common scale whose tokens fit `budget` of the full video."""
    tp = geom.temporal_patch_size
    n = len(sample.frames)
    frames = [f for c in sorted(chunks) for f in range(c * tp, min((c + 1) * tp, n))]
    h, w = sample.size
    limit = math.floor(budget * video_tokens(n, h, w, geom))

    def tokens(s: float) -> int:
        return sum(video_tokens(min(tp, n - c * tp), h, w, geom, s) for c in chunks)

    s = largest_scale(tokens, limit, h, w, top)
    return Plan(scales=np.full(len(frames), s if s is not None else 1.0 / max(h, w)), frames=frames)
