"""Backbone calibration: does resolution matter on the benchmark, and does the question decide where?

For every task it measures accuracy at full resolution, at uniform scales, with the Oracle allocation
(evidence chunks at full resolution, the rest at s_min) and with the anti-Oracle control (evidence at
s_min, the rest at full resolution), each at its *measured* retention (tokens fed / tokens of the same
frames unmodified). These numbers say whether an allocator has anything to learn: Oracle near full
resolution, uniform scaling and anti-Oracle near chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from resadapt.backbone import VisualInput
from resadapt.budget import VisionGeometry, resize_image, resize_video, retention_of_tokens, video_tokens
from resadapt.data.video import read_video
from resadapt.rewards import score

# accuracy of a uniform guess among the ten digits; grounding (mIoU) has no single chance level
CHANCE = {"detail_qa": 0.1, "image_qa": 0.1, "long_video": 0.1, "multi_frame": 0.1, "grounding": float("nan")}


@dataclass
class LoadedSample:
    """A benchmark row with its frames decoded and its evidence mapped onto the sampled frames."""

    row: dict
    frames: np.ndarray  # (T, H, W, 3) for video, (H, W, 3) for an image
    frame_indices: list[int]
    fps: float
    evidence_mask: np.ndarray  # per sampled frame (video) or [True] (image)

    @property
    def is_image(self) -> bool:
        return self.row["media_type"] == "image"


def load_sample(row: dict, root: str | Path, num_frames: int) -> LoadedSample:
    path = Path(root) / row["media_path"]
    if row["media_type"] == "image":
        if not path.exists():
            raise FileNotFoundError(f"image {path} of sample {row['id']} does not exist")
        image = np.asarray(Image.open(path).convert("RGB"))
        return LoadedSample(row, image, [0], 0.0, np.array([True]))
    frames, meta = read_video(path, num_frames)
    evidence = set(row["evidence_frames"])
    mask = np.array([i in evidence for i in meta.frame_indices])
    return LoadedSample(row, frames, list(meta.frame_indices), meta.fps, mask)


def chunk_evidence(sample: LoadedSample, tp: int) -> np.ndarray:
    """Which temporal chunks hold at least one evidence frame."""
    m = sample.evidence_mask
    n = int(np.ceil(len(m) / tp))
    return np.array([m[k * tp : (k + 1) * tp].any() for k in range(n)])


def condition_scales(name: str, sample: LoadedSample, s_min: float, tp: int) -> np.ndarray:
    """Per-frame scales for a named calibration condition ('full', 'uniform_0.35', 'oracle', 'anti_oracle')."""
    n = 1 if sample.is_image else len(sample.frames)
    if name == "full":
        return np.ones(n)
    if name.startswith("uniform_"):
        return np.full(n, float(name.removeprefix("uniform_")))
    ev = np.array([True]) if sample.is_image else np.repeat(chunk_evidence(sample, tp), tp)[:n]
    if name == "oracle":
        return np.where(ev, 1.0, s_min)
    if name == "anti_oracle":
        return np.where(ev, s_min, 1.0)
    raise ValueError(f"unknown calibration condition {name!r}")


def apply_scales(
    sample: LoadedSample, scales: np.ndarray, geom: VisionGeometry
) -> tuple[VisualInput, int, int]:
    """The backbone input for these scales, its visual tokens and the tokens of the unmodified input."""
    if sample.is_image:
        img, tokens = resize_image(sample.frames, float(scales[0]), geom)
        _, ref = resize_image(sample.frames, 1.0, geom)
        return VisualInput(image=img), tokens, ref
    tv = resize_video(sample.frames, scales, geom)
    times = [sample.frame_indices[idx[0]] / sample.fps for idx in tv.chunk_frame_indices]
    ref = video_tokens(len(sample.frames), *sample.frames.shape[1:3], geom)
    return VisualInput(chunks=tv.chunks, chunk_times=times, fps=sample.fps), tv.visual_tokens, ref


def calibrate(
    backend,
    samples: list[LoadedSample],
    conditions: list[str],
    geom: VisionGeometry,
    s_min: float,
) -> pd.DataFrame:
    """One row per (sample, condition): prediction, score, visual tokens and measured retention."""
    rows = []
    tp = geom.temporal_patch_size
    for cond in conditions:
        visuals, meta = [], []
        for s in samples:
            visual, tokens, ref = apply_scales(s, condition_scales(cond, s, s_min, tp), geom)
            visuals.append(visual)
            meta.append((s, tokens, ref))
        gens = backend.generate(visuals, [s.row["question"] for s in samples])
        for (s, tokens, ref), g in zip(meta, gens, strict=True):
            r = s.row
            rows.append(
                {
                    "id": r["id"],
                    "task": r["task"],
                    "condition": cond,
                    "prediction": g.text,
                    "answer": r["answer"],
                    "score": score(r["task"], g.text, r["answer"], r["options"], r["answer_span"]),
                    "visual_tokens": tokens,
                    "fed_tokens": g.visual_tokens,
                    "retention": retention_of_tokens(tokens, ref),
                    "seconds": g.seconds,
                }
            )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (mean score) and mean measured retention per task and condition, with chance level."""
    out = df.groupby(["task", "condition"], sort=False).agg(
        accuracy=("score", "mean"), retention=("retention", "mean"), n=("score", "size")
    )
    out = out.reset_index()
    out["chance"] = out["task"].map(CHANCE)
    return out
