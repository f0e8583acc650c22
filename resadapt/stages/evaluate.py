"""The `evaluate` stage: every method x target retention x frame count x task on the test split, the
tables and bar checks of its report (`reports/evaluate.ipynb`) and `metrics/evaluate.json`.

The per-sample work is `resadapt.evaluate.Evaluator`; this module decides the grid from params, spreads it
over worker processes, and turns the log into the paper's tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from resadapt.allocator import Allocator, build_allocator, query_tokenizer
from resadapt.backbone import load_backbone
from resadapt.baselines import MethodContext
from resadapt.baselines.token_pruning import PrunedBackend
from resadapt.budget import VisionGeometry
from resadapt.data.benchmarks import load_real_benchmark
from resadapt.data.embedded import split_rows
from resadapt.data.sample import load_samples
from resadapt.evaluate import (
    IOU_THRESHOLDS,
    TIMING_KEYS,
    Cell,
    Evaluator,
    ResultsLog,
    budget_label,
    grid_cells,
    read_results,
)
from resadapt.lmms_eval import write_lmms_eval
from resadapt.stats import fmt, grouped_ci, mean_ci, paired_ci
from resadapt.vllm_backend import VLLMBackend, server_from_params

# ---------------------------------------------------------------------------------------------------------
# Tables, aggregated from the per-sample log only.


_SAMPLE_KEYS = ["grid", "task", "frames", "method", "budget", "id"]


def seed_mean(df: pd.DataFrame) -> pd.DataFrame:
    """The log with each sample of a method run under several seeds' Allocators as one row: its numbers
    (score, retention, tokens, timings) averaged over the seeds, so table cells are the mean over seeds
    and their intervals resample test samples, not seeds x samples."""
    seeded = df["seed"].notna() if "seed" in df else pd.Series(False, index=df.index)
    if not seeded.any():
        return df
    part = df[seeded].assign(_order=df.index[seeded])
    numeric = [
        c
        for c in part.columns
        if c not in _SAMPLE_KEYS
        and c != "seed"
        and pd.api.types.is_numeric_dtype(part[c])
        and not pd.api.types.is_bool_dtype(part[c])
    ]
    how = {c: ("min" if c == "_order" else "mean") for c in numeric} | {
        c: "first" for c in part.columns if c not in numeric and c not in _SAMPLE_KEYS
    }
    merged = part.groupby(_SAMPLE_KEYS, sort=False, dropna=False).agg(how).reset_index()
    merged["seed"] = None
    out = pd.concat([df[~seeded].assign(_order=df.index[~seeded]), merged], ignore_index=True)
    return out.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def seeds_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (grid, source, frames, method, R) of the methods run with every seed's Allocator: each seed's
    accuracy / mIoU (%) and retention (%), then their mean and sd over seeds."""
    part = df[df["seed"].notna()] if "seed" in df else df.iloc[:0]
    part = part[part.method.isin(SEEDED_METHODS)]
    if part.empty:
        return pd.DataFrame()
    part = _with_labels(part).assign(seed=lambda d: d.seed.astype(int))
    keys = ["grid", "task", "frames", "method", "R"]
    per = part.groupby([*keys, "seed"], sort=False).agg(
        score=("score", "mean"), retention=("retention", "mean")
    )
    acc = per["score"].unstack("seed") * 100
    ret = per["retention"].unstack("seed") * 100
    out = pd.concat(
        {
            **{f"seed {c}": acc[c] for c in acc.columns},
            "mean": acc.mean(axis=1),
            "sd": acc.std(axis=1, ddof=1).fillna(0.0),  # one seed: 0
            "retention_% mean": ret.mean(axis=1),
        },
        axis=1,
    )
    return out.round(1)


