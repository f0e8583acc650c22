"""The `backbone` stage: train the tiny backbone (or point at a checkpoint) and calibrate the benchmark on it.

Calibration asks whether resolution matters on the benchmark and whether the question decides where
(`resadapt.calibration`); this module turns that into the stage's metrics, checks and figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from resadapt.backbone import (
    TinyBackboneSpec,
    TransformersBackend,
    build_tiny_backbone,
    load_backbone,
    save_backbone,
    write_pointer,
)
from resadapt.budget import VisionGeometry, realise, resize_video
from resadapt.calibration import Condition, calibrate, chance_levels, summarise
from resadapt.config import Params
from resadapt.data.embedded import load_benchmark
from resadapt.data.sample import load_sample
from resadapt.sft import split_examples, train_backbone


def _fresh_output(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"backbone.path {path} already holds files; remove it first (dvc repro does this for declared outputs)"
        )


def backbone_stage(params: Params):
    """(model, processor, training log) for the profile: train the tiny backbone, or point at a checkpoint.

    The stage output is always the folder `backbone.path`: the trained tiny model itself, or, for
    `backbone.source: path`, a small pointer file to the external checkpoint (never a copy of 15 GB, and
    never something DVC would delete).
    """
    out = Path(params.backbone.path)
    _fresh_output(out)
    if params.backbone.source == "path":
        model, processor = load_backbone(params.backbone.checkpoint)
        write_pointer(out, params.backbone.checkpoint)
        return model, processor, pd.DataFrame()
    model, processor = build_tiny_backbone(tiny_spec(params))
    dataset = load_benchmark(params.data.root)
    examples = split_examples(list(dataset["train"]), params.data.root, params.data.num_frames)
    log: list[dict] = []

    def record(entry: dict) -> None:
        log.append(entry)
        if entry["step"] % 50 == 0:  # papermill --log-output shows these lines while the stage runs
            print({k: v for k, v in entry.items() if k != "grad_norm"}, flush=True)

    train_backbone(model, processor, examples, params.backbone.sft, params.budget.s_min, params.seed, record)
    save_backbone(model, processor, out)
    return model, processor, pd.DataFrame(log)


def tiny_spec(params: Params) -> TinyBackboneSpec:
    """The tiny backbone `backbone.tiny` describes, with the budget's pixel clamps and the run's seed."""
    return TinyBackboneSpec(
        **params.backbone.tiny.model_dump(),
        min_pixels=params.budget.min_pixels,
        max_pixels=params.budget.max_pixels,
        seed=params.seed,
    )


def phase_summary(log: pd.DataFrame) -> dict:
    """Steps and seconds of each training phase (the steps are the params'; the seconds this machine's)."""
    if log.empty:
        return {}
    return {
        str(stage): {"steps": int(part.step.max()), "seconds": float(part.time_s.max())}
        for stage, part in log.groupby("stage", sort=False)
    }


def calibration_conditions(params: Params) -> list[Condition]:
    uniform = [Condition("uniform", s) for s in params.backbone.calibration.scales]
    return [Condition("full"), *uniform, Condition("oracle"), Condition("anti_oracle")]


def calibration_samples(params: Params, split: str = "test"):
    dataset = load_benchmark(params.data.root)
    if split not in dataset:
        raise KeyError(f"benchmark at {params.data.root} has no split {split!r}")
    rows = list(dataset[split])
    cal = params.backbone.calibration
    samples = []
    for task in cal.tasks:
        task_rows = [r for r in rows if r["task"] == task][: cal.max_samples_per_task]
        samples += [load_sample(r, params.data.root, params.data.num_frames) for r in task_rows]
    return samples


def calibrate_backbone(params: Params, model, processor, split: str = "test"):
    """Per-sample calibration log and its summary table (accuracy and measured retention per condition).

    The conditions are shared among `backbone.calibration.workers` spawned processes (one thread each, each
    loading the backbone from `backbone.path`), balanced by the visual tokens they feed. A condition is
    generated in the same batches whichever process runs it, so the log does not depend on the workers."""
    samples = calibration_samples(params, split)
    geom = VisionGeometry.from_processor(processor)
    conditions = calibration_conditions(params)
    workers = min(params.backbone.calibration.workers, len(conditions))
    if workers <= 1:
        per_sample = _calibrate(params, model, processor, samples, conditions)
    else:
        import multiprocessing as mp

        shares = _share_conditions(conditions, samples, geom, params.budget.s_min, workers)
        with mp.get_context("spawn").Pool(workers) as pool:
            logs = pool.map(_calibration_job, [(params, split, share) for share in shares])
        by_condition = {c: log[log.condition == c] for log in logs for c in log.condition.unique()}
        per_sample = pd.concat([by_condition[c.name] for c in conditions], ignore_index=True)
    return per_sample, summarise(per_sample, chance_levels(samples))


def _calibrate(params: Params, model, processor, samples, conditions: list[Condition]) -> pd.DataFrame:
    gen = params.backbone.generation
    backend = TransformersBackend(model, processor, gen.max_new_tokens, gen.batch_size)
    geom = VisionGeometry.from_processor(processor)
    return calibrate(backend, samples, conditions, geom, params.budget.s_min)


def _calibration_job(job: tuple[Params, str, list[Condition]]) -> pd.DataFrame:
    import torch

    params, split, conditions = job
    torch.set_num_threads(1)
    model, processor = load_backbone(params.backbone.path)
    return _calibrate(params, model, processor, calibration_samples(params, split), conditions)


def _share_conditions(conditions, samples, geom, s_min: float, workers: int) -> list[list[Condition]]:
    """Conditions dealt to `workers`, the dearest first to the least loaded (cost: visual tokens fed)."""
    tp = geom.temporal_patch_size
    cost = {c: sum(realise(s, c.scales(s, s_min, tp), geom).tokens for s in samples) for c in conditions}
    shares: list[list[Condition]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for c in sorted(conditions, key=lambda c: -cost[c]):
        k = int(np.argmin(load))
        shares[k].append(c)
        load[k] += cost[c]
    return [sh for sh in shares if sh]


LEVEL_GAP = 0.05  # accuracies closer than this (about one standard error at 150 samples) are one level


def distinct_levels(accuracies, gap: float = LEVEL_GAP) -> list[float]:
    """The distinct accuracy levels among `accuracies`: sorted, a new level wherever a value lies more than
    `gap` above the previous level's lowest value."""
    levels: list[float] = []
    for a in sorted(float(x) for x in accuracies):
        if not levels or a - levels[-1] > gap:
            levels.append(a)
    return levels


