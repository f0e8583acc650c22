"""The `evaluate` stage: every method x target retention x frame count x task on the test split, the
tables and bar checks of its report (`reports/evaluate.ipynb`) and `metrics/evaluate.json`.

The per-sample work is `resadapt.evaluate.Evaluator`; this module decides the grid from params, spreads it
over worker processes, and turns the log into the paper's tables.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from resadapt.allocator import Allocator, query_tokenizer
from resadapt.backbone import load_backbone
from resadapt.baselines import MethodContext
from resadapt.baselines.token_pruning import PrunedBackend
from resadapt.budget import VisionGeometry
from resadapt.data.benchmarks import load_real_benchmark
from resadapt.data.embedded import split_rows
from resadapt.data.sample import load_samples
from resadapt.evaluate import TIMING_KEYS, Cell, Evaluator, ResultsLog, grid_cells, read_results
from resadapt.vllm_backend import VLLMBackend, server_from_params

IOU_THRESHOLDS = (0.3, 0.5, 0.7)


# ---------------------------------------------------------------------------------------------------------
# Tables, aggregated from the per-sample log only.


def budget_label(budget: float | None) -> str:
    return "own" if budget is None or (isinstance(budget, float) and math.isnan(budget)) else f"{budget:g}"


def _with_labels(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["R"] = [budget_label(b) for b in df["budget"]]
    return df


def _sources(part: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(part["task"]))  # in the order the grid ran them


def qa_table(df: pd.DataFrame, grid: str = "main") -> pd.DataFrame:
    """Table 1 layout: rows (frames, method, target R), columns the QA sources (accuracy, %) plus the mean
    measured retention over them."""
    part = _with_labels(df[(df.grid == grid) & (df.kind != "grounding")])
    if part.empty:
        return pd.DataFrame()
    keys = ["frames", "method", "R"]
    acc = part.pivot_table(index=keys, columns="task", values="score", aggfunc="mean") * 100
    acc = acc[_sources(part)]
    acc.insert(0, "retention_%", part.groupby(keys)["retention"].mean() * 100)
    return acc.round(1)


def grounding_table(df: pd.DataFrame, grid: str = "main") -> pd.DataFrame:
    """Table 2 layout: rows (frames, method, target R), columns (source, R@0.3/0.5/0.7/mIoU %) plus the
    mean measured retention."""
    part = _with_labels(df[(df.grid == grid) & (df.kind == "grounding")])
    if part.empty:
        return pd.DataFrame()
    keys = ["frames", "method", "R"]
    cols = {("", "retention_%"): part.groupby(keys)["retention"].mean() * 100}
    for source in _sources(part):
        g = part[part.task == source].groupby(keys)["score"]
        for t in IOU_THRESHOLDS:
            cols[(source, f"R@{t}")] = g.apply(lambda s, t=t: (s >= t).mean() * 100)
        cols[(source, "mIoU")] = g.mean() * 100
    return pd.DataFrame(cols).round(1)


def frames_table(df: pd.DataFrame) -> pd.DataFrame:
    """Frames scaling at an equal token budget: accuracy (%) and tokens per method and frame count."""
    part = df[df.grid == "frames"]
    g = part.groupby(["method", "frames"])
    return pd.DataFrame(
        {
            "accuracy_%": g["score"].mean() * 100,
            "visual_tokens": g["visual_tokens"].mean(),
            "retention_%": g["retention"].mean() * 100,
        }
    ).round(1)


def latency_table(df: pd.DataFrame, grid: str = "frames") -> pd.DataFrame:
    """Mean milliseconds per sample for each stage, per method and frame count (decode listed apart)."""
    part = df[df.grid == grid]
    cols = [f"t_{k}" for k in TIMING_KEYS if f"t_{k}" in part.columns]
    g = part.groupby(["method", "frames"])
    out = g[cols].mean() * 1000
    out.columns = [c.removeprefix("t_") for c in cols]
    out["end_to_end"] = g["end_to_end_seconds"].mean() * 1000
    out["decode"] = g["decode_seconds"].mean() * 1000
    return out.round(1)


def frontier(df: pd.DataFrame, task: str, frames: int | None = None, grid: str = "main") -> pd.DataFrame:
    """Accuracy against measured retention per (method, R) on one source at one frame count (default: the
    smallest the grid ran), the efficiency-accuracy frontier."""
    part = df[(df.grid == grid) & (df.task == task)]
    if part.empty:
        return pd.DataFrame(columns=["method", "R", "retention", "accuracy", "n"])
    part = _with_labels(part[part.frames == (frames if frames is not None else part.frames.min())])
    return (
        part.groupby(["method", "R"])
        .agg(retention=("retention", "mean"), accuracy=("score", "mean"), n=("score", "size"))
        .reset_index()
    )


def overhead(df: pd.DataFrame, frames: int, method: str = "resadapt_hard") -> dict:
    """Allocator share of ResAdapt's end-to-end time, and its speed-up over Vanilla at the same frame count."""
    part = df[(df.grid == "frames") & (df.frames == frames)]
    ours, van = part[part.method == method], part[part.method == "vanilla"]
    if ours.empty or van.empty:
        return {}
    alloc = (ours["t_allocator_encode"] + ours["t_allocator_predict"] + ours["t_allocator_budget"]).mean()
    return {
        "frames": int(frames),
        "method": method,
        "retention": float(ours["retention"].mean()),
        "allocator_ms": float(alloc * 1000),
        "end_to_end_ms": float(ours["end_to_end_seconds"].mean() * 1000),
        "allocator_share": float(alloc / ours["end_to_end_seconds"].mean()),
        "vanilla_end_to_end_ms": float(van["end_to_end_seconds"].mean() * 1000),
        "speedup_over_vanilla": float(van["end_to_end_seconds"].mean() / ours["end_to_end_seconds"].mean()),
    }