def _with_labels(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["R"] = [budget_label(b) for b in df["budget"]]
    return df


def _sources(part: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(part["task"]))  # in the order the grid ran them


def _cells(part: pd.DataFrame, keys: list[str], value: str = "score", scale: float = 100.0) -> pd.DataFrame:
    """Mean, low, high (95% bootstrap) of `value` per group, indexed by `keys`."""
    return grouped_ci(part, keys, value, scale).set_index(keys)


ROW_KEYS = ["frames", "method", "R"]  # the rows of Tables 1 and 2


def _by_source(df: pd.DataFrame, grid: str, grounding: bool):
    """The (frames, method, R) rows of one grid's QA or grounding samples: (labelled part, its row order,
    then (source, its samples) in the order the grid ran them); None when there are none."""
    df = seed_mean(df)
    part = _with_labels(df[(df.grid == grid) & ((df.kind == "grounding") == grounding)])
    if part.empty:
        return None
    order = part[ROW_KEYS].drop_duplicates().set_index(ROW_KEYS).index
    return part, order, [(source, part[part.task == source]) for source in _sources(part)]


def qa_table(df: pd.DataFrame, grid: str = "main") -> pd.DataFrame:
    """Table 1 layout: rows (frames, method, target R); per QA source its accuracy (%) with the 95% bootstrap
    interval (`acc_%`, `low`, `high`) and its mean measured retention (%), then the mean retention over all."""
    found = _by_source(df, grid, grounding=False)
    if found is None:
        return pd.DataFrame()
    part, order, sources = found
    cols = {}
    for source, sub in sources:
        c = _cells(sub, ROW_KEYS)
        for name, stat in (("acc_%", "mean"), ("low", "low"), ("high", "high")):
            cols[(source, name)] = c[stat]
        cols[(source, "retention_%")] = sub.groupby(ROW_KEYS)["retention"].mean() * 100
    cols[("all", "retention_%")] = part.groupby(ROW_KEYS)["retention"].mean() * 100
    return pd.DataFrame(cols).reindex(order).round(1)


def grounding_table(df: pd.DataFrame, grid: str = "main") -> pd.DataFrame:
    """Table 2 layout: rows (frames, method, target R); per source R@0.3/0.5/0.7 and mIoU (%), each with its
    95% bootstrap interval (`<metric> low` / `<metric> high`), and the mean measured retention (%)."""
    found = _by_source(df, grid, grounding=True)
    if found is None:
        return pd.DataFrame()
    _, order, sources = found
    cols = {}
    for source, sub in sources:
        metrics = {f"R@{t}": (sub["score"] >= t).astype(float) for t in IOU_THRESHOLDS}
        for name, values in (metrics | {"mIoU": sub["score"]}).items():
            c = _cells(sub.assign(_v=values), ROW_KEYS, "_v")
            for suffix, stat in (("", "mean"), (" low", "low"), (" high", "high")):
                cols[(source, f"{name}{suffix}")] = c[stat]
        cols[(source, "retention_%")] = sub.groupby(ROW_KEYS)["retention"].mean() * 100
    return pd.DataFrame(cols).reindex(order).round(1)


def frames_table(df: pd.DataFrame) -> pd.DataFrame:
    """Frames scaling at an equal token budget: accuracy (%) with its 95% interval, tokens and retention per
    method and frame count."""
    part = seed_mean(df[df.grid == "frames"])
    if part.empty:
        return pd.DataFrame()
    keys = ["method", "frames"]
    c = _cells(part, keys)
    g = part.groupby(keys)
    return pd.DataFrame(
        {
            "accuracy_%": c["mean"],
            "low": c["low"],
            "high": c["high"],
            "visual_tokens": g["visual_tokens"].mean(),
            "retention_%": g["retention"].mean() * 100,
        }
    ).round(1)


def with_ci(table: pd.DataFrame) -> pd.DataFrame:
    """A table for reading: each mean with its interval as 'mean [low, high]' in one cell."""
    if table.empty:
        return table
    out = {}
    cols = list(table.columns)
    for col in cols:
        head, name = col if isinstance(col, tuple) else ("", col)
        if name.endswith(("low", "high")):
            continue
        low = (head, "low") if name == "acc_%" else (head, f"{name} low")
        high = (head, "high") if name == "acc_%" else (head, f"{name} high")
        if not isinstance(col, tuple):
            low, high = ("low", "high") if name == "accuracy_%" else (f"{name} low", f"{name} high")
        if low in cols and high in cols:
            out[col] = [fmt(m, lo, hi) for m, lo, hi in zip(table[col], table[low], table[high], strict=True)]
        else:
            out[col] = table[col]
    return pd.DataFrame(out, index=table.index)


def latency_table(df: pd.DataFrame, grid: str = "frames") -> pd.DataFrame:
    """Mean milliseconds per sample for each stage, per method and frame count (decode listed apart), with
    the end-to-end time's 95% interval."""
    part = df[df.grid == grid]
    cols = [f"t_{k}" for k in TIMING_KEYS if f"t_{k}" in part.columns]
    g = part.groupby(["method", "frames"])
    out = g[cols].mean() * 1000
    out.columns = [c.removeprefix("t_") for c in cols]
    e2e = _cells(part, ["method", "frames"], "end_to_end_seconds", 1000.0)
    out["end_to_end"], out["end_to_end low"], out["end_to_end high"] = e2e["mean"], e2e["low"], e2e["high"]
    out["decode"] = g["decode_seconds"].mean() * 1000
    return out.round(1)


def frontier(df: pd.DataFrame, task: str, frames: int | None = None, grid: str = "main") -> pd.DataFrame:
    """Accuracy (with its 95% interval) against measured retention per (method, R) on one source at one
    frame count (default: the smallest the grid ran), the efficiency-accuracy frontier."""
    part = seed_mean(df[(df.grid == grid) & (df.task == task)])
    if part.empty:
        return pd.DataFrame(columns=["method", "R", "retention", "accuracy", "low", "high", "n"])
    part = _with_labels(part[part.frames == (frames if frames is not None else part.frames.min())])
    c = _cells(part, ["method", "R"], scale=1.0)
    out = part.groupby(["method", "R"], sort=False).agg(retention=("retention", "mean"))
    out["accuracy"], out["low"], out["high"], out["n"] = c["mean"], c["low"], c["high"], c["n"]
    return out.reset_index()


def overhead(df: pd.DataFrame, frames: int, method: str = "resadapt_hard") -> dict:
    """Allocator share of ResAdapt's end-to-end time, and its speed-up over Vanilla at the same frame count,
    with 95% intervals (the speed-up's from resampling the two methods' samples separately)."""
    part = df[(df.grid == "frames") & (df.frames == frames)]
    ours, van = part[part.method == method], part[part.method == "vanilla"]
    if ours.empty or van.empty:
        return {}
    alloc = ours["t_allocator_encode"] + ours["t_allocator_predict"] + ours["t_allocator_budget"]
    e2e, v = ours["end_to_end_seconds"].to_numpy(), van["end_to_end_seconds"].to_numpy()
    rng = np.random.default_rng(0)
    boot = [
        v[rng.integers(0, len(v), len(v))].mean() / e2e[rng.integers(0, len(e2e), len(e2e))].mean()
        for _ in range(1000)
    ]
    share = alloc.to_numpy() / e2e.mean()
    return {
        "frames": int(frames),
        "method": method,
        "retention": float(ours["retention"].mean()),
        "allocator_ms": float(alloc.mean() * 1000),
        "end_to_end_ms": float(e2e.mean() * 1000),
        "allocator_share": float(share.mean()),
        "allocator_share_ci": list(mean_ci(share)[1:]),
        "vanilla_end_to_end_ms": float(v.mean() * 1000),
        "speedup_over_vanilla": float(v.mean() / e2e.mean()),
        "speedup_ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
    }


def _paired(df: pd.DataFrame, a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Scores of two (method, R) rows of one frontier slice on the samples both saw, aligned by id; a method
    run with several seeds' Allocators scores each sample by its mean over the seeds."""
    sa = df[(df.method == a[0]) & (df.R == a[1])].groupby("id", sort=False)["score"].mean()
    sb = df[(df.method == b[0]) & (df.R == b[1])].groupby("id", sort=False)["score"].mean()
    common = sa.index.intersection(sb.index)
    return sa.loc[common].to_numpy(), sb.loc[common].to_numpy()


def _bar(df: pd.DataFrame, row: tuple, ref: tuple, weight: float = 1.0, margin: float = 0.0) -> dict | None:
    """Paired check mean(row) >= weight * mean(ref) + margin: the difference with its 95% interval and
    whether it holds at the interval's lower end (and at the point estimate)."""
    a, b = _paired(df, row, ref)
    if len(a) == 0:
        return None
    m, lo, hi = paired_ci(a, b, weight)
    return {
        "reference": f"{ref[0]}@{ref[1]}",
        "reference_accuracy": float(b.mean()),
        "difference": m - margin,
        "ci": [lo - margin, hi - margin],
        "holds": bool(m - margin >= 0),
        "holds_at_ci_low": bool(lo - margin >= 0),
    }


def _nearest_budget(budgets: list[str], retention: float) -> str | None:
    """The grid's target R nearest a measured retention, the higher on a tie (None without budgets)."""
    return min(reversed(budgets), key=lambda b: abs(float(b) - retention), default=None)


def frontier_checks(
    df: pd.DataFrame, task: str = "detail_qa", max_retention: float = 0.15, frames: int | None = None
) -> dict:
    """The frontier bars on `task`, each a paired bootstrap over the same test samples: the deterministic
    ResAdapt row (its own retention, wherever the policy landed: it is the headline) and every hard-budget row at
    retention <= `max_retention`, against Vanilla - 2 points, FixedScale at the same target + 15 points, and 90%
    of the Oracle. The deterministic row is compared with FixedScale and the Oracle at the grid's target R
    nearest its measured retention (the higher on a tie). Not the largest R below it: a policy at 0.146 was
    then held against an Oracle at 0.10, where one evidence chunk does not fit, and its Oracle bar held
    vacuously."""
    part = df[(df.grid == "main") & (df.task == task)]
    if part.empty:
        return {}
    part = _with_labels(part[part.frames == (frames if frames is not None else part.frames.min())])
    f = frontier(df, task, frames)
    budgets = sorted({r for r in f.R if r != "own"}, key=float)
    out: dict[str, Any] = {"task": task, "rows": {}}
    rows = ((f.method == "resadapt") & (f.R == "own")) | (
        (f.method == "resadapt_hard") & (f.retention <= max_retention)
    )
    for _, r in f[rows].iterrows():
        at = _nearest_budget(budgets, r.retention) if r.R == "own" else r.R
        row = (r.method, r.R)
        bars = {"ge_vanilla_minus_2_points": _bar(part, row, ("vanilla", "own"), 1.0, -0.02)}
        if at is not None:
            bars["ge_fixed_scale_plus_15_points"] = _bar(part, row, ("fixed_scale", at), 1.0, 0.15)
            bars["ge_90pct_of_oracle"] = _bar(part, row, ("oracle", at), 0.9)
        out["rows"][f"{r.method}@{r.R}"] = {
            "accuracy": float(r.accuracy),
            "ci": [float(r.low), float(r.high)],
            "retention": float(r.retention),
            "compared_at_R": at,
            "bars": {k: v for k, v in bars.items() if v is not None},
        }
    return out


def coarse_checks(
    df: pd.DataFrame, task: str = "coarse_qa", detail_task: str = "detail_qa", frames: int | None = None
) -> dict:
    """Query-aware allocation on a question that needs no detail: the deterministic ResAdapt row on `task`
    against FixedScale at the grid R nearest its retention - 2 points (paired bootstrap), and whether it
    spends less there than on `detail_task` (its measured retention on each)."""
    part = df[(df.grid == "main") & (df.task == task)]
    f = frontier(df, task, frames)
    own = f[(f.method == "resadapt") & (f.R == "own")]
    if part.empty or own.empty:
        return {}
    part = _with_labels(part[part.frames == (frames if frames is not None else part.frames.min())])
    r = own.iloc[0]
    at = _nearest_budget(sorted({b for b in f.R if b != "own"}, key=float), r.retention)
    out: dict[str, Any] = {
        "task": task,
        "accuracy": float(r.accuracy),
        "ci": [float(r.low), float(r.high)],
        "retention": float(r.retention),
        "compared_at_R": at,
        "bars": {},
    }
    if at is not None and (bar := _bar(part, ("resadapt", "own"), ("fixed_scale", at), 1.0, -0.02)):
        out["bars"]["ge_fixed_scale_minus_2_points"] = bar
    detail = frontier(df, detail_task, frames)
    detail_own = detail[(detail.method == "resadapt") & (detail.R == "own")]
    if not detail_own.empty:
        out["detail_task"] = detail_task
        out["detail_retention"] = float(detail_own.retention.iloc[0])
        out["spends_less_than_detail"] = bool(r.retention < detail_own.retention.iloc[0])
    return out


BOUND_TOLERANCE = 1e-9  # a per-seed mean equal to the Oracle's score can differ from it by float rounding


def oracle_bound_checks(df: pd.DataFrame) -> dict:
    """Is the Oracle the upper bound it claims to be? For every (grid, source, frames, target R) and every
    other budgeted input-side method: the paired difference method - Oracle; a flag where its 95% interval
    lies above 0 (the method beats the Oracle beyond noise), by more than `BOUND_TOLERANCE`."""
    from resadapt.baselines import METHODS

    input_side = [m for m, c in METHODS.items() if c.budgeted and c.pruning is None and m != "oracle"]
    part = _with_labels(df[df.method.isin([*input_side, "oracle"]) & df.budget.notna()])
    checked, flags = 0, []
    for (grid, task, frames, R), cell in part.groupby(["grid", "task", "frames", "R"], sort=False):
        if "oracle" not in set(cell.method):
            continue
        for m in sorted(set(cell.method) - {"oracle"}):
            a, b = _paired(cell, (m, R), ("oracle", R))
            if len(a) == 0:
                continue
            checked += 1
            mean, lo, hi = paired_ci(a, b)
            if lo > BOUND_TOLERANCE:
                flags.append(
                    {
                        "grid": grid,
                        "task": task,
                        "frames": int(frames),
                        "R": R,
                        "method": m,
                        "difference": mean,
                        "ci": [lo, hi],
                    }
                )
    return {"comparisons": checked, "flags": flags, "holds": not flags}


def frames_checks(
    df: pd.DataFrame,
    reference_frames: int,
    method: str = "resadapt_hard",
    factor: int = 4,
    gain: float = 0.15,
) -> dict:
    """Frames scaling against the best reference at equal visual tokens: at every frame count F >= `factor` x
    `reference_frames`, `method` with F frames against Vanilla with `reference_frames` frames (the most frames
    Vanilla can have with these tokens), and FixedScale and frame selection with F frames at the same
    tokens. The bar ("gains >= 15% relative over the best of them") is checked against each reference with a
    paired bootstrap of mean(ours) - 1.15 x mean(reference) over the same videos."""
    part = df[df.grid == "frames"].assign(R="f")
    if part.empty or not (part.method == "vanilla").any():
        return {}
    out: dict[str, Any] = {"method": method, "reference_frames": reference_frames, "rows": {}}
    base = part[(part.method == "vanilla") & (part.frames == reference_frames)]
    for F in sorted(part.frames.unique()):
        if F < factor * reference_frames:
            continue
        ours = part[(part.method == method) & (part.frames == F)]
        if ours.empty:
            continue
        refs = {f"vanilla@{reference_frames}": base}
        refs |= {
            f"{m}@{F}": part[(part.method == m) & (part.frames == F)]
            for m in ("fixed_scale", "frame_selection")
        }
        rows = {}
        for name, ref in refs.items():
            if ref.empty:
                continue
            both = pd.concat([ours.assign(method="ours"), ref.assign(method="ref")])
            a, b = _paired(both, ("ours", "f"), ("ref", "f"))
            m, lo, hi = paired_ci(a, b, 1.0 + gain)
            if b.mean() > 0:
                rel = a.mean() / b.mean() - 1.0
            else:
                rel = float("inf") if a.mean() > 0 else float("nan")
            rows[name] = {  # (`gain` is the bar: this loop must not overwrite it)
                "reference_accuracy": float(b.mean()),
                "relative_gain": float(rel),
                "margin": m,
                "margin_ci": [lo, hi],
                "holds_at_ci_low": bool(lo >= 0 and a.mean() > b.mean()),  # 0 vs 0 gains nothing
            }
        out["rows"][str(int(F))] = {
            "accuracy": float(ours.score.mean()),
            "ci": list(mean_ci(ours.score)[1:]),
            "visual_tokens": float(ours.visual_tokens.mean()),
            "references": rows,
            "best_reference": max(rows, key=lambda k: rows[k]["reference_accuracy"]) if rows else None,
            "holds_at_ci_low": bool(rows) and all(r["holds_at_ci_low"] for r in rows.values()),
        }
    return out


def np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------------------------------------------------
# The evaluate stage.

ALLOCATOR_METHODS = ("resadapt", "resadapt_hard", "frame_selection")  # the trained Allocator
# run with every seed's Allocator; frame selection with the first seed's
SEEDED_METHODS = ("resadapt", "resadapt_hard")
PRIOR_METHODS = ("prior_only", "prior_only_hard")  # the untrained one (its relevance prior)


def _with_seeds(cells: list[Cell], seeds: list[int]) -> list[Cell]:
    """ResAdapt's cells once per trained Allocator (`train.seeds`); frame selection with the first one."""
    out = []
    for c in cells:
        if c.method in SEEDED_METHODS:
            out += [dataclasses.replace(c, seed=int(s)) for s in seeds]
        elif c.method in ALLOCATOR_METHODS:
            out.append(dataclasses.replace(c, seed=int(seeds[0])))
        else:
            out.append(c)
    return out


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
    return _with_seeds(cells, params.train.seeds)


def source_rows(params, source: str) -> tuple[list[dict], Path]:
    """Rows of an evaluation source and the folder their media paths are relative to: an embedded task's
    test split, or a configured real benchmark read from its official layout."""
    ev = params.evaluate
    for b in ev.benchmarks:
        if b.name == source:
            table = load_real_benchmark(b.name, b.root, b.split, b.limit or ev.samples_per_task)
            return [dict(r) for r in table], Path(b.root)
    return split_rows(params.data.root, "test", [source], ev.samples_per_task), Path(params.data.root)


def trained_allocators(params) -> dict[int, Allocator]:
    """The train stage's Allocator of every `train.seeds`."""
    out = {}
    for s in params.train.seeds:
        path = params.allocator.seed_path(s)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} holds no trained Allocator (allocator.path, seed {s} of train.seeds); run the "
                "train stage (dvc repro train)"
            )
        out[int(s)] = Allocator.from_pretrained(path)
    return out