def _low_uniform(part: pd.DataFrame) -> pd.DataFrame:
    """The uniform condition whose measured retention is nearest the table's low budget (R about 0.135)."""
    uniform = part[part.kind == "uniform"]
    return uniform.iloc[(uniform.retention - 0.135).abs().argsort()[:1]]


def calibration_metrics(
    table: pd.DataFrame, params: Params, task: str = "detail_qa", coarse_task: str = "coarse_qa"
) -> dict:
    """Nested metrics for `dvc metrics show` plus the calibration checks on `task` (and on `coarse_task`,
    when calibrated).

    The checks are reported, not asserted: they say whether the benchmark separates allocations.
    """
    metrics: dict = {"tasks": {}}
    for t, part in table.groupby("task", sort=False):
        metrics["tasks"][t] = {
            r.condition: {"accuracy": round(float(r.accuracy), 4), "retention": round(float(r.retention), 4)}
            for r in part.itertuples()
        }
    part = table[table.task == task].set_index("condition")
    if part.empty:
        return metrics
    chance = float(part["chance"].iloc[0])
    uniform = part[part.kind == "uniform"]
    low = _low_uniform(part)
    full = float(part.loc["full", "accuracy"])
    oracle = part.loc["oracle"]
    anti = part.loc["anti_oracle"]
    levels = distinct_levels(uniform.accuracy)
    metrics["checks"] = {
        "task": task,
        "chance": chance,
        "full_accuracy": round(full, 4),
        "full_at_least_0.90": bool(full >= 0.90),
        "uniform_low_condition": str(low.index[0]),
        "uniform_low_retention": round(float(low.retention.iloc[0]), 4),
        "uniform_low_accuracy": round(float(low.accuracy.iloc[0]), 4),
        "uniform_low_at_most_chance_plus_0.15": bool(float(low.accuracy.iloc[0]) <= chance + 0.15),
        "uniform_levels": [round(x, 4) for x in levels],
        "uniform_at_least_3_levels": bool(len(levels) >= 3),
        "oracle_retention": round(float(oracle.retention), 4),
        "oracle_accuracy": round(float(oracle.accuracy), 4),
        "oracle_at_least_full_minus_0.05": bool(float(oracle.accuracy) >= full - 0.05),
        "anti_oracle_retention": round(float(anti.retention), 4),
        "anti_oracle_accuracy": round(float(anti.accuracy), 4),
        "anti_oracle_at_most_chance_plus_0.15": bool(float(anti.accuracy) <= chance + 0.15),
    }
    coarse = table[table.task == coarse_task].set_index("condition")
    if not coarse.empty:
        low = _low_uniform(coarse)
        c_full = float(coarse.loc["full", "accuracy"])
        metrics["checks"]["coarse"] = {
            "task": coarse_task,
            "chance": float(coarse["chance"].iloc[0]),
            "full_accuracy": round(c_full, 4),
            "uniform_low_condition": str(low.index[0]),
            "uniform_low_retention": round(float(low.retention.iloc[0]), 4),
            "uniform_low_accuracy": round(float(low.accuracy.iloc[0]), 4),
            "uniform_low_at_least_full_minus_0.10": bool(float(low.accuracy.iloc[0]) >= c_full - 0.10),
        }
    return metrics


