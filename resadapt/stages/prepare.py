"""The `prepare` stage: write the embedded benchmark (videos, images, `datasets` tables) under `data.root`."""

from __future__ import annotations

from resadapt.config import Params
from resadapt.data.embedded import benchmark_spec, write_benchmark


def prepare_stage(params: Params):
    """Write the embedded benchmark under `data.root` (refuses a non-empty folder)."""
    sizes = {split: s.model_dump() for split, s in params.data.splits.items()}
    return write_benchmark(params.data.root, benchmark_spec(params.data), sizes, seed=params.seed)