def stage_context(
    params, model, processor, methods: Iterable[str], allocators: dict[int, Allocator]
) -> MethodContext:
    """Method context for the stage: the first seed's trained Allocator (of `allocators`) and the untrained
    one (built from `allocator` params and `seed`), each only when a method needs it."""
    context = MethodContext(
        geometry=VisionGeometry.from_processor(processor),
        s_min=params.budget.s_min,
        seed=params.seed,
    )
    if set(methods) & set(ALLOCATOR_METHODS):
        context.allocator = allocators[params.train.seeds[0]]
    if set(methods) & set(PRIOR_METHODS):
        context.prior_allocator = build_allocator(params, model)
    if set(methods) & {*ALLOCATOR_METHODS, *PRIOR_METHODS}:
        context.allocator_tokenizer = query_tokenizer(params.allocator, processor)
    return context


def _evaluator(
    params, model, processor, methods: Iterable[str], server: tuple[str, str] | None = None
) -> Evaluator:
    """The stage's Evaluator; with `server` (url, model name) the input-side methods generate on vLLM.

    Token-pruning methods always run on transformers: they change the LLM's input after the vision encoder,
    which an unmodified inference engine does not expose.
    """
    allocators = trained_allocators(params) if set(methods) & set(ALLOCATOR_METHODS) else {}
    context = stage_context(params, model, processor, methods, allocators)
    gen = params.backbone.generation

    def pruned(method: str, keep_ratio: float):
        return PrunedBackend(model, processor, method, keep_ratio, gen.max_new_tokens, gen.batch_size)

    backend = None
    if server is not None:
        backend = VLLMBackend(server[0], server[1], processor, gen.max_new_tokens, gen.batch_size)
    return Evaluator(
        model, processor, context, gen.max_new_tokens, gen.batch_size, pruned, backend, allocators
    )


