"""Backbone variant 10 (README, Backbone calibration), val only: the recipe variant 9 points to, from scratch.
The committed dense phase at DENSE steps (the step count is what makes the tower read downscaled glyphs), the
crop phase at CROP steps, no plain SFT phase; then SFT steps with variant 9a's language-model dense loss and
variant 6's readable sampler (`backbone_variant9.py`) at the committed SFT rate:

    PYTHONPATH=docs/runs python docs/runs/backbone_variant10.py OUT [DENSE] [CROP] [SFT]
    python scripts/probe_backbone.py --backbone OUT          # docs/runs/backbone_variant10_val.txt
    python scripts/probe_dense_reading.py --backbone OUT
"""

import subprocess
import sys
import time

import torch

from resadapt.backbone import build_tiny_backbone, save_backbone
from resadapt.config import load_params
from resadapt.data.embedded import load_benchmark
from resadapt.sft import split_examples, train_backbone
from resadapt.stages.backbone import tiny_spec


def main() -> None:
    out = sys.argv[1]
    dense, crop, sft_steps = (int(a) for a in (sys.argv[2:5] + ["2000", "500", "523"][len(sys.argv[2:5]) :]))
    torch.set_num_threads(2)
    p = load_params("params.yaml")
    schedule = p.backbone.sft.model_copy(update={"dense_steps": dense, "crop_steps": crop, "sft_steps": 0})
    model, processor = build_tiny_backbone(tiny_spec(p))
    examples = split_examples(list(load_benchmark(p.data.root)["train"]), p.data.root, p.data.num_frames)
    t0 = time.time()
    train_backbone(model, processor, examples, schedule, p.budget.s_min, p.seed)
    print(f"{dense} dense + {crop} crop steps in {time.time() - t0:.0f} s", flush=True)
    save_backbone(model, processor, out + ".dense_crop")
    lr = str(p.backbone.sft.sft_lr)
    cmd = [sys.executable, "docs/runs/backbone_variant9.py", out + ".dense_crop", out, "lm", str(sft_steps)]
    subprocess.run(cmd + ["0.5", "1", "--lr", lr, "--threads", "2"], check=True)


if __name__ == "__main__":
    main()