def plot_resolution_samples(params: Params, processor, scales=(1.0, 0.35), split: str = "test"):
    """Figure: the evidence chunk and one other chunk of a test video at each scale, as the backbone gets them."""
    import matplotlib.pyplot as plt

    dataset = load_benchmark(params.data.root)
    row = next(r for r in dataset[split] if r["task"] == "detail_qa")
    sample = load_sample(row, params.data.root, params.data.num_frames)
    geom = VisionGeometry.from_processor(processor)
    tp = geom.temporal_patch_size
    ev = int(np.flatnonzero(sample.evidence_mask)[0]) // tp
    other = (ev + 1) % (len(sample.frames) // tp)
    fig, axes = plt.subplots(2, len(scales), figsize=(3.2 * len(scales), 6.4), squeeze=False)
    for j, s in enumerate(scales):
        tv = resize_video(sample.frames, np.full(len(sample.frames), s), geom)
        for i, (k, label) in enumerate([(ev, "evidence"), (other, "other")]):
            chunk = tv.chunks[k][0]
            axes[i, j].imshow(chunk, interpolation="nearest")
            axes[i, j].set_title(f"s={s:g}: {chunk.shape[1]}x{chunk.shape[0]} px, {label} chunk", fontsize=8)
            axes[i, j].axis("off")
    fig.suptitle(f"{row['question']}  answer: {row['answer']}")
    return fig


def plot_calibration(table: pd.DataFrame):
    """Accuracy against measured retention, one panel per task: the uniform-scale curve (with full
    resolution at retention 1), the Oracle and anti-Oracle points, and chance as a dotted line."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(table.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.1 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        part = table[table.task == task]
        curve = part[part.kind.isin(["uniform", "full"])].sort_values("retention")
        ax.plot(curve.retention, curve.accuracy, "o-", label="uniform scale")
        for cond, marker in (("oracle", "*"), ("anti_oracle", "X")):
            point = part[part.kind == cond]
            ax.plot(point.retention, point.accuracy, marker, markersize=11, label=cond.replace("_", "-"))
        chance = float(part["chance"].iloc[0])
        if not np.isnan(chance):
            ax.axhline(chance, color="grey", linestyle=":", label="chance (majority answer)")
        ax.set(title=task, xlabel="measured retention", xlim=(0, 1.05), ylim=(-0.02, 1.02))
    axes[0, 0].set_ylabel("accuracy (grounding: mIoU)")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_training(log: pd.DataFrame, window: int = 25):
    """Loss curves of each training phase (rolling mean over `window` steps, raw values faint)."""
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(log.stage))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.8 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        part = log[log.stage == stage]
        col = "loss" if "loss" in part and part["loss"].notna().any() else "lm_loss"
        ax.plot(part.time_s, part[col], alpha=0.2, color="C0")
        ax.plot(part.time_s, part[col].rolling(window, min_periods=1).mean(), color="C0")
        ax.set(
            title=f"{stage}: {'dense token' if col == 'loss' else 'answer'} loss",
            xlabel="seconds",
            yscale="log",
        )
    fig.tight_layout()
    return fig
