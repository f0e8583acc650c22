"""Every evaluated method behind one interface (`base.Method`): rule-based resizing, chunk selection,
post-encoder token pruning, the slow-fast heuristic, the Oracle and ResAdapt itself.

`build_method(name, context)` makes one by the name `params.yaml` uses (`config.Method`).
"""

from __future__ import annotations

from resadapt.baselines.allocated import PriorOnly, PriorOnlyHard, ResAdapt, ResAdaptHard
from resadapt.baselines.base import Method, MethodContext
from resadapt.baselines.scaling import FixedScale, Oracle, Vanilla
from resadapt.baselines.selection import FrameSelection, RandomChunkDrop
from resadapt.baselines.slow_fast import SlowFast
from resadapt.baselines.token_pruning import RandomTokenDrop, ToMe, VisionZip

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        Vanilla,
        FixedScale,
        RandomChunkDrop,
        RandomTokenDrop,
        ToMe,
        VisionZip,
        SlowFast,
        FrameSelection,
        Oracle,
        PriorOnly,
        PriorOnlyHard,
        ResAdapt,
        ResAdaptHard,
    )
}


def build_method(name: str, context: MethodContext) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](context)


__all__ = ["METHODS", "Method", "MethodContext", "build_method"]
