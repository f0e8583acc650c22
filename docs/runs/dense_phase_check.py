"""Does this machine train the committed backbone? The dense phase's first N steps against a logged run.

    git show 227b8bd:plots/backbone/training.csv > /tmp/committed_training.csv
    python docs/runs/dense_phase_check.py 300 /tmp/committed_training.csv
    MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python docs/runs/dense_phase_check.py 300 /tmp/committed_training.csv

The pipeline's params, seed and schedule (the rate decays over all `dense_steps`, so the run is stopped after
N steps rather than shortened); prints the first step whose logged loss differs from the reference's (both
rounded to 4 decimals as the stage logs them). README, Backbone calibration: "Not across CPUs".
"""

import sys

import pandas as pd
import torch

from resadapt.backbone import build_tiny_backbone
from resadapt.config import load_params
from resadapt.data.embedded import load_benchmark
from resadapt.sft import split_examples, train_backbone
from resadapt.stages.backbone import tiny_spec


class _Enough(Exception):
    pass


def main() -> None:
    n, reference = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    p = load_params("params.yaml")
    model, processor = build_tiny_backbone(tiny_spec(p))
    examples = split_examples(list(load_benchmark(p.data.root)["train"]), p.data.root, p.data.num_frames)
    log: list[dict] = []

    def record(entry: dict) -> None:
        log.append(entry)
        if entry["step"] >= n:
            raise _Enough

    try:
        train_backbone(model, processor, examples, p.backbone.sft, p.budget.s_min, p.seed, record)
    except _Enough:
        pass
    ref = pd.read_csv(reference)
    both = ref[ref.stage == "dense"].merge(pd.DataFrame(log), on="step", suffixes=("_ref", "_here"))
    differ = both[(both.loss_ref - both.loss_here).abs() > 1e-9]
    first = int(differ.step.min()) if len(differ) else None
    print(f"{len(both)} dense steps compared; first differing loss: step {first}")
    if first is not None:
        print(differ.head(3)[["step", "loss_ref", "loss_here"]].to_string(index=False))


if __name__ == "__main__":
    main()
