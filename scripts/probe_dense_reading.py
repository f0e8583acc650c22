"""Can the tiny vision tower read a downscaled glyph? (README, Backbone calibration: why uniform scaling is one level)

    python scripts/probe_dense_reading.py --steps 339                          # the recipe's dense phase
    python scripts/probe_dense_reading.py --steps 1000 --uniform-share 0.5     # half the videos at one scale
    python scripts/probe_dense_reading.py --steps 600 --uniform-share 0.5 --crop-prob 0.0   # full frames

Trains a fresh tiny backbone's vision tower with the dense per-token loss of `resadapt.sft` (the recipe's
first phase, its learning-rate schedule and batch of 16), on crop views (`--crop-prob` 1, as the recipe) or
full 224-px videos; `--uniform-share` of the videos are shown at one scale drawn in [0.4, 1], the rest as the
recipe draws them. Then prints the dense head's digit accuracy on the tokens labelled readable (glyph strokes
>= 2 px at the realised scale) on 40 val card videos shown uniformly at 1, 0.75, 0.625 and 0.5, in both views.
A crop view (3x3 cells, 84 px) is realised at 56 px for all three downscales: one ratio, aligned to cards.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone
from resadapt.config import load_params
from resadapt.data.embedded import COLOURS, NO_DIGIT, load_benchmark
from resadapt.sft import DenseHead, chunk_scales_for, dense_batch, dense_loss, split_examples, video_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=339)
    ap.add_argument("--uniform-share", type=float, default=0.0)
    ap.add_argument("--crop-prob", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=None, help="crop chunks to this many tokens after resize")
    ap.add_argument("--scale-floor", type=float, default=None, help="chunks at full or uniform in [floor, 1]")
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    p = load_params(args.params)
    s_min, lr, batch = p.budget.s_min, p.backbone.sft.dense_lr, args.batch or p.backbone.sft.dense_batch
    spec = TinyBackboneSpec(
        **p.backbone.tiny.model_dump(),
        min_pixels=p.budget.min_pixels,
        max_pixels=p.budget.max_pixels,
        seed=p.seed,
    )
    model, proc = build_tiny_backbone(spec)
    ds = load_benchmark(p.data.root)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    train = split_examples(list(ds["train"]), p.data.root, p.data.num_frames)(rng, args.crop_prob)
    head = DenseHead(model, proc.tokenizer)
    vis = list(model.model.visual.parameters()) + [
        q for n, q in head.named_parameters() if n != "embed.weight"
    ]
    opt = torch.optim.AdamW(vis + [head.embed.weight], lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / args.steps))
        exs = [next(train) for _ in range(batch)]
        scales = []
        for e in exs:
            if args.scale_floor is not None:
                n_chunks = 1 if e.is_image else math.ceil(len(e.frames) / 2)
                scales.append(
                    [1.0 if rng.random() < 0.25 else float(rng.uniform(args.scale_floor, 1.0)) for _ in range(n_chunks)]
                )
            elif args.uniform_share > 0 and rng.random() < args.uniform_share:
                n_chunks = 1 if e.is_image else math.ceil(len(e.frames) / 2)
                scales.append([float(rng.uniform(0.4, 1.0))] * n_chunks)
            else:
                scales.append(chunk_scales_for(e, rng, s_min, p_full=0.5, p_uniform=0.0))
        pv, grid, ld, lc = dense_batch(exs, scales, proc, rng=rng, window=args.window)
        loss, _ = dense_loss(head, video_features(model, pv, grid), ld, lc)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis, 1.0)
        opt.step()
    model.eval()
    print(f"{args.steps} dense steps in {time.time() - t0:.0f} s", flush=True)
    for view in (1.0, 0.0):
        val = split_examples(list(ds["val"]), p.data.root, p.data.num_frames, workers=0)(
            np.random.default_rng(1), view
        )
        exs = [e for e in (next(val) for _ in range(80)) if e.task in ("detail_qa", "multi_frame")][:40]
        with torch.no_grad():
            for s in (1.0, 0.875, 0.75, 0.625, 0.5):
                pv, grid, ld, lc = dense_batch(exs, [[s] * math.ceil(len(e.frames) / 2) for e in exs], proc)
                d, c = head(video_features(model, pv, grid))
                m = ld != NO_DIGIT
                card = lc != len(COLOURS)
                print(
                    f"{'crop' if view else 'full'} view, scale {s}: {int(m.sum())} readable digit tokens, "
                    f"digit accuracy {(d.argmax(-1)[m] == ld[m]).float().mean():.2f}, colour accuracy on card "
                    f"tokens {(c.argmax(-1)[card] == lc[card]).float().mean():.2f}"
                )


if __name__ == "__main__":
    main()
