"""One evaluator for every method x target retention x frame count x task.

Each evaluated sample becomes one JSON line (question id, method, budget, frames, prediction, answer, score,
visual tokens fed, retention, per-stage seconds) and the tables are aggregated from those lines only, so a
number in a report can always be traced to the samples behind it. Retention is measured from the tokens the
LLM actually received (design decision 2): counted from the placeholders in the prompt the backend built,
and checked against the operator's own count for input-side methods.

Time per sample is split into: frame decoding (shared by all methods, reported apart), allocator encode /
predict / budget (ResAdapt and frame selection), the operator (resize), processor preprocessing, backbone
prefill (until the first new token) and generation (the remaining tokens). A batch's time is divided evenly
over its samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from resadapt.backbone import TimedGeneration, TransformersBackend
from resadapt.baselines import METHODS, Method, MethodContext, build_method
from resadapt.baselines.base import best_of_alternatives
from resadapt.budget import Plan, realise
from resadapt.data.sample import LoadedSample
from resadapt.rewards import score

TIMING_KEYS = (
    "allocator_encode",
    "allocator_predict",
    "allocator_budget",
    "apply",
    "preprocess",
    "prefill",
    "generate",
)


IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # grounding recall thresholds (R@IoU) of every report


def budget_label(budget: float | None) -> str:
    """A cell's target retention as the reports write it: 'own' for unbudgeted methods, else e.g. '0.15'."""
    return "own" if budget is None or (isinstance(budget, float) and math.isnan(budget)) else f"{budget:g}"


def generate_with(backend, visuals, questions) -> list[TimedGeneration]:
    """Generations with timings from any backend (one without a breakdown reports its total as generate)."""
    if hasattr(backend, "generate_timed"):
        return backend.generate_timed(visuals, questions)
    return [TimedGeneration(g, {"generate": g.seconds}) for g in backend.generate(visuals, questions)]


# ---------------------------------------------------------------------------------------------------------
# The grid.


@dataclass(frozen=True)
class Cell:
    """One (grid, task, frames, method, budget) combination; budget None for unbudgeted methods."""

    grid: str
    task: str
    frames: int
    method: str
    budget: float | None
    seed: int | None = None  # the trained Allocator's seed (`Evaluator.allocators`); None: no trained model


@dataclass
class Evaluator:
    """Runs cells over loaded samples with one backbone; `pruned_backend(method, keep_ratio)` makes the
    backend of a token-pruning method."""

    model: Any
    processor: Any
    context: MethodContext
    max_new_tokens: int = 12
    batch_size: int = 16
    pruned_backend: Any = None
    backend: Any = None  # the input-side methods' generation backend (default: transformers)
    allocators: dict[int, Any] = field(default_factory=dict)  # trained Allocators by seed (`Cell.seed`)
    _methods: dict[str, Method] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = TransformersBackend(
                self.model, self.processor, self.max_new_tokens, self.batch_size
            )

    def method(self, name: str) -> Method:
        if name not in self._methods:
            self._methods[name] = build_method(name, self.context)
        return self._methods[name]

    def use_allocator(self, seed: int) -> None:
        """Give the methods the Allocator trained with `seed` (cached allocations belong to the previous one)."""
        if seed not in self.allocators:
            raise ValueError(
                f"a cell asks for the Allocator of seed {seed}; loaded seeds: {sorted(self.allocators)}"
            )
        if self.context.allocator is not self.allocators[seed]:
            self.context.allocator = self.allocators[seed]
            self.context.cache.clear()

    def run_cell(
        self, cell: Cell, samples: list[LoadedSample], decode_seconds: dict[str, float]
    ) -> list[dict]:
        if cell.seed is not None:
            self.use_allocator(cell.seed)
        method = self.method(cell.method)
        samples = [s for s in samples if method.supports_images or not s.is_image]
        if not samples:
            return []
        plans = method.plan_batch(samples, cell.budget)
        rows, which = best_of_alternatives(
            method,
            samples,
            cell.budget,
            plans,
            self._rows(cell, method, samples, plans, decode_seconds),
            lambda idx, alts: self._rows(cell, method, [samples[i] for i in idx], alts, decode_seconds),
            lambda row: row["score"],
        )
        return [row | {"plan": k} for row, k in zip(rows, which, strict=True)]

    def _rows(
        self,
        cell: Cell,
        method: Method,
        samples: list[LoadedSample],
        plans: list[Plan],
        decode_seconds: dict[str, float],
    ) -> list[dict]:
        """Apply the plans, generate, score: one log row per sample."""
        if not samples:
            return []
        realised = [realise(s, p, self.context.geometry) for s, p in zip(samples, plans, strict=True)]
        if method.pruning is not None:
            if self.pruned_backend is None:
                raise ValueError(
                    f"method {cell.method!r} prunes tokens but the Evaluator has no pruned_backend"
                )
            backend = self.pruned_backend(method.pruning, plans[0].keep_ratio)
        else:
            backend = self.backend
        gens = generate_with(backend, [r.visual for r in realised], [s.row["question"] for s in samples])
        rows = []
        for s, p, r, g in zip(samples, plans, realised, gens, strict=True):
            fed = g.generation.visual_tokens
            if method.pruning is None and fed != r.tokens:
                raise RuntimeError(
                    f"{cell.method} on {s.row['id']}: the prompt holds {fed} visual tokens but the operator "
                    f"counted {r.tokens}; token accounting is broken"
                )
            row = s.row
            timings = dict.fromkeys(TIMING_KEYS, 0.0) | p.timings | {"apply": r.apply_seconds} | g.timings
            rows.append(
                {
                    **asdict(cell),
                    "backend": backend.name,
                    "id": str(row["id"]),
                    "kind": row["task"],  # how the sample is scored (cell.task names its source)
                    "question": row["question"],
                    "options": list(row["options"] or []),
                    "answer_span": list(row["answer_span"] or []),
                    "prediction": g.generation.text,
                    "answer": row["answer"],
                    "score": score(
                        row["task"], g.generation.text, row["answer"], row["options"], row["answer_span"]
                    ),
                    "visual_tokens": fed,
                    "reference_tokens": r.reference_tokens,
                    "retention": fed / r.reference_tokens,
                    "prompt_tokens": g.generation.prompt_tokens,
                    "frame_scales": [round(x, 4) for x in r.frame_scales],
                    "decode_seconds": decode_seconds.get(str(row["id"]), 0.0),
                    "seconds": timings,
                    "end_to_end_seconds": sum(timings.values()),
                }
            )
        return rows


def grid_cells(
    grid: str, tasks: Iterable[str], frames: int, methods: Iterable[str], budgets: Iterable[float]
) -> list[Cell]:
    """Every (task, method, budget) at one frame count; unbudgeted methods once."""
    cells = []
    for task in tasks:
        for m in methods:
            for b in budgets if METHODS[m].budgeted else [None]:
                cells.append(Cell(grid, task, frames, m, None if b is None else float(b)))
    return cells


class ResultsLog:
    """The per-sample JSONL log: refuses to overwrite an existing file, appends one line per sample."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} already exists; remove it (dvc repro removes declared outputs) or pass overwrite=True"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def read_results(path: str | Path) -> pd.DataFrame:
    """The JSONL log as a table (timings flattened to `t_<stage>` columns)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no evaluation log at {path}; run the evaluate stage (dvc repro evaluate)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"evaluation log {path} is empty")
    df = pd.DataFrame(records)
    if "seed" not in df:  # a log written before per-seed Allocators
        df["seed"] = None
    times = pd.DataFrame(list(df.pop("seconds"))).add_prefix("t_")
    return pd.concat([df, times], axis=1)
