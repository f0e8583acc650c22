"""Backbone recipe variant 6 (README, Backbone calibration), judged on val and not adopted: SFT's downscaled
evidence (and uniformly downscaled videos) drawn with probability READABLE from the asked glyph's readable range
[2 px / glyph size, 1] instead of [s_min, 1]; run with `p_uniform` 0.3 in a copy of params.yaml whose
`backbone.path` points elsewhere:

    python docs/runs/backbone_variant6.py PARAMS 0.75     # variant 7: the same with p_uniform 0.5, dense_weight 1.0
    python scripts/probe_backbone.py --params PARAMS            # docs/runs/backbone_variant6_val.txt
    python scripts/probe_dense_reading.py --params PARAMS --backbone BACKBONE_PATH
"""

import math
import sys
import time

import torch

import resadapt.sft as sft
from resadapt.config import load_params
from resadapt.data.embedded import READABLE_STROKE_PX
from resadapt.stages import backbone as stage

READABLE = float(sys.argv[2]) if __name__ == "__main__" and len(sys.argv) > 2 else 0.75


def chunk_scales_for(example, rng, s_min, p_full, p_uniform, tp=2):
    n_chunks = 1 if example.is_image else math.ceil(len(example.frames) / tp)
    ev_frames = set(example.evidence_frames)
    sizes = [c.size for c in example.cards if ev_frames & set(c.frames)]
    floor = min(1.0, READABLE_STROKE_PX / max(sizes)) if sizes else s_min

    def draw():
        lo = floor if rng.random() < READABLE else s_min
        return float(rng.uniform(lo, 1.0))

    if rng.random() < p_uniform:
        return [draw()] * n_chunks
    evidence = {f // tp for f in example.evidence_frames}
    scales = []
    for k in range(n_chunks):
        if (k in evidence or example.is_image) and rng.random() < p_full:
            scales.append(1.0)
        elif rng.random() < 0.3:
            scales.append(1.0)
        elif k in evidence:
            scales.append(draw())
        else:
            scales.append(float(rng.uniform(s_min, 1.0)))
    return scales


if __name__ == "__main__":
    sft.chunk_scales_for = chunk_scales_for
    torch.set_num_threads(2)
    p = load_params(sys.argv[1])
    t0 = time.time()
    model, proc, log = stage.backbone_stage(p)
    log.to_csv(sys.argv[1] + ".training.csv", index=False)
    print("trained in", round(time.time() - t0), "s", flush=True)
