"""Is coarse_qa learnable by the trained backbone at all? (README, Backbone calibration: the coarse task)

    python scripts/probe_coarse_sft.py [--steps 300] [--backbone models/backbone] [--out DIR]

Continues the recipe's SFT phase (`resadapt.sft.train_backbone` with the dense and crop phases at 0 steps; its
dense loss on a fresh head, as the recipe) on the train split's coarse_qa questions alone, each its own one-turn conversation on the
full video, then prints coarse_qa and detail_qa accuracy on 60 val questions each at full resolution and at
uniform 0.35, with the most common (prediction, answer) pairs. If the coarse task stays at chance here, where
it gets every step, its failure in the recipe is not a matter of its share of the SFT mix.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from resadapt.backbone import TransformersBackend, load_backbone, save_backbone
from resadapt.budget import VisionGeometry
from resadapt.calibration import Condition, calibrate
from resadapt.config import load_params
from resadapt.data.embedded import load_benchmark
from resadapt.sft import split_examples, train_backbone
from resadapt.stages.backbone import calibration_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--backbone", help="trained backbone to continue (default: backbone.path)")
    ap.add_argument("--steps", type=int, default=300, help="SFT steps of backbone.sft.sft_batch questions")
    ap.add_argument(
        "--lr", type=float, default=1e-3, help="peak SFT rate (the recipe's sft_lr is for a fresh model)"
    )
    ap.add_argument("--out", help="save the continued backbone here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    model, processor = load_backbone(args.backbone or params.backbone.path)
    rows = [r for r in load_benchmark(params.data.root)["train"] if r["task"] == "coarse_qa"]
    schedule = params.backbone.sft.model_copy(
        update={"dense_steps": 0, "crop_steps": 0, "sft_steps": args.steps, "sft_lr": args.lr}
    )
    log: list[dict] = []
    t0 = time.time()
    examples = split_examples(rows, params.data.root, params.data.num_frames)
    train_backbone(model, processor, examples, schedule, params.budget.s_min, params.seed, log.append)
    loss = np.mean([e["lm_loss"] for e in log[-20:]])
    print(
        f"{args.steps} coarse-only SFT steps in {time.time() - t0:.0f} s; lm_loss over the last 20: {loss:.3f}"
    )
    if args.out:
        save_backbone(model, processor, args.out)
    model.eval()
    samples = calibration_samples(params, "val")
    backend = TransformersBackend(model, processor, 12, 16)
    geom = VisionGeometry.from_processor(processor)
    for task in ("coarse_qa", "detail_qa"):
        part = [s for s in samples if s.row["task"] == task][:60]
        df = calibrate(
            backend, part, [Condition("full"), Condition("uniform", 0.35)], geom, params.budget.s_min
        )
        print(task, "val accuracy:", df.groupby("condition").score.mean().round(3).to_dict())
        full = df[df.condition == "full"]
        print(
            "  (prediction, answer) at full:",
            Counter(zip(full.prediction, full.answer, strict=True)).most_common(6),
        )


if __name__ == "__main__":
    main()
