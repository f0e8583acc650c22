"""Variant 8 follow-up (README, Backbone calibration), val only: continue variant 8's backbone (its tower reads
downscaled glyphs, its language model answers one digit whenever the evidence is downscaled) with STEPS more
SFT steps on every task under variant 6's sampler (downscaled evidence drawn from the asked glyph's readable
range with probability 0.75, `p_uniform` 0.3), then score it on val:

    PYTHONPATH=docs/runs python docs/runs/backbone_variant8_sft.py VARIANT8_BACKBONE OUT [STEPS]
    python scripts/probe_backbone.py --backbone OUT        # docs/runs/backbone_variant8_val.txt

VARIANT8_BACKBONE: the output of `dvc repro backbone` with params.yaml's backbone.sft.dense_steps 2000,
dense_window null and dense_views 1 (variant 8 in the README).
"""

import sys
import time

import torch
from backbone_variant6 import chunk_scales_for

import resadapt.sft as sft
from resadapt.backbone import load_backbone, save_backbone
from resadapt.config import load_params
from resadapt.data.embedded import load_benchmark

sft.chunk_scales_for = chunk_scales_for
torch.set_num_threads(1)
source, out = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
params = load_params("params.yaml")
model, processor = load_backbone(source)
schedule = params.backbone.sft.model_copy(
    update={"dense_steps": 0, "crop_steps": 0, "sft_steps": steps, "sft_lr": 1e-3, "p_uniform": 0.3}
)
rows = list(load_benchmark(params.data.root)["train"])
examples = sft.split_examples(rows, params.data.root, params.data.num_frames)
t0 = time.time()
sft.train_backbone(model, processor, examples, schedule, params.budget.s_min, params.seed)
print(f"{steps} SFT steps in {time.time() - t0:.0f} s", flush=True)
save_backbone(model, processor, out)
