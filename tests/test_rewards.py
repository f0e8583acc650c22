"""Tests for resadapt.rewards: short answers, multiple choice, span parsing, temporal IoU and `score`."""

from __future__ import annotations

import pytest

from resadapt.rewards import (
    choice_score,
    normalise,
    parse_span,
    score,
    short_answer_score,
    temporal_iou,
)

OPTIONS = ["red", "blue", "green", "yellow"]


def test_normalise() -> None:
    assert normalise("  Red   7. ") == "red 7"


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("7", 1.0),
        (" 7.", 1.0),
        ("red 7", 1.0),
        ("The answer is 7.", 1.0),
        ("8", 0.0),
        ("17", 0.0),
        ("7 red", 0.0),
        ("", 0.0),
        ("   ", 0.0),
    ],
)
def test_short_answer(prediction: str, expected: float) -> None:
    assert short_answer_score(prediction, "7") == expected
    assert score("detail_qa", prediction, "7") == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("B) blue", 1.0),
        ("blue", 1.0),
        ("Blue.", 1.0),
        ("A", 0.0),
        ("(C)", 0.0),
        ("red", 0.0),
        ("", 0.0),
        ("Z", 0.0),
    ],
)
def test_multiple_choice(prediction: str, expected: float) -> None:
    assert choice_score(prediction, "blue", OPTIONS) == expected
    assert score("image_qa", prediction, "blue", options=OPTIONS) == expected


@pytest.mark.parametrize(("prediction", "expected"), [("B", 1.0), ("(B)", 1.0), ("A", 0.0), ("(D)", 0.0)])
def test_multiple_choice_letter_answer(prediction: str, expected: float) -> None:
    assert choice_score(prediction, "B", OPTIONS) == expected


def test_multiple_choice_option_text_with_letter_answer() -> None:
    assert choice_score("blue", "B", OPTIONS) == 1.0


def test_multiple_choice_multi_word_option_text() -> None:
    options = ["the red card", "the blue card"]
    assert choice_score("the blue card", "the blue card", options) == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.0-5.0", (2.0, 5.0)),
        ("2 to 5", (2.0, 5.0)),
        ("2 – 5", (2.0, 5.0)),
        ("from 3.5 - 1.0", (1.0, 3.5)),
        ("It is shown at 1.5-3.0 seconds.", (1.5, 3.0)),
        ("0.0-1.0 then 4.0-5.0", (0.0, 1.0)),
        ("no span here", None),
        ("7", None),
        ("", None),
    ],
)
def test_parse_span(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_span(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ((2.0, 5.0), (2.0, 5.0), 1.0),
        ((0.0, 1.0), (2.0, 3.0), 0.0),
        ((0.0, 1.0), (1.0, 2.0), 0.0),
        ((0.0, 2.0), (1.0, 3.0), 1 / 3),
        ((1.0, 3.0), (0.0, 2.0), 1 / 3),
        ((0.0, 4.0), (1.0, 2.0), 0.25),
        (None, (1.0, 2.0), 0.0),
        ((1.0, 1.0), (1.0, 1.0), 1.0),
    ],
)
def test_temporal_iou(pred, gold, expected: float) -> None:
    assert temporal_iou(pred, gold) == pytest.approx(expected)


def test_score_grounding() -> None:
    assert score("grounding", "2.0-5.0", "2.0-5.0", span=[2.0, 5.0]) == 1.0
    assert score("grounding", "from 3 to 1", "0.0-2.0", span=[0.0, 2.0]) == pytest.approx(1 / 3)
    assert score("grounding", "I don't know", "0.0-2.0", span=[0.0, 2.0]) == 0.0


@pytest.mark.parametrize("span", [None, [], [1.0], [1.0, 2.0, 3.0]])
def test_score_grounding_without_span_raises(span) -> None:
    with pytest.raises(ValueError, match="answer_span"):
        score("grounding", "2.0-5.0", "2.0-5.0", span=span)


def test_multi_word_short_answers_match_the_whole_answer():
    assert score("detail_qa", "a red car", "red car") == 1.0
    assert score("detail_qa", "red car", "red car") == 1.0
    assert score("detail_qa", "blue car", "red car") == 0.0
    assert score("detail_qa", "car", "red car") == 0.0


def test_option_text_starting_with_a_is_not_read_as_letter_a():
    options = ["A cat", "A dog", "Two birds"]
    assert score("mc", "A dog", "B", options) == 1.0
    assert score("mc", "A dog", "A dog", options) == 1.0
    assert score("mc", "A cat", "B", options) == 0.0
    assert score("mc", "A", "A cat", options) == 1.0  # the bare letter still works
    assert score("mc", "(B)", "B", options) == 1.0
