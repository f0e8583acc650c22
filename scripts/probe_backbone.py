"""What the trained backbone answers where the calibration says it fails (README, Backbone calibration).

    python scripts/probe_backbone.py [--split val] [--n 60] [--scales 0.5 0.625 0.75] [--backbone PATH]

Prints, on one split (val by default: a backbone recipe is chosen there, the calibration reads test): the
(prediction, answer) counts of coarse_qa at full resolution; for detail_qa at full resolution and at
uniform scales the prediction counts and the accuracy by the asked card's glyph size; and detail_qa with only
the evidence chunks at each scale and every other chunk at full resolution (does reading or finding fail?).
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from resadapt.backbone import TransformersBackend, load_backbone
from resadapt.budget import VisionGeometry, realise
from resadapt.calibration import Condition, calibrate, score
from resadapt.config import load_params
from resadapt.data.embedded import cards_from_json
from resadapt.stages.backbone import calibration_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--backbone", help="a trained backbone folder (default: backbone.path)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=60, help="samples per task")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.625, 0.75], help="uniform scales")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = load_params(args.params)
    model, processor = load_backbone(args.backbone or params.backbone.path)
    samples = calibration_samples(params, args.split)
    backend = TransformersBackend(model, processor, 12, 16)
    geom = VisionGeometry.from_processor(processor)
    s_min = params.budget.s_min
    coarse = [s for s in samples if s.row["task"] == "coarse_qa"][: args.n]
    if coarse:
        df = calibrate(backend, coarse, [Condition("full")], geom, s_min)
        print(f"coarse_qa at full resolution, {len(df)} questions, (prediction, answer):")
        print(Counter(zip(df.prediction, df.answer, strict=True)).most_common(12))
    detail = [s for s in samples if s.row["task"] == "detail_qa"][: args.n]
    conditions = [Condition("full")] + [Condition("uniform", s) for s in args.scales]
    df = calibrate(backend, detail, conditions, geom, s_min)
    sizes = {s.row["id"]: cards_from_json(s.row["cards"])[0].size for s in detail}
    df["glyph_size"] = df["id"].map(sizes)
    for cond, part in df.groupby("condition"):
        print(f"detail_qa {cond}, {len(part)} videos, predictions:", Counter(part.prediction).most_common(6))
    print(df.groupby(["condition", "glyph_size"]).score.agg(["mean", "size"]))
    tp = geom.temporal_patch_size
    for scale in args.scales:
        visuals = []
        for s in detail:
            evidence = np.repeat(s.chunk_evidence(tp), tp)[: len(s.frames)]
            visuals.append(realise(s, np.where(evidence, scale, 1.0), geom).visual)
        gens = backend.generate(visuals, [s.row["question"] for s in detail])
        acc = np.mean(
            [
                score("detail_qa", g.text, s.row["answer"], s.row["options"], s.row["answer_span"])
                for g, s in zip(gens, detail, strict=True)
            ]
        )
        print(f"detail_qa, evidence chunks at {scale:g} and the rest at full: accuracy {acc:.2f}")


if __name__ == "__main__":
    main()
