"""Backbone variant 11 (README, Backbone calibration), val only: grounding answered "from a to b", not "a-b".

The adopted recipe (variant 10) sometimes answers a detail question with a grounding span that starts with the
right digit ("1.0-4.0" to 5 of 60 val videos at uniform 0.625, `backbone_adopted_val.txt`; "3.0-4.0" to 10 of
150 test videos at full resolution). A span's first token is a digit, exactly what a detail answer is, so after
that digit the model must choose between stopping and going on. Here every span starts with "from": the answer
type is decided at the first token, where the question is all there is to go on. Everything else is the
committed recipe and seed (`backbone_stage`); only the training conversations' grounding answers change.

    python docs/runs/backbone_variant11.py OUT           # trains, then calibrates on val
    python scripts/probe_backbone.py --backbone OUT      # docs/runs/backbone_variant11_val.txt

Rule written before the run: adopt only if on val detail QA at full resolution is >= 0.92 (the adopted recipe's),
no detail answer at any probed condition is a span, and some uniform scale in 0.5-0.75 scores >= 0.25.
"""

import sys
from collections import Counter

import torch

from resadapt import sft
from resadapt.config import load_params
from resadapt.rewards import parse_span
from resadapt.stages.backbone import backbone_stage, calibrate_backbone

_load = sft._SplitStream._load


def _load_from_to(self, key, rng):
    ex = _load(self, key, rng)
    if ex.task == "grounding":
        ex.turns = [(q, "from {:.1f} to {:.1f}".format(*parse_span(a))) for q, a in ex.turns]
    return ex


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    sft._SplitStream._load = _load_from_to  # DataLoader workers fork after this, so they load with it too
    base = load_params("params.yaml")
    cal = base.backbone.calibration.model_copy(update={"tasks": ["detail_qa", "grounding", "multi_frame"]})
    params = base.model_copy(
        update={"backbone": base.backbone.model_copy(update={"path": out, "calibration": cal})}
    )
    model, processor, log = backbone_stage(params)
    print({k: round(float(v), 1) for k, v in log.groupby("stage").time_s.max().items()}, flush=True)
    per_sample, table = calibrate_backbone(params, model, processor, split="val")
    print(table.to_string(), flush=True)
    detail = per_sample[per_sample.task == "detail_qa"]
    spans = detail[detail.prediction.map(lambda t: parse_span(t) is not None)]
    print(f"detail_qa answers that are spans, val, all conditions: {len(spans)} of {len(detail)}")
    print(Counter(zip(spans.condition, spans.prediction, strict=True)).most_common(10))


if __name__ == "__main__":
    main()
