"""Scoring a generated answer: short answers and multiple choice by exact match, grounding by temporal IoU.

The same functions score evaluation samples and reward CAPO rollouts, so a reported accuracy and a
training reward can never disagree about what counts as correct.
"""

from __future__ import annotations

import re

_SPAN = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:-|–|to)\s*(-?\d+(?:\.\d+)?)")
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def short_answer_score(prediction: str, answer: str) -> float:
    """1.0 when the prediction ends with the answer's words ('red 7' and '7' count for '7'; 'a red car'
    for 'red car')."""
    words, target = normalise(prediction).split(), normalise(answer).split()
    return float(bool(target) and words[-len(target) :] == target)


def choice_score(prediction: str, answer: str, options: list[str]) -> float:
    """Multiple choice: accept the option text itself, the option letter, or '(B)'.

    The text is matched first: an option reading "A cat" must not be taken for the letter A.
    """
    pred = prediction.strip()
    for i, option in enumerate(options):
        if normalise(pred) == normalise(option):
            return float(normalise(option) == normalise(answer) or chr(65 + i) == answer.strip())
    m = _LETTER.match(pred)
    if m and options:
        idx = ord(m.group(1)) - 65
        if 0 <= idx < len(options):
            return float(normalise(options[idx]) == normalise(answer) or m.group(1) == answer.strip())
    return short_answer_score(pred, answer)


def parse_span(text: str) -> tuple[float, float] | None:
    """The first 'a-b' (seconds) in a prediction, ordered; None when there is none."""
    m = _SPAN.search(text)
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (min(a, b), max(a, b))


def temporal_iou(pred: tuple[float, float] | None, gold: tuple[float, float]) -> float:
    if pred is None:
        return 0.0
    inter = max(0.0, min(pred[1], gold[1]) - max(pred[0], gold[0]))
    union = max(pred[1], gold[1]) - min(pred[0], gold[0])
    return inter / union if union > 0 else float(pred == gold)


def score(task: str, prediction: str, answer: str, options: list[str] | None = None, span=None) -> float:
    """Score in [0, 1] for any task of the benchmark schema."""
    if task == "grounding":
        if not span or len(span) != 2:
            raise ValueError(f"grounding sample needs answer_span [start, end], got {span!r}")
        return temporal_iou(parse_span(prediction), (float(span[0]), float(span[1])))
    if options:
        return choice_score(prediction, answer, options)
    return short_answer_score(prediction, answer)