def frontier_checks(df: pd.DataFrame, task: str = "detail_qa", max_retention: float = 0.15) -> dict:
    """Issue 4's frontier bars on `task`, measured (reported, not asserted): ResAdapt at retention <= 15%
    against Vanilla - 2 points, FixedScale at the same target + 15 points, and 90% of the Oracle."""
    f = frontier(df, task)
    if f.empty:
        return {}

    def acc(method: str, r: str) -> float | None:
        row = f[(f.method == method) & (f.R == r)]
        return float(row.accuracy.iloc[0]) if len(row) else None

    vanilla = acc("vanilla", "own")
    out: dict[str, Any] = {"task": task, "vanilla": vanilla, "rows": {}}
    for _, r in f[(f.method.isin(["resadapt", "resadapt_hard"])) & (f.retention <= max_retention)].iterrows():
        fixed, oracle = acc("fixed_scale", r.R), acc("oracle", r.R)
        key = f"{r.method}@{r.R}"
        out["rows"][key] = {
            "accuracy": float(r.accuracy),
            "retention": float(r.retention),
            "fixed_scale": fixed,
            "oracle": oracle,
            "ge_vanilla_minus_2_points": None if vanilla is None else bool(r.accuracy >= vanilla - 0.02),
            "ge_fixed_scale_plus_15_points": None if fixed is None else bool(r.accuracy >= fixed + 0.15),
            "ge_90pct_of_oracle": None if oracle is None else bool(r.accuracy >= 0.9 * oracle),
        }
    return out


def frames_checks(df: pd.DataFrame, reference_frames: int, method: str = "resadapt_hard") -> dict:
    """ResAdapt with >= 32 frames at the token budget of Vanilla with `reference_frames` frames: relative gain."""
    t = frames_table(df)
    if ("vanilla", reference_frames) not in t.index:
        return {}
    base = float(t.loc[("vanilla", reference_frames), "accuracy_%"])
    out = {"reference": f"vanilla@{reference_frames}", "reference_accuracy_%": base, "rows": {}}
    for (m, f), row in t.iterrows():
        if m == method and f >= 32:
            gain = (row["accuracy_%"] - base) / base if base > 0 else float("nan")
            out["rows"][str(f)] = {
                "accuracy_%": float(row["accuracy_%"]),
                "visual_tokens": float(row["visual_tokens"]),
                "relative_gain": gain,
                "gain_ge_15pct": bool(gain >= 0.15),
            }
    return out


def np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------------------------------------------------
# The evaluate stage.

ALLOCATOR_METHODS = ("resadapt", "resadapt_hard", "frame_selection")


def stage_cells(params) -> list[Cell]:
    """The main grid (every method x budget x source at each main frame count; unbudgeted methods once)
    and the frames-scaling grid (`frames_methods` on `frames_task` at each of `frames`, budgeted methods at
    the token budget Vanilla has with `frames_reference` frames: tokens grow linearly with frames, so that is
    R = reference / F)."""
    ev = params.evaluate
    sources = [*ev.tasks, *(b.name for b in ev.benchmarks)]
    cells = []
    for f in ev.main_frames(params.data.num_frames):
        cells += grid_cells("main", sources, f, ev.methods, ev.budgets)
    for f in ev.frames:
        cells += grid_cells(
            "frames", [ev.frames_task], f, ev.frames_methods, [min(1.0, ev.frames_reference / f)]
        )
    return cells


