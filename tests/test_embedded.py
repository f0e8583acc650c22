"""Tests for resadapt.data.embedded: the written benchmark is complete, its labels match its pixels, and it
is deterministic in the seed and independent of the number of workers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resadapt.data.embedded import (
    CELL,
    COLOURS,
    NO_DIGIT,
    BenchmarkSpec,
    Card,
    cards_from_json,
    draw_card,
    draw_grounding_video,
    format_span,
    grounding_max_chunks,
    load_benchmark,
    token_labels,
    write_benchmark,
)
from resadapt.data.video import read_video

SPEC = BenchmarkSpec(
    frame_size=112, fps=2.0, num_frames=8, long_num_frames=16, long_card_frames=4, cards_per_video=3
)


def _sizes(
    card: int, compare: int, grounding: int, images: int, long: int, coarse: int = 0
) -> dict[str, int]:
    return {
        "card_videos": card,
        "compare_videos": compare,
        "grounding_videos": grounding,
        "images": images,
        "long_videos": long,
        "coarse_questions": coarse,
    }


SIZES = {
    "train": _sizes(3, 2, 3, 2, 2, 3),
    "val": _sizes(2, 2, 2, 2, 2, 2),
    "test": _sizes(2, 3, 2, 2, 2, 1),
}
TINY_SIZES = {split: _sizes(1, 1, 1, 1, 1) for split in ("train", "val", "test")}
TASK_OF = {
    "card_videos": "detail_qa",
    "compare_videos": "multi_frame",
    "grounding_videos": "grounding",
    "images": "image_qa",
    "long_videos": "long_video",
    "coarse_questions": "coarse_qa",
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bench") / "embedded"
    tables = write_benchmark(root, SPEC, SIZES, seed=3, progress=False, workers=1)
    return root, tables


def _rows(tables) -> list[dict]:
    return [row for split in ("train", "val", "test") for row in tables[split].to_list()]


def _named_colours(question: str) -> list[str]:
    """Colours named in the question, in the order they appear."""
    found = [(question.index(f" {c} "), c) for c in COLOURS if f" {c} " in question]
    return [c for _, c in sorted(found)]


def _card_of(cards: list[Card], colour: str) -> Card:
    (card,) = [c for c in cards if c.colour == colour]
    return card


def _media(root: Path, row: dict) -> np.ndarray:
    path = root / row["media_path"]
    if row["media_type"] == "image":
        return np.asarray(Image.open(path).convert("RGB"))[None]
    frames, _ = read_video(path)
    return frames


def _rendered_cell(card: Card) -> np.ndarray:
    canvas = np.zeros((SPEC.frame_size, SPEC.frame_size, 3), dtype=np.uint8)
    draw_card(canvas, card)
    y0, x0 = card.row * CELL, card.col * CELL
    return canvas[y0 : y0 + CELL, x0 : x0 + CELL]


# ---------------------------------------------------------------------------------------------------------
# Drawing primitives


def test_draw_card_exactly_in_its_cell() -> None:
    sentinel = 77
    canvas = np.full((112, 112, 3), sentinel, dtype=np.uint8)
    card = Card("red", "7", row=2, col=1, frames=(0,))
    draw_card(canvas, card)
    y0, x0 = 2 * CELL, 1 * CELL
    inside = np.zeros((112, 112), dtype=bool)
    inside[y0 : y0 + CELL, x0 : x0 + CELL] = True
    assert (canvas[~inside] == sentinel).all()  # nothing outside the cell changes
    cell = canvas[y0 : y0 + CELL, x0 : x0 + CELL]
    assert not (cell == sentinel).all(axis=-1).any()  # every pixel of the cell is painted
    red = np.array(COLOURS["red"], dtype=np.uint8)
    ring = np.ones((CELL, CELL), dtype=bool)
    ring[4:-4, 4:-4] = False
    assert (cell[ring] == red).all()
    assert (cell[0, 0] == red).all() and (cell[-1, -1] == red).all()
    inner = cell[4:-4, 4:-4]
    black = (inner == 0).all(axis=-1)
    white = (inner == 255).all(axis=-1)
    assert (black | white).all()
    assert black.sum() == 7 * 4  # '7' has 7 ink cells in the 3x5 font, drawn at 2x
    ys, xs = np.nonzero(black)
    # the 6x10 glyph box is centred in the cell: rows 9..18, columns 11..16 of the 28x28 cell
    assert ys.min() + 4 == 9 and ys.max() + 4 == 18
    assert xs.min() + 4 == 11 and xs.max() + 4 == 16


def test_draw_card_glyphs_differ_but_share_border() -> None:
    cells = {g: _rendered_cell(Card("blue", g, 0, 0, (0,))) for g in ("7", "8", "A")}
    assert not np.array_equal(cells["7"], cells["8"]) and not np.array_equal(cells["8"], cells["A"])
    for cell in cells.values():
        assert (cell[:4] == COLOURS["blue"]).all()


def test_token_labels() -> None:
    grid = 4
    digit_card = Card("red", "7", row=1, col=2, frames=(0, 1))
    letter_card = Card("blue", "A", row=3, col=0, frames=(0,))
    names = list(COLOURS)
    digit, colour = token_labels([digit_card, letter_card], 0, grid)
    assert digit.shape == colour.shape == (grid, grid)
    expected_digit = np.full((grid, grid), NO_DIGIT)
    expected_digit[1, 2] = 7
    np.testing.assert_array_equal(digit, expected_digit)  # the letter card is NO_DIGIT
    expected_colour = np.full((grid, grid), len(COLOURS))
    expected_colour[1, 2] = names.index("red")
    expected_colour[3, 0] = names.index("blue")
    np.testing.assert_array_equal(colour, expected_colour)

    digit, colour = token_labels([digit_card, letter_card], 1, grid)  # letter card gone
    np.testing.assert_array_equal(digit, expected_digit)
    expected_colour[3, 0] = len(COLOURS)
    np.testing.assert_array_equal(colour, expected_colour)

    digit, colour = token_labels([digit_card, letter_card], 2, grid)  # no card visible
    assert (digit == NO_DIGIT).all() and (colour == len(COLOURS)).all()

    zero = Card("green", "0", row=0, col=0, frames=(0,))  # digit 0 is a digit, not NO_DIGIT
    assert token_labels([zero], 0, grid)[0][0, 0] == 0


# ---------------------------------------------------------------------------------------------------------
# The written benchmark


def test_split_row_counts_by_task(bench) -> None:
    _, tables = bench
    assert set(tables) == {"train", "val", "test"}
    for split, sizes in SIZES.items():
        counts = Counter(tables[split]["task"])
        assert counts == Counter({TASK_OF[k]: n for k, n in sizes.items() if n})
        assert len(set(tables[split]["id"])) == len(tables[split])


def test_load_benchmark_returns_written_tables(bench) -> None:
    root, tables = bench
    loaded = load_benchmark(root)
    for split in ("train", "val", "test"):
        assert loaded[split].to_list() == tables[split].to_list()


def test_media_exist_and_have_the_spec_shape(bench) -> None:
    root, tables = bench
    for row in _rows(tables):
        path = root / row["media_path"]
        assert path.is_file(), path
        assert not Path(row["media_path"]).is_absolute()
        frames = _media(root, row)
        expected = {"image_qa": 1, "long_video": SPEC.long_num_frames}.get(row["task"], SPEC.num_frames)
        assert frames.shape == (expected, SPEC.frame_size, SPEC.frame_size, 3), row["id"]
        assert frames.dtype == np.uint8
        if row["media_type"] == "video":
            assert row["num_frames"] == expected
            assert row["fps"] == SPEC.fps and row["duration_s"] == expected / SPEC.fps


def test_evidence_frames_are_where_the_named_cards_are_drawn(bench) -> None:
    root, tables = bench
    for row in _rows(tables):
        cards = cards_from_json(row["cards"])
        frames = _media(root, row)
        if row["task"] == "coarse_qa":
            continue  # names a colour that is not shown (test_coarse_questions_name_...)
        named = [_card_of(cards, c) for c in _named_colours(row["question"])]
        assert len(named) == (2 if row["task"] == "multi_frame" else 1), row["question"]
        shown: set[int] = set()
        for card in named:
            colour = np.array(COLOURS[card.colour], dtype=np.uint8)
            y0, x0 = card.row * CELL, card.col * CELL
            drawn = [t for t in range(len(frames)) if (frames[t, y0, x0] == colour).all()]
            assert drawn == list(card.frames), (row["id"], card)
            for t in drawn:  # the decoded cell is exactly the card (lossless video)
                np.testing.assert_array_equal(frames[t, y0 : y0 + CELL, x0 : x0 + CELL], _rendered_cell(card))
            shown |= set(drawn)
        assert row["evidence_frames"] == sorted(shown), row["id"]


def test_target_glyph_is_the_answer_and_the_only_digit(bench) -> None:
    root, tables = bench
    for row in _rows(tables):
        cards = cards_from_json(row["cards"])
        assert len(cards) == SPEC.cards_per_video
        assert len({c.colour for c in cards}) == len(cards)
        assert len({(c.row, c.col) for c in cards}) == len(cards)
        assert sum(c.digit is not None for c in cards) == (2 if row["task"] == "multi_frame" else 1)
        if row["task"] == "coarse_qa":
            continue  # asks about any card's colour, digit or letter (test_coarse_questions)
        named = [_card_of(cards, c) for c in _named_colours(row["question"])]
        for card in named:
            assert card.glyph.isdigit() and card.digit is not None
        for card in cards:
            if card not in named:
                assert card.glyph.isalpha() and card.digit is None, (row["id"], card)
        if row["task"] in ("detail_qa", "image_qa", "long_video"):
            assert row["answer"] == named[0].glyph
        elif row["task"] == "multi_frame":
            a, b = named
            assert a.digit != b.digit
            assert row["answer"] == str(max(a.digit, b.digit))
            assert set(a.frames).isdisjoint(b.frames)


def test_coarse_questions_name_one_shown_and_one_absent_colour_in_balanced_order(bench) -> None:
    _, tables = bench
    for split in ("train", "val", "test"):
        rows = [r for r in tables[split].to_list() if r["task"] == "coarse_qa"]
        detail = {r["media_path"] for r in tables[split].to_list() if r["task"] == "detail_qa"}
        assert {r["media_path"] for r in rows} <= detail, (
            "a coarse question is a second question on a card video"
        )
        first = Counter(r["answer"] == r["options"][0] for r in rows)
        assert first[True] - first[False] in (0, 1), first
        for row in rows:
            shown = {c.colour: c for c in cards_from_json(row["cards"])}
            assert _named_colours(row["question"]) == row["options"]
            assert [c in shown for c in row["options"]].count(True) == 1
            assert row["answer"] in shown and row["evidence_frames"] == list(shown[row["answer"]].frames)


def test_glyph_sizes_are_drawn_per_card_from_the_spec(bench) -> None:
    _, tables = bench
    sizes = Counter(c.size for row in _rows(tables) for c in cards_from_json(row["cards"]))
    assert set(sizes) == set(SPEC.glyph_sizes), sizes


@pytest.mark.parametrize("size", [2, 3, 4])
def test_a_glyph_of_size_k_is_5k_pixels_tall_and_fits_inside_the_border(size: int) -> None:
    cell = _rendered_cell(Card("blue", "8", 0, 0, (0,), size))
    ink = np.argwhere((cell == 0).all(-1))
    assert ink[:, 0].max() - ink[:, 0].min() + 1 == 5 * size
    assert ink[:, 1].max() - ink[:, 1].min() + 1 == 3 * size
    assert ink.min() >= 4 and ink.max() < CELL - 4


def test_glyph_sizes_outside_the_cell_are_refused() -> None:
    with pytest.raises(ValueError, match="glyph size must be in 1..4"):
        _rendered_cell(Card("blue", "8", 0, 0, (0,), 5))


@pytest.mark.parametrize(
    ("size", "scale", "readable"),
    [(2, 1.0, True), (2, 0.75, False), (3, 0.75, True), (3, 0.625, False), (4, 0.5, True), (4, 0.375, False)],
)
def test_a_glyph_is_readable_while_its_strokes_keep_two_pixels(size, scale, readable) -> None:
    assert Card("red", "7", 0, 0, (0,), size).readable_at(scale) is readable


def test_grounding_span(bench) -> None:
    _, tables = bench
    rows = [r for r in _rows(tables) if r["task"] == "grounding"]
    assert rows
    for row in rows:
        (colour,) = _named_colours(row["question"])
        card = _card_of(cards_from_json(row["cards"]), colour)
        assert list(card.frames) == list(range(card.frames[0], card.frames[-1] + 1))  # one contiguous span
        start, end = card.frames[0] / SPEC.fps, (card.frames[-1] + 1) / SPEC.fps
        assert row["answer_span"] == [start, end]
        assert row["answer"] == format_span(*row["answer_span"])
        assert 0 <= start < end <= SPEC.num_frames / SPEC.fps


def test_grounding_spans_do_not_tell_the_asked_card_by_length_or_position() -> None:
    """The asked (digit) card's span is drawn like every distractor's: same lengths, same start positions."""
    spec = BenchmarkSpec(frame_size=56, num_frames=16, cards_per_video=3)
    assert grounding_max_chunks(spec) == 2
    rng = np.random.default_rng(0)
    lengths: dict[bool, list[int]] = {True: [], False: []}
    starts: dict[bool, list[int]] = {True: [], False: []}
    for _ in range(600):
        cards, _frames = draw_grounding_video(rng, spec)
        chunks = [set(f // spec.temporal_patch for f in c.frames) for c in cards]
        assert sum(len(c) for c in chunks) == len(set().union(*chunks))  # disjoint spans
        for k, card in enumerate(cards):
            lengths[k == 0].append(len(card.frames) // spec.temporal_patch)
            starts[k == 0].append(card.frames[0] // spec.temporal_patch)
    assert set(lengths[True]) == set(lengths[False]) == {1, 2}
    assert abs(np.mean(lengths[True]) - np.mean(lengths[False])) < 0.1
    assert abs(np.mean(starts[True]) - np.mean(starts[False])) < 0.4


def test_refuses_non_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "embedded"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError) as info:
        write_benchmark(root, SPEC, TINY_SIZES, progress=False, workers=1)
    assert str(root) in str(info.value)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]


def test_load_benchmark_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tables"):
        load_benchmark(tmp_path / "nowhere")


def _snapshot(root: Path, tables) -> tuple[dict, dict]:
    rows = {split: tables[split].to_list() for split in ("train", "val", "test")}
    media = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.suffix in (".mp4", ".png")
    }
    return rows, media


def test_same_seed_same_tables_different_seed_different(tmp_path: Path) -> None:
    a = write_benchmark(tmp_path / "a", SPEC, TINY_SIZES, seed=0, progress=False, workers=1)
    b = write_benchmark(tmp_path / "b", SPEC, TINY_SIZES, seed=0, progress=False, workers=1)
    c = write_benchmark(tmp_path / "c", SPEC, TINY_SIZES, seed=1, progress=False, workers=1)
    rows_a, media_a = _snapshot(tmp_path / "a", a)
    rows_b, media_b = _snapshot(tmp_path / "b", b)
    rows_c, media_c = _snapshot(tmp_path / "c", c)
    assert rows_a == rows_b and media_a == media_b
    assert media_a  # the comparison covered real files
    for split in rows_a:
        assert json.dumps(rows_a[split]) != json.dumps(rows_c[split])
    assert media_a != media_c


def test_workers_do_not_change_the_result(bench, tmp_path: Path) -> None:
    root1, tables1 = bench
    root2 = tmp_path / "embedded"
    tables2 = write_benchmark(root2, SPEC, SIZES, seed=3, progress=False, workers=2)
    rows1, media1 = _snapshot(root1, tables1)
    rows2, media2 = _snapshot(root2, tables2)
    assert rows1 == rows2
    assert media1.keys() == media2.keys() and len(media1) == sum(
        n for sizes in SIZES.values() for k, n in sizes.items() if k != "coarse_questions"
    )
    for name in media1:
        assert media1[name] == media2[name], name
