"""Can the tiny vision tower read a downscaled glyph? (README, Backbone calibration: dense reading)

    python scripts/probe_dense_reading.py                              # the recipe's dense phase (params.yaml)
    python scripts/probe_dense_reading.py --steps 1000 --window 0      # longer, on whole frames
    python scripts/probe_dense_reading.py --backbone models/backbone   # a trained backbone's tower, no training

Trains a fresh tiny backbone's vision tower with the recipe's first phase alone (`resadapt.sft.dense_phase`,
`backbone.sft.dense_*` from the params, each overridable here), then prints the dense head's digit accuracy
on the tokens labelled readable (glyph strokes >= 2 px at the realised scale) and its colour accuracy on card
tokens, on 40 val card videos shown uniformly at 1, 0.875, 0.75, 0.625 and 0.5 (whole 224-px frames): whether
the phase taught reading at every realised size before any SFT is spent on it. With `--backbone` it trains
nothing and scores that backbone's tower instead: does it still read after the SFT phases? There the head's
untrained "no digit" vector is left out, so the digit accuracy is the argmax over the ten digit embeddings
(printed for a fresh tower too, as "among digits").
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from resadapt.backbone import build_tiny_backbone, load_backbone
from resadapt.config import load_params
from resadapt.data.embedded import COLOURS, NO_DIGIT, load_benchmark
from resadapt.sft import DenseHead, dense_batch, dense_phase, split_examples, video_features
from resadapt.stages.backbone import tiny_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, help="backbone.sft.dense_steps")
    ap.add_argument("--batch", type=int, help="backbone.sft.dense_batch")
    ap.add_argument("--scale-floor", type=float, help="backbone.sft.dense_scale_floor")
    ap.add_argument("--window", type=int, help="backbone.sft.dense_window (0: whole frames)")
    ap.add_argument("--views", type=int, help="backbone.sft.dense_views")
    ap.add_argument("--lr", type=float, help="backbone.sft.dense_lr")
    ap.add_argument("--backbone", help="score this trained backbone folder instead of training a fresh tower")
    args = ap.parse_args()
    torch.set_num_threads(2)
    p = load_params(args.params)
    overrides = {
        "dense_steps": args.steps,
        "dense_batch": args.batch,
        "dense_scale_floor": args.scale_floor,
        "dense_window": args.window,
        "dense_views": args.views,
        "dense_lr": args.lr,
    }
    fields = {k: v for k, v in overrides.items() if v is not None}
    if args.window == 0:
        fields["dense_window"] = None
    schedule = p.backbone.sft.model_validate({**p.backbone.sft.model_dump(), **fields})
    ds = load_benchmark(p.data.root)
    if args.backbone:
        model, proc = load_backbone(args.backbone)
        head = DenseHead(model, proc.tokenizer)
    else:
        model, proc = build_tiny_backbone(tiny_spec(p))
        rng = np.random.default_rng(p.seed)
        torch.manual_seed(p.seed)
        stream = split_examples(list(ds["train"]), p.data.root, p.data.num_frames)(rng, 0.0)
        head = DenseHead(model, proc.tokenizer)
        model.train()
        t0 = time.time()
        dense_phase(model, head, proc, lambda n: [next(stream) for _ in range(n)], schedule, rng)
        print(
            f"{schedule.dense_steps} dense steps (batch {schedule.dense_batch} x {schedule.dense_views} views, "
            f"window {schedule.dense_window}, lr {schedule.dense_lr}, "
            f"scales from {schedule.dense_scale_floor}) in {time.time() - t0:.0f} s",
            flush=True,
        )
    model.eval()
    val = split_examples(list(ds["val"]), p.data.root, p.data.num_frames, workers=0)(np.random.default_rng(1))
    exs = [e for e in (next(val) for _ in range(200)) if e.task in ("detail_qa", "multi_frame")][:40]
    with torch.no_grad():
        for s in (1.0, 0.875, 0.75, 0.625, 0.5):
            pv, grid, ld, lc = dense_batch(exs, [[s] * math.ceil(len(e.frames) / 2) for e in exs], proc)
            d, c = head(video_features(model, pv, grid))
            m = ld != NO_DIGIT
            card = lc != len(COLOURS)
            among = (d[:, :NO_DIGIT].argmax(-1)[m] == ld[m]).float().mean()
            with_none = "" if args.backbone else f"{(d.argmax(-1)[m] == ld[m]).float().mean():.2f}, "
            print(
                f"scale {s}: {int(m.sum())} readable digit tokens, digit accuracy "
                f"{with_none}among digits {among:.2f}, colour accuracy on card tokens (among colours) "
                f"{(c[:, : len(COLOURS)].argmax(-1)[card] == lc[card]).float().mean():.2f}"
            )


if __name__ == "__main__":
    main()