def source_rows(params, source: str) -> tuple[list[dict], Path]:
    """Rows of an evaluation source and the folder their media paths are relative to: an embedded task's
    test split, or a configured real benchmark read from its official layout."""
    ev = params.evaluate
    for b in ev.benchmarks:
        if b.name == source:
            table = load_real_benchmark(b.name, b.root, b.split, b.limit or ev.samples_per_task)
            return [dict(r) for r in table], Path(b.root)
    return split_rows(params.data.root, "test", [source], ev.samples_per_task), Path(params.data.root)


def stage_context(params, model, processor, methods: Iterable[str]) -> MethodContext:
    """Method context for the stage; loads the trained Allocator only when a method needs it."""
    context = MethodContext(
        geometry=VisionGeometry.from_processor(processor),
        s_min=params.budget.s_min,
        seed=params.seed,
    )
    if set(methods) & set(ALLOCATOR_METHODS):
        path = Path(params.allocator.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"allocator.path {path} holds no trained Allocator; run the train stage (dvc repro train)"
            )
        context.allocator = Allocator.from_pretrained(path)
        context.allocator_tokenizer = query_tokenizer(params.allocator, processor)
    return context


def _evaluator(
    params, model, processor, methods: Iterable[str], server: tuple[str, str] | None = None
) -> Evaluator:
    """The stage's Evaluator; with `server` (url, model name) the input-side methods generate on vLLM.

    Token-pruning methods always run on transformers: they change the LLM's input after the vision encoder,
    which an unmodified inference engine does not expose.
    """
    context = stage_context(params, model, processor, methods)
    gen = params.backbone.generation

    def pruned(method: str, keep_ratio: float):
        return PrunedBackend(model, processor, method, keep_ratio, gen.max_new_tokens, gen.batch_size)

    backend = None
    if server is not None:
        backend = VLLMBackend(server[0], server[1], processor, gen.max_new_tokens, gen.batch_size)
    return Evaluator(model, processor, context, gen.max_new_tokens, gen.batch_size, pruned, backend)


def run_group(evaluator: Evaluator, params, cells: list[Cell]) -> list[dict]:
    """Cells sharing (source, frames): the samples are decoded once and the allocations computed once."""
    rows, root = source_rows(params, cells[0].task)
    samples, decode = load_samples(rows, root, cells[0].frames)
    out = [r for cell in cells for r in evaluator.run_cell(cell, samples, decode)]
    evaluator.context.cache.clear()
    return out


_WORKER: dict = {}


def _init_worker(params, server: tuple[str, str] | None) -> None:
    torch.set_num_threads(1)
    model, processor = load_backbone(params.backbone.path)
    _WORKER["params"] = params
    methods = [c.method for c in stage_cells(params)]
    _WORKER["evaluator"] = _evaluator(params, model, processor, methods, server)


def _run_in_worker(job: tuple[int, list[Cell]]) -> tuple[int, list[dict]]:
    index, cells = job
    return index, run_group(_WORKER["evaluator"], _WORKER["params"], cells)


def run_stage(
    params, model, processor, results_path: str | Path, overwrite: bool = False, workers: int = 1
) -> pd.DataFrame:
    """Run every cell of `stage_cells` on the test split and log each sample to `results_path` (JSONL).

    With `workers` > 1 the (task, frames) groups go to that many spawned processes (one thread each, the
    backbone loaded from the backbone stage's output), largest first; results do not depend on the split.
    With `evaluate.backend: vllm` a vLLM server is started for the run and stopped after it, also on error.
    """
    cells = stage_cells(params)
    log = ResultsLog(results_path, overwrite)
    with contextlib.ExitStack() as stack:
        server = None
        if params.evaluate.backend == "vllm":
            srv = stack.enter_context(server_from_params(params))
            server = (srv.url, srv.model_name)
        results = _run_cells(params, model, processor, cells, workers, server)
    for i in sorted(results):
        log.write(results[i])
    return read_results(log.path)


def _run_cells(params, model, processor, cells, workers, server) -> dict[int, list[dict]]:
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.frames), []).append(c)
    jobs = list(enumerate(groups.values()))
    results: dict[int, list[dict]] = {}
    bar = tqdm(total=len(cells), desc="evaluate", mininterval=5)
    if workers <= 1:
        evaluator = _evaluator(params, model, processor, {c.method for c in cells}, server)
        for i, group in jobs:
            results[i] = run_group(evaluator, params, group)
            bar.update(len(group))
    else:
        import multiprocessing as mp

        jobs.sort(key=lambda j: -len(j[1]) * j[1][0].frames)
        with mp.get_context("spawn").Pool(workers, _init_worker, (params, server)) as pool:
            for i, out in pool.imap_unordered(_run_in_worker, jobs):
                results[i] = out
                bar.update(len(groups[list(groups)[i]]))
    bar.close()
    return results


