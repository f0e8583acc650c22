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

import contextlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from resadapt.backbone import Generation, TransformersBackend, build_inputs
from resadapt.baselines import Method, MethodContext, build_method, realise
from resadapt.calibration import LoadedSample, load_sample
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
IOU_THRESHOLDS = (0.3, 0.5, 0.7)


# ---------------------------------------------------------------------------------------------------------
# Generation with a per-stage time breakdown.


class _StepClock(BaseStreamer):
    """Records when generate hands over the prompt and each new token (the first one ends the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


@dataclass
class TimedGeneration:
    generation: Generation
    timings: dict[str, float]


class TimedTransformersBackend(TransformersBackend):
    """Greedy transformers generation (as `TransformersBackend`) that also splits each batch's time into
    preprocess / prefill / generate."""

    @torch.inference_mode()
    def generate_timed(self, visuals, questions) -> list[TimedGeneration]:
        out: list[TimedGeneration] = []
        for i in range(0, len(visuals), self.batch_size):
            vis, qs = visuals[i : i + self.batch_size], questions[i : i + self.batch_size]
            t0 = time.perf_counter()
            batch = build_inputs(self.processor, vis, qs, question_first=self.question_first)
            t1 = time.perf_counter()
            clock = _StepClock()
            seq = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                streamer=clock,
            )
            t3 = time.perf_counter()
            t2 = clock.times[1] if len(clock.times) > 1 else t3
            n = len(vis)
            timings = {"preprocess": (t1 - t0) / n, "prefill": (t2 - t1) / n, "generate": (t3 - t2) / n}
            texts = self.processor.tokenizer.batch_decode(
                seq[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            for j, text in enumerate(texts):
                row = ids[j][mask[j]].tolist()
                n_vis = sum(t in self.visual_ids for t in row)
                gen = Generation(text.strip(), n_vis, len(row), (t3 - t0) / n)
                out.append(TimedGeneration(gen, dict(timings)))
        return out


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
    _methods: dict[str, Method] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = TimedTransformersBackend(
                self.model, self.processor, self.max_new_tokens, self.batch_size
            )

    def method(self, name: str) -> Method:
        if name not in self._methods:
            self._methods[name] = build_method(name, self.context)
        return self._methods[name]

    def run_cell(
        self, cell: Cell, samples: list[LoadedSample], decode_seconds: dict[str, float]
    ) -> list[dict]:
        method = self.method(cell.method)
        samples = [s for s in samples if method.supports_images or not s.is_image]
        if not samples:
            return []
        plans = method.plan_batch(samples, cell.budget)
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


def load_samples(rows: Sequence[dict], root: str | Path, num_frames: int) -> tuple[list[LoadedSample], dict]:
    """Decoded samples and the seconds each took to decode (`num_frames` sampled uniformly per video)."""
    samples, seconds = [], {}
    for r in rows:
        t0 = time.perf_counter()
        samples.append(load_sample(r, root, num_frames))
        seconds[str(r["id"])] = time.perf_counter() - t0
    return samples, seconds


def grid_cells(
    grid: str, tasks: Iterable[str], frames: int, methods: Iterable[str], budgets: Iterable[float]
) -> list[Cell]:
    """Every (task, method, budget) at one frame count; unbudgeted methods once."""
    from resadapt.baselines import METHODS

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
    times = pd.DataFrame(list(df.pop("seconds"))).add_prefix("t_")
    return pd.concat([df, times], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Tables.


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
    from resadapt.data.benchmarks import load_real_benchmark
    from resadapt.rl_stages import rows as benchmark_rows

    ev = params.evaluate
    for b in ev.benchmarks:
        if b.name == source:
            table = load_real_benchmark(b.name, b.root, b.split, b.limit or ev.samples_per_task)
            return [dict(r) for r in table], Path(b.root)
    return benchmark_rows(params, "test", [source], limit=ev.samples_per_task), Path(params.data.root)


def stage_context(params, model, processor, methods: Iterable[str]) -> MethodContext:
    """Method context for the stage; loads the trained Allocator only when a method needs it."""
    from resadapt.budget import VisionGeometry

    context = MethodContext(
        geometry=VisionGeometry.from_processor(processor),
        s_min=params.budget.s_min,
        seed=params.seed,
    )
    if set(methods) & set(ALLOCATOR_METHODS):
        from resadapt.allocator import Allocator
        from resadapt.rl_stages import allocator_tokenizer

        path = Path(params.allocator.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"allocator.path {path} holds no trained Allocator; run the train stage (dvc repro train)"
            )
        context.allocator = Allocator.from_pretrained(path)
        context.allocator_tokenizer = allocator_tokenizer(params, processor)
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
        from resadapt.baselines.token_pruning import PrunedBackend

        return PrunedBackend(model, processor, method, keep_ratio, gen.max_new_tokens, gen.batch_size)

    backend = None
    if server is not None:
        from resadapt.vllm_backend import VLLMBackend

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
    from resadapt.pipeline import load_stage_backbone

    torch.set_num_threads(1)
    model, processor = load_stage_backbone(params)
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
    from resadapt.vllm_backend import server_from_params

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
