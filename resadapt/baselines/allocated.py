"""ResAdapt itself behind the method interface: the trained Allocator's deterministic allocation, as is
(`resadapt`: its own retention) and rescaled to the target retention (`resadapt_hard`: the hard budget mode),
and the same two for the untrained Allocator (`prior_only`, `prior_only_hard`: its relevance prior alone),
so what CAPO training adds is a row of every table.

The Allocator runs once per sample and frame count; the allocation and its measured time (coarse encode,
predict) are cached in the `MethodContext`, so ResAdapt, its hard-budget rows and frame selection all
report the cost of the same allocation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from resadapt.baselines.base import BatchedMethod, MethodContext
from resadapt.budget import Plan, clip_to_saturation, hard_budget_scales
from resadapt.data.sample import LoadedSample

_BATCH = 16


@dataclass
class Allocation:
    """`raw`: the Beta-mean scales in [s_min, s_max]; `scales`: what the operator gets (clipped at token
    saturation). Rankings must use `raw`: clipping ties every chunk above saturation."""

    raw: np.ndarray
    scales: np.ndarray
    timings: dict[str, float]


def _key(sample: LoadedSample, which: str) -> tuple:
    return (which, str(sample.row["id"]), len(sample.frames) if not sample.is_image else 0)


@torch.no_grad()
def deterministic_allocations(
    context: MethodContext, samples: list[LoadedSample], which: str = "allocator"
) -> list[Allocation]:
    """The Beta-mean allocation of each sample by `context.<which>` (the trained Allocator, or
    `prior_allocator`), cached, with per-sample encode/predict time."""
    allocator = getattr(context, which)
    if allocator is None or context.allocator_tokenizer is None:
        raise ValueError(f"this method needs context.{which} and its tokenizer in the MethodContext")
    todo = [s for s in samples if _key(s, which) not in context.cache]
    allocator.eval()
    s_max = float(allocator.config.s_max)
    for i in range(0, len(todo), _BATCH):
        part = todo[i : i + _BATCH]
        t0 = time.perf_counter()
        feats = allocator.encode_frames([s.frames for s in part])
        tok = context.allocator_tokenizer(
            [s.row["question"] for s in part], add_special_tokens=False, padding=True, return_tensors="pt"
        )
        q, q_mask = allocator.encode_query(tok["input_ids"], tok["attention_mask"])
        t1 = time.perf_counter()
        out = allocator(feats.tokens, feats.mask, q, q_mask)
        scales = allocator.mean_scales(out).cpu().numpy().astype(np.float64)
        t2 = time.perf_counter()
        timings = {"allocator_encode": (t1 - t0) / len(part), "allocator_predict": (t2 - t1) / len(part)}
        for k, s in enumerate(part):
            raw = scales[k, : feats.num_frames[k]]
            sc = raw if s.is_image else clip_to_saturation(raw, *s.size, context.geometry, s_max)
            context.cache[_key(s, which)] = Allocation(raw, sc, dict(timings))
    return [context.cache[_key(s, which)] for s in samples]


class ResAdapt(BatchedMethod):
    """The trained Allocator's deterministic (Beta-mean) allocation, at whatever retention it chooses."""

    name = "resadapt"
    budgeted = False
    allocator: ClassVar[str] = "allocator"

    def plan_batch(self, samples: list[LoadedSample], budget: float | None) -> list[Plan]:
        return [
            Plan(scales=a.scales, timings=dict(a.timings))
            for a in deterministic_allocations(self.context, samples, self.allocator)
        ]


class ResAdaptHard(BatchedMethod):
    """The deterministic allocation rescaled to the target retention (`budget.hard_budget_scales`)."""

    name = "resadapt_hard"
    allocator: ClassVar[str] = "allocator"

    def plan_batch(self, samples: list[LoadedSample], budget: float | None) -> list[Plan]:
        self.check_budget(budget)
        allocations = deterministic_allocations(self.context, samples, self.allocator)
        cfg = getattr(self.context, self.allocator).config
        plans = []
        for sample, a in zip(samples, allocations, strict=True):
            t0 = time.perf_counter()
            scales = hard_budget_scales(
                a.raw,
                *sample.size,
                self.geometry,
                budget,
                cfg.s_min,
                cfg.s_max,
                image=sample.is_image,
            )
            plans.append(
                Plan(scales=scales, timings=a.timings | {"allocator_budget": time.perf_counter() - t0})
            )
        return plans


class PriorOnly(ResAdapt):
    """The untrained Allocator's deterministic allocation: the relevance prior with an untrained head."""

    name = "prior_only"
    allocator = "prior_allocator"


class PriorOnlyHard(ResAdaptHard):
    """The untrained Allocator's allocation under the hard budget: the relevance prior's ranking alone."""

    name = "prior_only_hard"
    allocator = "prior_allocator"