def stage_metrics(df: pd.DataFrame, params) -> dict:
    """Everything the report states, for `dvc metrics show`: both tables, frames scaling, overhead, checks."""
    ev = params.evaluate

    def records(t: pd.DataFrame) -> dict:
        def name(k) -> str:
            return " ".join(str(x) for x in k if str(x)) if isinstance(k, tuple) else str(k)

        return {name(k): {name(c): v for c, v in row.items()} for k, row in t.to_dict("index").items()}

    return {
        "qa": records(qa_table(df)),
        "grounding": records(grounding_table(df)),
        "frames": records(frames_table(df)),
        "frontier_detail_qa": frontier_checks(df, "detail_qa"),
        "frames_scaling": frames_checks(df, ev.frames_reference),
        "overhead": overhead(df, ev.overhead_frames),
        "speedup_at_lowest_retention": overhead(df, max(ev.frames)),
        "samples": int(len(df)),
    }


def check_lines(metrics: dict) -> list[str]:
    """The issue's bars in words, each with the measured figure and, where it falls short, by how much."""
    lines = []
    front = metrics.get("frontier_detail_qa") or {}
    van = front.get("vanilla")
    for key, r in (front.get("rows") or {}).items():
        acc, ret = 100 * r["accuracy"], 100 * r["retention"]
        head = f"{key} on detail QA: {acc:.1f}% at retention {ret:.1f}%"
        bars = []
        if van is not None:
            bars.append(("Vanilla - 2 points", 100 * van - 2))
        if r["fixed_scale"] is not None:
            bars.append(("FixedScale + 15 points", 100 * r["fixed_scale"] + 15))
        if r["oracle"] is not None:
            bars.append(("90% of the Oracle", 90 * r["oracle"]))
        parts = [
            f"{name} = {bar:.1f}: " + ("met" if acc >= bar - 1e-9 else f"short by {bar - acc:.1f} points")
            for name, bar in bars
        ]
        lines.append(head + "; " + "; ".join(parts))
    frames = metrics.get("frames_scaling") or {}
    for f, r in (frames.get("rows") or {}).items():
        gain = 100 * r["relative_gain"]
        lines.append(
            f"resadapt_hard with {f} frames at the token budget of {frames['reference']} "
            f"({frames['reference_accuracy_%']:.1f}%): {r['accuracy_%']:.1f}%, {gain:+.1f}% relative "
            + ("(bar +15%: met)" if r["gain_ge_15pct"] else f"(bar +15%: short by {15 - gain:.1f} points)")
        )
    for key in ("overhead", "speedup_at_lowest_retention"):
        o = metrics.get(key) or {}
        if o:
            lines.append(
                f"{o['method']} at {o['frames']} frames (retention {100 * o['retention']:.1f}%): Allocator "
                f"{o['allocator_ms']:.0f} ms = {100 * o['allocator_share']:.0f}% of {o['end_to_end_ms']:.0f} ms "
                f"end to end; Vanilla {o['vanilla_end_to_end_ms']:.0f} ms; speed-up {o['speedup_over_vanilla']:.2f}x"
            )
    return lines


def compare_results(reference: pd.DataFrame, other: pd.DataFrame) -> dict:
    """Two logs of the same grid (e.g. transformers vs vLLM): prediction agreement, token accounting and
    the largest difference in any table cell (points)."""
    key = ["grid", "task", "frames", "method", "budget", "id"]
    a = reference.assign(budget=reference.budget.fillna(-1.0))
    b = other.assign(budget=other.budget.fillna(-1.0))
    m = a.merge(b, on=key, suffixes=("_a", "_b"))
    if len(m) != len(a) or len(m) != len(b):
        raise ValueError(f"the logs do not hold the same samples ({len(a)} vs {len(b)}, {len(m)} in common)")
    same = m.prediction_a == m.prediction_b
    tables = {
        k: (fn(reference), fn(other))
        for k, fn in (("qa", qa_table), ("grounding", grounding_table), ("frames", frames_table))
    }
    return {
        "samples": len(m),
        "identical_predictions": float(same.mean()),
        "differing": m.loc[~same, key + ["prediction_a", "prediction_b"]].to_dict("records"),
        "visual_tokens_equal": float((m.visual_tokens_a == m.visual_tokens_b).mean()),
        "prompt_tokens_equal": float((m.prompt_tokens_a == m.prompt_tokens_b).mean()),
        "max_table_difference": {
            k: float((x - y).abs().max().max()) if not x.empty else 0.0 for k, (x, y) in tables.items()
        },
    }
