"""The `figures` stage: the paper's figures in miniature, drawn from the evaluate stage's per-sample log.

Every figure reads only `evaluate.read_results(...)` (plus the decoded test frames for the thumbnails), so
what a figure shows is what the log holds: efficiency-accuracy frontier, frames scaling at an equal token
budget, allocation heatmaps next to the frames (active perception), and the latency breakdown.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from resadapt.baselines import METHODS
from resadapt.data.embedded import split_rows
from resadapt.data.sample import load_sample
from resadapt.evaluate import TIMING_KEYS, budget_label

METHOD_ORDER = list(METHODS)  # the registry's order: baselines first, ResAdapt last


def _palette(methods) -> dict:
    colours = sns.color_palette("tab10", len(METHOD_ORDER))
    return {m: colours[METHOD_ORDER.index(m)] for m in methods if m in METHOD_ORDER}


def frontier_plot(df: pd.DataFrame, tasks=None, frames: int | None = None):
    """Accuracy (grounding: mIoU) against measured retention, one line per method, one panel per source,
    at one frame count of the main grid (default: the smallest)."""
    main = df[df.grid == "main"]
    main = main[main.frames == (frames if frames is not None else main.frames.min())]
    tasks = [t for t in (tasks or list(dict.fromkeys(main.task))) if t in set(main.task)]
    pts = (
        main.assign(R=[budget_label(b) for b in main.budget])
        .groupby(["task", "method", "R"])
        .agg(retention=("retention", "mean"), accuracy=("score", "mean"))
        .reset_index()
    )
    methods = [m for m in METHOD_ORDER if m in set(pts.method)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False, sharey=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        part = pts[pts.task == task].sort_values("retention")
        sns.lineplot(
            part,
            x="retention",
            y="accuracy",
            hue="method",
            hue_order=methods,
            palette=_palette(methods),
            marker="o",
            ax=ax,
            legend=ax is axes[0][-1],
        )
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("measured retention")
        ax.set_ylabel("mIoU" if (main[main.task == task].kind == "grounding").all() else "accuracy")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle("Efficiency-accuracy frontier (test split)")
    fig.tight_layout()
    return fig


def frames_plot(df: pd.DataFrame, reference_frames: int):
    """Accuracy against frame count at the token budget Vanilla has with `reference_frames` frames."""
    part = df[df.grid == "frames"]
    if part.empty:
        return None
    pts = part.groupby(["method", "frames"]).agg(accuracy=("score", "mean"), tokens=("visual_tokens", "mean"))
    pts = pts.reset_index()
    methods = [m for m in METHOD_ORDER if m in set(pts.method)]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for ax, y, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "tokens", "visual tokens fed")):
        sns.lineplot(
            pts,
            x="frames",
            y=y,
            hue="method",
            hue_order=methods,
            palette=_palette(methods),
            marker="o",
            ax=ax,
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(pts.frames)), [str(f) for f in sorted(set(pts.frames))])
        ax.set_ylabel(label)
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(
        f"More frames at the token budget of Vanilla with {reference_frames} frames (Vanilla: all tokens)"
    )
    fig.tight_layout()
    return fig


def latency_plot(df: pd.DataFrame):
    """Stacked mean time per sample by stage, per method and frame count (frames grid)."""
    part = df[df.grid == "frames"]
    if part.empty:
        return None
    cols = [f"t_{k}" for k in TIMING_KEYS]
    mean = part.groupby(["frames", "method"])[cols].mean() * 1000
    mean.columns = list(TIMING_KEYS)
    frames = sorted(set(part.frames))
    methods = [m for m in METHOD_ORDER if m in set(part.method)]
    fig, axes = plt.subplots(1, len(frames), figsize=(3.2 * len(frames), 3.6), sharey=True, squeeze=False)
    colours = sns.color_palette("Set2", len(TIMING_KEYS))
    for ax, f in zip(axes[0], frames, strict=True):
        bottom = np.zeros(len(methods))
        for k, key in enumerate(TIMING_KEYS):
            vals = np.array([mean.loc[(f, m), key] if (f, m) in mean.index else 0.0 for m in methods])
            ax.bar(methods, vals, bottom=bottom, color=colours[k], label=key)
            bottom += vals
        ax.set_title(f"{f} frames")
        ax.tick_params(axis="x", rotation=70)
    axes[0][0].set_ylabel("ms per sample")
    axes[0][-1].legend(bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    fig.suptitle("Where the time goes (decoding the video, shared by all methods, not shown)")
    fig.tight_layout()
    return fig


def heatmap_plot(df: pd.DataFrame, samples: list, methods: list[tuple[str, float | None]]):
    """For each sample: its frames (evidence framed in red) above one row of per-frame scales per method
    (0: frame dropped), column k under frame k. `samples` are `calibration.LoadedSample`s decoded at a
    frame count of the main grid."""
    main = df[df.grid == "main"]
    n_frames = max(len(s.frames) for s in samples)
    fig, axes = plt.subplots(
        2 * len(samples),
        1,
        figsize=(min(0.9 * n_frames + 3.5, 20), (1.2 + 0.28 * len(methods)) * len(samples)),
        gridspec_kw={"height_ratios": [1.0, 0.3 * len(methods)] * len(samples)},
    )
    for i, s in enumerate(samples):
        thumb_ax, heat_ax = axes[2 * i], axes[2 * i + 1]
        n = len(s.frames)
        thumb_ax.imshow(np.concatenate(list(s.frames), axis=1), extent=(0, n, 1, 0), aspect="auto")
        for f, ev in enumerate(s.evidence_mask):
            if ev:
                thumb_ax.add_patch(plt.Rectangle((f + 0.02, 0.02), 0.96, 0.96, fill=False, ec="red", lw=2))
        thumb_ax.set_xlim(0, n_frames)
        thumb_ax.set_axis_off()
        thumb_ax.set_title(f"{s.row['id']}: {s.row['question']} (answer {s.row['answer']})", fontsize=9)
        grid, labels = [], []
        for method, budget in methods:
            rows = main[(main.id == str(s.row["id"])) & (main.method == method) & (main.frames == n)]
            rows = (
                rows[rows.budget.isna()]
                if budget is None
                else rows[np.isclose(rows.budget.astype(float), budget)]
            )
            if rows.empty:
                continue
            r = rows.iloc[0]
            grid.append(r.frame_scales)
            mark = "right" if r.score >= 1 else "wrong"
            labels.append(f"{method} R={budget_label(budget)} ({100 * r.retention:.0f}%, {mark})")
        sns.heatmap(
            np.array(grid),
            ax=heat_ax,
            vmin=0,
            vmax=1.0,
            cmap="viridis",
            cbar=False,
            annot=True,
            fmt=".2f",
            annot_kws={"fontsize": 6},
            yticklabels=labels,
            xticklabels=list(range(n)),
        )
        heat_ax.set_xlim(0, n_frames)
        heat_ax.tick_params(axis="y", rotation=0, labelsize=8)
    fig.suptitle("Per-frame scale by method (0 = dropped; evidence frames framed in red)")
    fig.tight_layout()
    return fig


HEATMAP_METHODS = ("resadapt", "resadapt_hard", "frame_selection", "slow_fast", "fixed_scale", "oracle")


def heatmap_selection(params, per_task: int = 2):
    """The heatmap's inputs: the first test videos of detail QA and multi-frame reasoning (decoded at the main
    grid's frame count) and (method, R) rows at the largest budget <= 15%, the operating point of the issue's
    bars (else the smallest budget); unbudgeted methods at their own retention."""
    ev = params.evaluate
    tasks = [t for t in ("detail_qa", "multi_frame") if t in ev.tasks]
    samples = [
        load_sample(r, params.data.root, params.data.num_frames)
        for t in tasks
        for r in split_rows(params.data.root, "test", [t], per_task)
    ]
    budgets = sorted(ev.budgets)
    budget = max([b for b in budgets if b <= 0.15] or budgets[:1])
    shown = [(m, None if m == "resadapt" else budget) for m in HEATMAP_METHODS if m in ev.methods]
    return samples, shown
