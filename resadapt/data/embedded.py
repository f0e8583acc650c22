"""The embedded benchmark: synthetic videos whose answers rest on a small detail the question points to.

Every video shows a few *cards*: a coloured border (visible at coarse resolution, so a cheap look can
find the card) around a 6x10 px digit (readable only at full resolution). The question names a card by
its colour, so it decides where the pixels should go. Each card fills exactly one 28x28 token cell of
the full-resolution frame, which lets the generator label every visual token (used to pre-train the tiny
backbone's vision tower, like a real MLLM's pretrained encoder).

Tasks (all with the same row schema as the real benchmark loaders):
- ``detail_qa``: "What digit is on the red card?" -> "7" (chance 10%).
- ``multi_frame``: "Which card shows the larger digit, red or blue?" -> "red" (chance 50%); two evidence chunks.
- ``grounding``: "When is the digit 7 shown?" -> "2.0-5.0" (seconds); scored by temporal IoU.
- ``image_qa``: a single image with several cards, detail question as above.
- ``long_video``: like ``detail_qa`` on a long video whose cards are visible only briefly, for frame scaling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("detail_qa", "multi_frame", "grounding", "image_qa", "long_video")
CELL = 28  # one merged visual token of Qwen2.5-VL at full resolution

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 170),
    "orange": (240, 120, 10),
}

# 3x5 bitmap font for the digits, drawn at 2x: 6x10 px.
_FONT = {
    0: ["111", "101", "101", "101", "111"],
    1: ["010", "110", "010", "010", "111"],
    2: ["111", "001", "111", "100", "111"],
    3: ["111", "001", "111", "001", "111"],
    4: ["101", "101", "111", "001", "001"],
    5: ["111", "100", "111", "001", "111"],
    6: ["111", "100", "111", "101", "111"],
    7: ["111", "001", "010", "010", "010"],
    8: ["111", "101", "111", "101", "111"],
    9: ["111", "101", "111", "001", "111"],
}
GLYPH_SCALE = 2
BORDER = 4


@dataclass(frozen=True)
class Card:
    """One card: where (token cell), when (source frame indices), what (colour, digit)."""

    colour: str
    digit: int
    row: int
    col: int
    frames: tuple[int, ...]


@dataclass
class Sample:
    """One benchmark row; the fields match what the real benchmark loaders produce."""

    id: str
    task: str
    media_type: str  # "video" or "image"
    media_path: str
    question: str
    answer: str
    options: list[str] = field(default_factory=list)
    fps: float = 0.0
    num_frames: int = 1
    duration_s: float = 0.0
    answer_span: list[float] = field(default_factory=list)  # grounding: [start, end] seconds
    evidence_frames: list[int] = field(default_factory=list)  # source frame indices holding the evidence
    cards: str = "[]"  # JSON list of Card, for dense labels, heatmaps and the Oracle
    source: str = "embedded"


def draw_card(canvas: np.ndarray, card: Card) -> None:
    """Draw a card into one 28x28 cell of an (H, W, 3) frame, in place."""
    y0, x0 = card.row * CELL, card.col * CELL
    canvas[y0 : y0 + CELL, x0 : x0 + CELL] = COLOURS[card.colour]
    canvas[y0 + BORDER : y0 + CELL - BORDER, x0 + BORDER : x0 + CELL - BORDER] = 255
    glyph = np.array([[c == "1" for c in row] for row in _FONT[card.digit]], dtype=bool)
    glyph = glyph.repeat(GLYPH_SCALE, 0).repeat(GLYPH_SCALE, 1)
    gh, gw = glyph.shape
    gy, gx = y0 + (CELL - gh) // 2, x0 + (CELL - gw) // 2
    region = canvas[gy : gy + gh, gx : gx + gw]
    region[glyph] = 0


def background(rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """A slowly drifting smooth grey-green texture, so frames are similar but not identical."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(1.0, 3.0, size=3)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        drift = 0.15 * t / max(num_frames, 1)
        base = 120 + 25 * np.sin(2 * np.pi * (freq[0] * (xx + drift)) + phase[0]) * np.cos(
            2 * np.pi * freq[1] * yy + phase[1]
        )
        tint = 10 * np.sin(2 * np.pi * freq[2] * (xx + yy) + phase[2])
        frames[t, ..., 0] = np.clip(base + tint, 0, 255)
        frames[t, ..., 1] = np.clip(base + 8, 0, 255)
        frames[t, ..., 2] = np.clip(base - tint, 0, 255)
    return frames


def render(cards: list[Card], bg: np.ndarray) -> np.ndarray:
    frames = bg.copy()
    for card in cards:
        for t in card.frames:
            draw_card(frames[t], card)
    return frames


