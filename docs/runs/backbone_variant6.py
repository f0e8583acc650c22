"""Backbone recipe variant 6 (README, Backbone calibration), judged on val and not adopted: SFT's downscaled
evidence (and uniformly downscaled videos) drawn with probability READABLE from the asked glyph's readable range
[2 px / glyph size, 1] instead of [s_min, 1]; run with `p_uniform` 0.3 in a copy of params.yaml whose
`backbone.path` points elsewhere:

    python docs/runs/backbone_variant6.py PARAMS 0.75     # variant 7: the same with p_uniform 0.5, dense_weight 1.0
    python scripts/probe_backbone.py --params PARAMS            # docs/runs/backbone_variant6_val.txt
    python scripts/probe_dense_reading.py --params PARAMS --backbone BACKBONE_PATH
"""

import sys
import time

import torch

import resadapt.sft as sft
from resadapt.config import load_params
from resadapt.stages import backbone as stage

READABLE = float(sys.argv[2]) if __name__ == "__main__" and len(sys.argv) > 2 else 0.75


_library_sampler = sft.chunk_scales_for


def chunk_scales_for(example, rng, s_min, p_full, p_uniform, tp=2, readable_share=0.0):
    """The library's sampler (`readable_share` moved there with variant 10) at READABLE in every phase."""
    return _library_sampler(example, rng, s_min, p_full, p_uniform, tp, readable_share=READABLE)


if __name__ == "__main__":
    sft.chunk_scales_for = chunk_scales_for
    torch.set_num_threads(2)
    p = load_params(sys.argv[1])
    t0 = time.time()
    model, proc, log = stage.backbone_stage(p)
    log.to_csv(sys.argv[1] + ".training.csv", index=False)
    print("trained in", round(time.time() - t0), "s", flush=True)
