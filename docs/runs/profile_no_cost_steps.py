"""Where a no-cost ablation step spends its time at full resolution (issue 14's stage-time bar): resumes seed 1's
no_cost run from its step-45 checkpoint (needs `checkpoints/ablation` from `dvc repro ablation`) in a scratch
folder and runs its last 5 steps and their validations under cProfile.

    python docs/runs/profile_no_cost_steps.py
"""

import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch

from resadapt.backbone import load_backbone
from resadapt.config import load_params
from resadapt.stages import train

torch.set_num_threads(1)
params = train.seed_params(load_params("params.yaml"), 1)
rl = params.train.model_copy(
    update={"lagrangian_lambda": params.ablation.lagrangian_lambda, "eval_steps": params.ablation.eval_steps}
)
name = f"no_cost-{train.fingerprint(params, rl, 'no_cost', params.ablation.max_steps)}"
model, processor = load_backbone(params.backbone.path)
with tempfile.TemporaryDirectory() as scratch:
    shutil.copytree(
        Path(params.ablation.checkpoints) / name / "checkpoint-45", Path(scratch) / name / "checkpoint-45"
    )
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    train.run(params, rl, model, processor, scratch, "no_cost", params.ablation.max_steps)
    profile.disable()
print(f"5 steps and their validations in {time.perf_counter() - t0:.1f} s")
pstats.Stats(profile).sort_stats("cumulative").print_stats(45)
