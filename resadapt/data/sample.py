"""The decoded sample: a benchmark row with its frames decoded and its evidence on the sampled frames.

Every consumer of a benchmark row (the methods, the trainer, the evaluator, calibration, figures) works on
this one type, so decoding and the mapping of evidence frames onto sampled frames happen in one place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from resadapt.data.video import read_video


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

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of a frame."""
        return int(self.frames.shape[-3]), int(self.frames.shape[-2])

    def chunk_evidence(self, temporal_patch_size: int) -> np.ndarray:
        """Which temporal chunks hold at least one evidence frame."""
        m, tp = self.evidence_mask, int(temporal_patch_size)
        return np.array([m[k : k + tp].any() for k in range(0, len(m), tp)])


def load_sample(row: dict, root: str | Path, num_frames: int) -> LoadedSample:
    """Decode a row's media (`num_frames` sampled uniformly from a video) under `root`."""
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


def load_samples(rows: Sequence[dict], root: str | Path, num_frames: int) -> tuple[list[LoadedSample], dict]:
    """Decoded samples and the seconds each took to decode (reported apart from the methods' time)."""
    samples, seconds = [], {}
    for r in rows:
        t0 = time.perf_counter()
        samples.append(load_sample(r, root, num_frames))
        seconds[str(r["id"])] = time.perf_counter() - t0
    return samples, seconds
