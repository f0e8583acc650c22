"""Backbone calibration: does resolution matter on the benchmark, and does the question decide where?

For every task it measures accuracy at full resolution, at uniform scales, with the Oracle allocation
(evidence chunks at full resolution, the rest at s_min) and with the anti-Oracle control (evidence at
s_min, the rest at full resolution), each at its *measured* retention (tokens fed / tokens of the same
frames unmodified). These numbers say whether an allocator has anything to learn: Oracle near full
resolution, uniform scaling and anti-Oracle near chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from resadapt.budget import VisionGeometry, realise
from resadapt.data.sample import LoadedSample
from resadapt.rewards import score


def chance_levels(samples: list[LoadedSample]) -> dict[str, float]:
    """Per task, the best score of a rule that ignores the video: always giving the most frequent answer
    (the majority answer over these samples, e.g. the test split), or, for questions with options, always
    picking the option at one position. A uniform guess is lower whenever the answers are unbalanced ("the
    larger of two digits" is 9 in 9 of 45 pairs). Grounding (scored by IoU) has no such level: NaN."""
    rows: dict[str, list[dict]] = {}
    for s in samples:
        rows.setdefault(s.row["task"], []).append(s.row)
    out = {}
    for task, rs in rows.items():
        if task == "grounding":
            out[task] = float("nan")
            continue
        answers = [str(r["answer"]) for r in rs]
        best = max(map(answers.count, set(answers)))
        width = max((len(r.get("options") or []) for r in rs), default=0)
        for k in range(width):
            picks = sum(
                len(r.get("options") or []) > k and str(r["options"][k]) == str(r["answer"]) for r in rs
            )
            best = max(best, picks)
        out[task] = best / len(rs)
    return out


@dataclass(frozen=True)
class Condition:
    """How a calibration condition scales every frame: `full`, `uniform` at `scale`, `oracle` (evidence
    chunks at full resolution, the rest at s_min) or `anti_oracle` (the reverse). `name` labels it in the
    log and in `metrics/backbone.json`."""

    kind: Literal["full", "uniform", "oracle", "anti_oracle"]
    scale: float | None = None

    def __post_init__(self):
        if self.kind not in ("full", "uniform", "oracle", "anti_oracle"):
            raise ValueError(f"unknown calibration condition kind {self.kind!r}")
        if (self.kind == "uniform") != (self.scale is not None):
            raise ValueError(f"calibration condition {self.kind!r}: a scale is given exactly for 'uniform'")
        if self.scale is not None and not 0.0 < self.scale <= 1.0:
            raise ValueError(f"calibration condition uniform: scale {self.scale} is not in (0, 1]")

    @property
    def name(self) -> str:
        return f"uniform_{self.scale:g}" if self.kind == "uniform" else self.kind

    def scales(self, sample: LoadedSample, s_min: float, tp: int) -> np.ndarray:
        """Per-frame scales of `sample` under this condition."""
        n = 1 if sample.is_image else len(sample.frames)
        if self.kind == "full":
            return np.ones(n)
        if self.kind == "uniform":
            return np.full(n, self.scale)
        ev = np.array([True]) if sample.is_image else np.repeat(sample.chunk_evidence(tp), tp)[:n]
        return np.where(ev, 1.0, s_min) if self.kind == "oracle" else np.where(ev, s_min, 1.0)


def calibrate(
    backend,
    samples: list[LoadedSample],
    conditions: list[Condition],
    geom: VisionGeometry,
    s_min: float,
) -> pd.DataFrame:
    """One row per (sample, condition): prediction, score, visual tokens and measured retention."""
    rows = []
    tp = geom.temporal_patch_size
    for cond in conditions:
        visuals, meta = [], []
        for s in samples:
            r = realise(s, cond.scales(s, s_min, tp), geom)
            visuals.append(r.visual)
            meta.append((s, r.tokens, r.reference_tokens))
        gens = backend.generate(visuals, [s.row["question"] for s in samples])
        for (s, tokens, ref), g in zip(meta, gens, strict=True):
            r = s.row
            rows.append(
                {
                    "id": r["id"],
                    "task": r["task"],
                    "condition": cond.name,
                    "kind": cond.kind,
                    "prediction": g.text,
                    "answer": r["answer"],
                    "score": score(r["task"], g.text, r["answer"], r["options"], r["answer_span"]),
                    "visual_tokens": tokens,
                    "fed_tokens": g.visual_tokens,
                    "retention": tokens / ref,
                    "seconds": g.seconds,
                }
            )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, chance: dict[str, float]) -> pd.DataFrame:
    """Accuracy (mean score) and mean measured retention per task and condition, with the chance level."""
    out = df.groupby(["task", "condition"], sort=False).agg(
        kind=("kind", "first"),
        accuracy=("score", "mean"),
        retention=("retention", "mean"),
        n=("score", "size"),
    )
    out = out.reset_index()
    out["chance"] = out["task"].map(chance)
    return out
