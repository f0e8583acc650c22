"""The evaluation log in lmms-eval's file layout, so tooling written for lmms-eval reads our runs.

lmms-eval itself needs torchvision, which breaks this CPU stack, so we write its formats instead of running
it. One lmms-eval "model run" per (grid, method, target R, frames) of our grid, named
`<grid>-<method>-R<R>-F<frames>` (`<grid>-<method>-seed<k>-R<R>-F<frames>` for a method run with the
Allocator trained with seed k), holding one lmms-eval task per evaluated source:

    <out>/<run>/<date>_results.json          results, groups, configs, versions, n-shot, higher_is_better,
                                             n-samples, config, git_hash, date
    <out>/<run>/<date>_samples_<task>.jsonl  doc_id, doc, target, arguments, resps, filtered_resps, <metrics>

Metrics: `accuracy` for QA (our exact-match score), and `miou`, `r@0.3`, `r@0.5`, `r@0.7` for temporal
grounding, each as lmms-eval writes them (`<metric>,none` and `<metric>_stderr,none`, filter `none`). The
measured retention and visual tokens travel in each sample's `doc` and, as means, in the results.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from resadapt.evaluate import IOU_THRESHOLDS, budget_label


def run_name(grid: str, method: str, budget: float | None, frames: int, seed: int | None = None) -> str:
    tag = "" if seed is None or pd.isna(seed) else f"-seed{int(seed)}"
    return f"{grid}-{method}{tag}-R{budget_label(budget)}-F{int(frames)}"


def sample_metrics(kind: str, score: float) -> dict[str, float]:
    """The per-sample metrics of one scored sample (grounding: IoU and the recall indicators)."""
    if kind == "grounding":
        return {"miou": float(score)} | {f"r@{t}": float(score >= t) for t in IOU_THRESHOLDS}
    return {"accuracy": float(score)}


def _stderr(values: np.ndarray) -> float | str:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else "N/A"  # as lmms-eval


def write_lmms_eval(
    df: pd.DataFrame, out: str | Path, model: str = "resadapt", date: str | None = None, git_hash: str = ""
) -> list[Path]:
    """Write `df` (the per-sample log, `evaluate.read_results`) under `out`; returns the files written."""
    out = Path(out)
    date = date or time.strftime("%Y%m%d_%H%M%S")
    written = []
    if "seed" not in df:
        df = df.assign(seed=None)
    keys = ["grid", "method", "budget", "frames", "seed"]
    for (grid, method, budget, frames, seed), run in df.groupby(keys, sort=False, dropna=False):
        folder = out / run_name(grid, method, budget, frames, seed)
        folder.mkdir(parents=True, exist_ok=True)
        results, configs, n_samples, higher = {}, {}, {}, {}
        for task, part in run.groupby("task", sort=False):
            per_sample = [sample_metrics(k, s) for k, s in zip(part["kind"], part["score"], strict=True)]
            names = list(per_sample[0])
            results[task] = {"alias": task}
            for name in names:
                values = np.array([m[name] for m in per_sample])
                results[task][f"{name},none"] = float(values.mean())
                results[task][f"{name}_stderr,none"] = _stderr(values)
            results[task]["retention,none"] = float(part["retention"].mean())
            results[task]["visual_tokens,none"] = float(part["visual_tokens"].mean())
            configs[task] = {
                "task": task,
                "output_type": "generate_until",
                "metric_list": [
                    {"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names
                ],
                "metadata": {
                    "method": method,
                    "target_retention": None if pd.isna(budget) else float(budget),
                },
            }
            higher[task] = dict.fromkeys(names, True)
            n_samples[task] = {"original": len(part), "effective": len(part)}
            path = folder / f"{date}_samples_{task}.jsonl"
            with path.open("w") as f:
                for i, (row, metrics) in enumerate(zip(part.to_dict("records"), per_sample, strict=True)):
                    doc = {
                        k: row.get(k)
                        for k in (
                            "id",
                            "question",
                            "options",
                            "answer",
                            "answer_span",
                            "retention",
                            "visual_tokens",
                        )
                        if k in row
                    }
                    record = {
                        "doc_id": i,
                        "doc": doc,
                        "target": row["answer"],
                        "arguments": [[row["question"], {"until": [], "do_sample": False}]],
                        "resps": [[row["prediction"]]],
                        "filtered_resps": [row["prediction"]],
                    } | metrics
                    f.write(json.dumps(record, default=_json_default) + "\n")
            written.append(path)
        summary = {
            "results": results,
            "groups": {},
            "configs": configs,
            "versions": dict.fromkeys(results, 0),
            "n-shot": dict.fromkeys(results, 0),
            "higher_is_better": higher,
            "n-samples": n_samples,
            "config": {
                "model": model,
                "model_args": f"method={method},target_retention={budget},frames={int(frames)},grid={grid}"
                + ("" if seed is None or pd.isna(seed) else f",allocator_seed={int(seed)}"),
                "batch_size": None,
                "limit": None,
            },
            "git_hash": git_hash,
            "date": date,
        }
        path = folder / f"{date}_results.json"
        path.write_text(json.dumps(summary, indent=2, default=_json_default))
        written.append(path)
    return written


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