def token_labels(cards: list[Card], frame_index: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell labels of one full-resolution frame: digit (10 = background) and colour (len = background)."""
    digit = np.full((grid, grid), 10, dtype=np.int64)
    colour = np.full((grid, grid), len(COLOURS), dtype=np.int64)
    names = list(COLOURS)
    for card in cards:
        if frame_index in card.frames:
            digit[card.row, card.col] = card.digit
            colour[card.row, card.col] = names.index(card.colour)
    return digit, colour


def cards_from_json(text: str) -> list[Card]:
    return [Card(**{**c, "frames": tuple(c["frames"])}) for c in json.loads(text)]


def _cards_json(cards: list[Card]) -> str:
    return json.dumps([asdict(c) for c in cards])


@dataclass(frozen=True)
class BenchmarkSpec:
    """How the embedded benchmark is drawn; every field is a params.yaml key under `data`."""

    frame_size: int = 224
    fps: float = 2.0
    num_frames: int = 16
    long_num_frames: int = 64
    long_card_frames: int = 4
    cards_per_video: int = 3
    temporal_patch: int = 2


def _place(rng: np.random.Generator, grid: int, n: int) -> list[tuple[int, int]]:
    cells = rng.choice(grid * grid, size=n, replace=False)
    return [(int(c) // grid, int(c) % grid) for c in cells]


def _chunk_frames(chunk: int, tp: int) -> tuple[int, ...]:
    return tuple(range(chunk * tp, chunk * tp + tp))


def draw_card_video(rng: np.random.Generator, spec: BenchmarkSpec, num_frames: int, card_frames: int):
    """Cards of distinct colours and digits, each visible in its own window of `card_frames` frames."""
    grid = spec.frame_size // CELL
    n = spec.cards_per_video
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    digits = rng.choice(10, size=n, replace=False)
    slots = num_frames // card_frames
    windows = sorted(rng.choice(slots, size=n, replace=False))
    rng.shuffle(windows)
    cells = _place(rng, grid, n)
    cards = [
        Card(
            str(colours[i]),
            int(digits[i]),
            cells[i][0],
            cells[i][1],
            tuple(range(int(windows[i]) * card_frames, int(windows[i]) * card_frames + card_frames)),
        )
        for i in range(n)
    ]
    return cards, render(cards, background(rng, spec.frame_size, num_frames))


def draw_grounding_video(rng: np.random.Generator, spec: BenchmarkSpec):
    """Cards in disjoint spans of whole chunks; the asked card spans 1-4 chunks."""
    tp = spec.temporal_patch
    chunks = spec.num_frames // tp
    grid = spec.frame_size // CELL
    n = spec.cards_per_video
    digits = rng.choice(10, size=n, replace=False)
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    lengths = [int(rng.integers(1, 5))] + [1] * (n - 1)
    # disjoint chunk spans in random order
    order = rng.permutation(n)
    free = chunks - sum(lengths)
    gaps = np.sort(rng.choice(free + 1, size=n, replace=True))
    spans, cursor, prev_gap = {}, 0, 0
    for k, i in enumerate(order):
        cursor += int(gaps[k]) - prev_gap
        prev_gap = int(gaps[k])
        spans[int(i)] = (cursor, cursor + lengths[int(i)])
        cursor += lengths[int(i)]
    cells = _place(rng, grid, n)
    cards = []
    for i in range(n):
        c0, c1 = spans[i]
        cards.append(
            Card(str(colours[i]), int(digits[i]), cells[i][0], cells[i][1], tuple(range(c0 * tp, c1 * tp)))
        )
    return cards, render(cards, background(rng, spec.frame_size, spec.num_frames))


def draw_image(rng: np.random.Generator, spec: BenchmarkSpec):
    grid = spec.frame_size // CELL
    n = spec.cards_per_video
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    digits = rng.choice(10, size=n, replace=False)
    cells = _place(rng, grid, n)
    cards = [Card(str(colours[i]), int(digits[i]), cells[i][0], cells[i][1], (0,)) for i in range(n)]
    return cards, render(cards, background(rng, spec.frame_size, 1))[0]


def detail_question(colour: str) -> str:
    return f"What digit is on the {colour} card?"


def compare_question(a: str, b: str) -> str:
    return f"Which card shows the larger digit, {a} or {b}?"


def grounding_question(digit: int) -> str:
    return f"When is the digit {digit} shown?"


def format_span(start: float, end: float) -> str:
    return f"{start:.1f}-{end:.1f}"


# ---------------------------------------------------------------------------------------------------------
# Writing the benchmark: MP4 / PNG files plus one `datasets` table per split.


def _video_rows(vid: str, path: str, cards: list[Card], spec: BenchmarkSpec, num_frames: int, task: str, rng):
    rows = []
    meta = {"fps": spec.fps, "num_frames": num_frames, "duration_s": num_frames / spec.fps, "cards": _cards_json(cards)}
    for i, card in enumerate(cards):
        rows.append(
            Sample(
                id=f"{vid}-q{i}",
                task=task,
                media_type="video",
                media_path=path,
                question=detail_question(card.colour),
                answer=str(card.digit),
                evidence_frames=list(card.frames),
                **meta,
            )
        )
    if task == "detail_qa":
        a, b = rng.choice(len(cards), size=2, replace=False)
        ca, cb = cards[int(a)], cards[int(b)]
        winner = ca if ca.digit > cb.digit else cb
        rows.append(
            Sample(
                id=f"{vid}-c",
                task="multi_frame",
                media_type="video",
                media_path=path,
                question=compare_question(ca.colour, cb.colour),
                answer=winner.colour,
                options=[ca.colour, cb.colour],
                evidence_frames=sorted(ca.frames + cb.frames),
                **meta,
            )
        )
    return rows


def write_benchmark(
    root: str | Path,
    spec: BenchmarkSpec,
    sizes: dict[str, dict[str, int]],
    seed: int = 0,
    progress: bool = True,
):
    """Draw every split, write its media under `root`, and save a `datasets.DatasetDict` at `root/tables`.

    Deterministic: the same (spec, sizes, seed) gives the same frames and rows. Refuses to write into a
    non-empty `root` (nothing already written is overwritten; DVC clears declared outputs itself).
    """
    from datasets import Dataset, DatasetDict
    from PIL import Image
    from tqdm.auto import tqdm

    from resadapt.data.video import write_video

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"benchmark folder {root} is not empty; remove it first (dvc repro does this)")
    tables = {}
    for split_index, split in enumerate(("train", "val", "test")):
        if split not in sizes:
            raise KeyError(f"sizes has no entry for split {split!r}")
        n = sizes[split]
        rng = np.random.default_rng([seed, split_index])
        rows: list[Sample] = []
        media = root / split
        jobs = (
            [("card", i) for i in range(n["card_videos"])]
            + [("grounding", i) for i in range(n["grounding_videos"])]
            + [("image", i) for i in range(n["images"])]
            + [("long", i) for i in range(n["long_videos"])]
        )
        for kind, i in tqdm(jobs, desc=f"prepare {split}", disable=not progress):
            vid = f"{split}-{kind}-{i:05d}"
            if kind == "card":
                cards, frames = draw_card_video(rng, spec, spec.num_frames, spec.temporal_patch)
                path = write_video(media / f"{vid}.mp4", frames, spec.fps)
                rows += _video_rows(vid, str(path), cards, spec, spec.num_frames, "detail_qa", rng)
            elif kind == "long":
                cards, frames = draw_card_video(rng, spec, spec.long_num_frames, spec.long_card_frames)
                path = write_video(media / f"{vid}.mp4", frames, spec.fps)
                rows += _video_rows(vid, str(path), cards, spec, spec.long_num_frames, "long_video", rng)
            elif kind == "grounding":
                cards, frames = draw_grounding_video(rng, spec)
                path = write_video(media / f"{vid}.mp4", frames, spec.fps)
                target = cards[0]
                start, end = target.frames[0] / spec.fps, (target.frames[-1] + 1) / spec.fps
                rows.append(
                    Sample(
                        id=f"{vid}-g",
                        task="grounding",
                        media_type="video",
                        media_path=str(path),
                        question=grounding_question(target.digit),
                        answer=format_span(start, end),
                        answer_span=[start, end],
                        evidence_frames=list(target.frames),
                        fps=spec.fps,
                        num_frames=spec.num_frames,
                        duration_s=spec.num_frames / spec.fps,
                        cards=_cards_json(cards),
                    )
                )
            else:
                cards, image = draw_image(rng, spec)
                path = media / f"{vid}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                for q, card in enumerate(cards):
                    rows.append(
                        Sample(
                            id=f"{vid}-q{q}",
                            task="image_qa",
                            media_type="image",
                            media_path=str(path),
                            question=detail_question(card.colour),
                            answer=str(card.digit),
                            evidence_frames=[0],
                            cards=_cards_json(cards),
                        )
                    )
        tables[split] = Dataset.from_list([asdict(r) for r in rows])
    dataset = DatasetDict(tables)
    dataset.save_to_disk(str(root / "tables"))
    return dataset


def load_benchmark(root: str | Path):
    """The `datasets.DatasetDict` written by `write_benchmark`, with a clear error if it is not there."""
    from datasets import load_from_disk

    path = Path(root) / "tables"
    if not path.exists():
        raise FileNotFoundError(f"no benchmark tables at {path}; run the prepare stage (dvc repro prepare)")
    return load_from_disk(str(path))
