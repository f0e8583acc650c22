"""Backbone variant 12 (README, Backbone calibration), val only: the coarse question asks for the first card's colour.

The coarse task as committed ("Which card is shown, the red card or the blue card?") is not learned on any seed:
the backbone answers one fixed colour. Answering it means checking two named colours for presence, a
comparison; yes / no presence (variants 1-2) failed the same way. What the backbone does learn is a lookup that
copies one attribute out of a card token: detail QA copies the digit of the card the question names, and the
dense losses align every card token with its digit's and its colour's word embeddings. Here the coarse question
is a lookup of that kind with a colour for the answer: "What colour is the first card?" (the card shown
earliest; every card video shows its cards one after another, so there is exactly one, and its colour is uniform
over the six colours: chance about 1/6). The colour survives every downscale (the tower reads it on 98-100% of
card tokens at every scale), so uniform scaling should keep it. Only the coarse rows change (questions,
answers); the videos, every other task and the committed recipe and seed are as in the pipeline.

    python docs/runs/backbone_variant12.py OUT       # trains (backbone_stage), then calibrates on val

Rule written before the run: a later session adopts it (into `resadapt/data/embedded.py`) only if on val the
coarse task scores >= 0.80 at full resolution and, at uniform scale 0.35 (14% retention), >= full - 0.10, while
detail QA keeps full >= 0.90 and some uniform scale in 0.5-0.75 >= 0.25.
"""

import sys
from collections import Counter

import torch

from resadapt import sft
from resadapt.config import load_params
from resadapt.data.embedded import cards_from_json, which_question
from resadapt.stages import backbone as stage

QUESTION = "What colour is the first card?"
_COARSE_PREFIX = which_question("A", "B").split(",")[0]  # "Which card is shown"


def _first_colour(cards) -> str:
    return min(cards, key=lambda c: min(c.frames)).colour


_load = sft._SplitStream._load


def _load_first(self, key, rng):
    ex = _load(self, key, rng)
    first = _first_colour(ex.cards)
    ex.turns = [(QUESTION, first) if q.startswith(_COARSE_PREFIX) else (q, a) for q, a in ex.turns]
    return ex


_load_benchmark = stage.load_benchmark


def _benchmark_first(root):
    def rewrite(row):
        if row["task"] != "coarse_qa":
            return row
        cards = cards_from_json(row["cards"])
        first = min(cards, key=lambda c: min(c.frames))
        return {
            **row,
            "question": QUESTION,
            "answer": first.colour,
            "options": [],
            "evidence_frames": list(first.frames),
        }

    return {split: [rewrite(r) for r in rows] for split, rows in _load_benchmark(root).items()}


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    sft._SplitStream._load = _load_first  # DataLoader workers fork after this, so they load with it too
    stage.load_benchmark = _benchmark_first  # the val calibration below runs in this process (workers 1)
    base = load_params("params.yaml")
    cal = base.backbone.calibration.model_copy(
        update={"tasks": ["detail_qa", "coarse_qa", "multi_frame"], "workers": 1, "max_samples_per_task": 60}
    )
    params = base.model_copy(
        update={"backbone": base.backbone.model_copy(update={"path": out, "calibration": cal})}
    )
    model, processor, log = stage.backbone_stage(params)
    print({k: round(float(v), 1) for k, v in log.groupby("stage").time_s.max().items()}, flush=True)
    per_sample, table = stage.calibrate_backbone(params, model, processor, split="val")
    print(table.to_string(), flush=True)
    coarse = per_sample[per_sample.task == "coarse_qa"]
    for cond, part in coarse.groupby("condition"):
        print(f"coarse_qa {cond}: predictions", Counter(part.prediction).most_common(6))


if __name__ == "__main__":
    main()