def run_group(evaluator: Evaluator, params, cells: list[Cell]) -> list[dict]:
    """Cells sharing (source, frames): the samples are decoded once and the allocations computed once."""
    rows, root = source_rows(params, cells[0].task)
    samples, decode = load_samples(rows, root, cells[0].frames)
    cells = sorted(cells, key=lambda c: -1 if c.seed is None else c.seed)  # one Allocator switch per seed
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
    df = read_results(log.path)
    write_lmms_eval(df, log.path.parent / "lmms_eval")
    return df


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


def _records(t: pd.DataFrame) -> dict:
    def name(k) -> str:
        return " ".join(str(x) for x in k if str(x)) if isinstance(k, tuple) else str(k)

    return {name(k): {name(c): v for c, v in row.items()} for k, row in t.to_dict("index").items()}


def stage_metrics(df: pd.DataFrame, params) -> dict:
    """Everything the report states, for `dvc metrics show`: both tables and frames scaling with their 95%
    intervals, overhead, and every bar check with its paired interval."""
    ev = params.evaluate
    return {
        "qa": _records(qa_table(df)),
        "grounding": _records(grounding_table(df)),
        "frames": _records(frames_table(df)),
        "seeds": _records(seeds_table(df)),
        "frontier_detail_qa": frontier_checks(df, "detail_qa"),
        "coarse_qa": coarse_checks(df, "coarse_qa"),
        "oracle_bound": oracle_bound_checks(df),
        "frames_scaling": frames_checks(df, ev.frames_reference),
        "overhead": overhead(df, ev.overhead_frames),
        "speedup_at_lowest_retention": overhead(df, max(ev.frames)),
        "samples": int(len(df)),
        "samples_per_cell": int(
            df.groupby(["grid", "task", "frames", "method", "budget"], dropna=False).size().min()
        ),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _bar_text(name: str, bar: dict) -> str:
    verdict = (
        "holds at the CI low end"
        if bar["holds_at_ci_low"]
        else ("holds at the point estimate only" if bar["holds"] else "missed")
    )
    return (
        f"{name.replace('_', ' ')} (vs {bar['reference']}): margin {_pct(bar['difference'])} points "
        f"[{_pct(bar['ci'][0])}, {_pct(bar['ci'][1])}], {verdict}"
    )


def check_lines(metrics: dict) -> list[str]:
    """The bars in words: each with its measured difference, 95% interval and whether it holds at the
    interval's lower end (paired bootstrap over the same test samples)."""
    lines = []
    front = metrics.get("frontier_detail_qa") or {}
    for key, r in (front.get("rows") or {}).items():
        head = (
            f"{key} on detail QA: {_pct(r['accuracy'])}% [{_pct(r['ci'][0])}, {_pct(r['ci'][1])}] at retention "
            f"{_pct(r['retention'])}%"
        )
        lines.append(head + "; " + "; ".join(_bar_text(name, bar) for name, bar in r["bars"].items()))
    coarse = metrics.get("coarse_qa") or {}
    if coarse:
        parts = [_bar_text(name, bar) for name, bar in coarse["bars"].items()]
        if "detail_task" in coarse:
            parts.append(
                f"spends less than on {coarse['detail_task']} ({_pct(coarse['detail_retention'])}%): "
                + ("yes" if coarse["spends_less_than_detail"] else "no")
            )
        lines.append(
            f"resadapt@own on {coarse['task']}: {_pct(coarse['accuracy'])}% [{_pct(coarse['ci'][0])}, "
            f"{_pct(coarse['ci'][1])}] at retention {_pct(coarse['retention'])}%; " + "; ".join(parts)
        )
    bound = metrics.get("oracle_bound") or {}
    if bound:
        lines.append(
            f"Oracle upper bound: {bound['comparisons']} paired comparisons, "
            + ("no method above it beyond its CI" if bound["holds"] else f"{len(bound['flags'])} flagged: ")
            + "; ".join(
                f"{f['method']} {f['task']} F={f['frames']} R={f['R']} +{_pct(f['difference'])}"
                for f in bound.get("flags", [])
            )
        )
    frames = metrics.get("frames_scaling") or {}
    for F, r in (frames.get("rows") or {}).items():
        refs = "; ".join(
            f"{name} {_pct(ref['reference_accuracy'])}% ({100 * ref['relative_gain']:+.0f}% relative, "
            + ("holds" if ref["holds_at_ci_low"] else "missed")
            + " at the CI low end)"
            for name, ref in r["references"].items()
        )
        lines.append(
            f"{frames['method']} with {F} frames at equal tokens: {_pct(r['accuracy'])}% "
            f"[{_pct(r['ci'][0])}, {_pct(r['ci'][1])}] vs {refs}; bar >= +15% over every reference: "
            + ("met" if r["holds_at_ci_low"] else "missed")
        )
    for key in ("overhead", "speedup_at_lowest_retention"):
        o = metrics.get(key) or {}
        if o:
            lo, hi = o["speedup_ci"]
            lines.append(
                f"{o['method']} at {o['frames']} frames (retention {_pct(o['retention'])}%): Allocator "
                f"{o['allocator_ms']:.0f} ms = {100 * o['allocator_share']:.0f}% of {o['end_to_end_ms']:.0f} ms "
                f"end to end; Vanilla {o['vanilla_end_to_end_ms']:.0f} ms; speed-up {o['speedup_over_vanilla']:.2f}x "
                f"[{lo:.2f}, {hi:.2f}]"
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
