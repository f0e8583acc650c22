"""The embedded benchmark: synthetic videos whose answers rest on a small detail the question points to.

Every video shows a few *cards*: a coloured border (visible at coarse resolution, so a cheap look can find
the card) around a glyph drawn at one of `glyph_sizes` pixel scales (2: 6x10 px with 2-px strokes, 3: 9x15,
4: 12x20). A glyph stays readable while its strokes keep about 2 px (`READABLE_STROKE_PX`), so a size-2
glyph needs full resolution, a size-4 one survives a 0.5 downscale: uniform downscaling loses the cards one
size at a time, the graded degradation real benchmarks show, instead of everything at the first step. The
card the question names carries a digit; the other cards carry letters drawn with the same font and the same amount of ink, so at coarse
resolution all cards look alike and only the question's colour says where the digit is. Each card fills
exactly one 28x28 token cell of the full-resolution frame, which lets the generator label every visual
token (used to pre-train the tiny backbone's vision tower, like a real MLLM's pretrained encoder).

Why letters and not other digits on the distractor cards: the tiny backbone, trained from scratch on CPU,
does not learn to pick one of several legible digits by a colour named in the text in the time budget (an
associative-recall circuit; see the backbone report). With letter distractors it only has to read the one
digit; the *allocation* still has to follow the question, because a coarse view cannot tell digit from letter.

Tasks (all with the same row schema as the real benchmark loaders):
- ``detail_qa``: "What digit is on the red card?" -> "7" (chance 10%).
- ``multi_frame``: two digit cards in different chunks, "Which is larger, the digit on the red card or on the
  blue card?" -> the larger digit (chance 1/9 for distinct digits with a uniform guess); two evidence chunks.
- ``grounding``: "When is the digit on the red card shown?" -> "2.0-3.0" (seconds); scored by temporal IoU.
  Every card's span length and position are drawn alike, so neither tells the asked card from the others.
- ``image_qa``: a single image with several cards, detail question as above.
- ``coarse_qa``: "Which card is shown, the red card or the blue card?" -> "red" (one of the two is shown,
  first or second named equally often: chance 50%), asked about the first `coarse_questions` card videos of
  a split, a second question on the same video as its ``detail_qa`` one: answerable from the coloured borders
  alone, at low resolution, so a query-aware allocator can spend little on it, and the backbone learns from
  the pair that the question, not the video, decides what to answer. Evidence: the shown card's frames.
  (A yes/no "Is there a red card?" was tried first: the tiny backbone answered it with the majority answer
  at every scale, 0.50, since telling absence needs more than finding the matching card.)
- ``long_video``: like ``detail_qa`` on a long video whose cards are visible only briefly, for frame scaling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

CELL = 28  # one merged visual token of Qwen2.5-VL at full resolution

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 170),
    "orange": (240, 120, 10),
}

# 3x5 bitmap font, drawn at 2x: 6x10 px. Letters are the distractor glyphs.
_FONT = {
    "0": ["111", "101", "101", "101", "111"],
    "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"],
    "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"],
    "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"],
    "7": ["111", "001", "010", "010", "010"],
    "8": ["111", "101", "111", "101", "111"],
    "9": ["111", "101", "111", "001", "111"],
    "A": ["111", "101", "111", "101", "101"],
    "C": ["111", "100", "100", "100", "111"],
    "E": ["111", "100", "111", "100", "111"],
    "F": ["111", "100", "111", "100", "100"],
    "H": ["101", "101", "111", "101", "101"],
    "L": ["100", "100", "100", "100", "111"],
    "P": ["111", "101", "111", "100", "100"],
    "U": ["101", "101", "101", "101", "111"],
}
LETTERS = tuple(g for g in _FONT if not g.isdigit())
GLYPH_SCALE = 2  # the default (and smallest) glyph size: 6x10 px
BORDER = 4
MAX_GLYPH_SIZE = (CELL - 2 * BORDER) // 5  # the tallest glyph (5 rows) that fits inside the border: 4
#: Stroke width (px, at the processed resolution) down to which a glyph counts as readable: the smallest
#: glyph's stroke at full resolution. The vision tower's dense labels use it (resadapt/sft.py).
READABLE_STROKE_PX = 2.0
NO_DIGIT = 10  # dense label for background and letter cells


@dataclass(frozen=True)
class Card:
    """One card: where (token cell), when (source frame indices), what (colour, glyph at pixel scale `size`)."""

    colour: str
    glyph: str
    row: int
    col: int
    frames: tuple[int, ...]
    size: int = GLYPH_SCALE

    def readable_at(self, scale: float) -> bool:
        """Whether the glyph's strokes keep `READABLE_STROKE_PX` at resize `scale` (1 = full resolution)."""
        return scale * self.size >= READABLE_STROKE_PX - 1e-9

    @property
    def digit(self) -> int | None:
        return int(self.glyph) if self.glyph.isdigit() else None


@dataclass
class Sample:
    """One benchmark row; the fields match what the real benchmark loaders produce."""

    id: str
    task: str
    media_type: str  # "video" or "image"
    media_path: str  # relative to the benchmark root
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
    glyph = np.array([[c == "1" for c in row] for row in _FONT[card.glyph]], dtype=bool)
    if not 1 <= card.size <= MAX_GLYPH_SIZE:
        raise ValueError(
            f"card glyph size must be in 1..{MAX_GLYPH_SIZE} (fits a {CELL}-px cell), got {card.size}"
        )
    glyph = glyph.repeat(card.size, 0).repeat(card.size, 1)
    gh, gw = glyph.shape
    gy, gx = y0 + (CELL - gh) // 2, x0 + (CELL - gw) // 2
    region = canvas[gy : gy + gh, gx : gx + gw]
    region[glyph] = 0


def background(rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """A slowly drifting smooth texture, so consecutive frames are similar but not identical."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(1.0, 3.0, size=3)
    drift = 0.15 * np.arange(num_frames, dtype=np.float32)[:, None, None] / max(num_frames, 1)
    base = 120 + 25 * np.sin(2 * np.pi * freq[0] * (xx[None] + drift) + phase[0]) * np.cos(
        2 * np.pi * freq[1] * yy + phase[1]
    )
    tint = 10 * np.sin(2 * np.pi * freq[2] * (xx + yy) + phase[2])
    frames = np.stack([base + tint, base + 8, base - tint], axis=-1)
    return np.clip(frames, 0, 255).astype(np.uint8)


def render(cards: list[Card], bg: np.ndarray) -> np.ndarray:
    frames = bg.copy()
    for card in cards:
        for t in card.frames:
            draw_card(frames[t], card)
    return frames


def token_labels(cards: list[Card], frame_index: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell labels of one full-resolution frame: digit (NO_DIGIT for background and letters) and
    colour index (len(COLOURS) for background)."""
    digit = np.full((grid, grid), NO_DIGIT, dtype=np.int64)
    colour = np.full((grid, grid), len(COLOURS), dtype=np.int64)
    names = list(COLOURS)
    for card in cards:
        if frame_index in card.frames:
            if card.digit is not None:
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
    glyph_sizes: tuple[int, ...] = (2, 3, 4)
    temporal_patch: int = 2


def _place(rng: np.random.Generator, grid: int, n: int) -> list[tuple[int, int]]:
    cells = rng.choice(grid * grid, size=n, replace=False)
    return [(int(c) // grid, int(c) % grid) for c in cells]


def _sizes(rng: np.random.Generator, spec: BenchmarkSpec, n: int) -> list[int]:
    """Glyph sizes drawn independently for every card (asked or not), uniform over `spec.glyph_sizes`."""
    return [int(x) for x in rng.choice(np.asarray(spec.glyph_sizes), size=n)]


def _glyphs(rng: np.random.Generator, n: int, n_digits: int) -> list[str]:
    digits = [str(d) for d in rng.choice(10, size=n_digits, replace=False)]
    letters = [str(g) for g in rng.choice(LETTERS, size=n - n_digits, replace=False)]
    return digits + letters


def draw_card_video(
    rng: np.random.Generator, spec: BenchmarkSpec, num_frames: int, card_frames: int, n_digits: int = 1
):
    """Cards of distinct colours, each visible in its own window of `card_frames` frames; the first
    `n_digits` cards carry digits, the others letters."""
    grid = spec.frame_size // CELL
    n = spec.cards_per_video
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    glyphs = _glyphs(rng, n, n_digits)
    slots = num_frames // card_frames
    windows = rng.choice(slots, size=n, replace=False)
    cells = _place(rng, grid, n)
    sizes = _sizes(rng, spec, n)
    cards = [
        Card(
            str(colours[i]),
            glyphs[i],
            cells[i][0],
            cells[i][1],
            tuple(range(int(windows[i]) * card_frames, int(windows[i]) * card_frames + card_frames)),
            sizes[i],
        )
        for i in range(n)
    ]
    return cards, render(cards, background(rng, spec.frame_size, num_frames))


def grounding_max_chunks(spec: BenchmarkSpec) -> int:
    """The longest span of a grounding card, in chunks: up to 4, and short enough that the longest draw of
    every card fits the video together (`config.DataParams` checks there is a chunk per card)."""
    return min(4, spec.num_frames // spec.temporal_patch // spec.cards_per_video)


def draw_grounding_video(rng: np.random.Generator, spec: BenchmarkSpec):
    """Cards in disjoint spans of whole chunks; the digit card is listed first.

    Every card's span length is drawn independently from the same range (1 to `grounding_max_chunks`), and
    the order of the cards is a random permutation, so neither the length nor the position of a span tells
    the asked card from a distractor: only its colour and its digit do.
    """
    tp = spec.temporal_patch
    chunks = spec.num_frames // tp
    grid = spec.frame_size // CELL
    n = spec.cards_per_video
    glyphs = _glyphs(rng, n, 1)
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    longest = grounding_max_chunks(spec)
    lengths = [int(x) for x in rng.integers(1, longest + 1, size=n)]
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
    sizes = _sizes(rng, spec, n)
    cards = []
    for i in range(n):
        c0, c1 = spans[i]
        cards.append(
            Card(
                str(colours[i]), glyphs[i], cells[i][0], cells[i][1], tuple(range(c0 * tp, c1 * tp)), sizes[i]
            )
        )
    return cards, render(cards, background(rng, spec.frame_size, spec.num_frames))


def draw_image(rng: np.random.Generator, spec: BenchmarkSpec):
    grid = spec.frame_size // CELL
    n = spec.cards_per_video
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    glyphs = _glyphs(rng, n, 1)
    cells = _place(rng, grid, n)
    sizes = _sizes(rng, spec, n)
    cards = [Card(str(colours[i]), glyphs[i], cells[i][0], cells[i][1], (0,), sizes[i]) for i in range(n)]
    return cards, render(cards, background(rng, spec.frame_size, 1))[0]


def detail_question(colour: str) -> str:
    return f"What digit is on the {colour} card?"


def compare_question(a: str, b: str) -> str:
    return f"Which is larger, the digit on the {a} card or on the {b} card?"


def which_question(a: str, b: str) -> str:
    return f"Which card is shown, the {a} card or the {b} card?"


def grounding_question(colour: str) -> str:
    return f"When is the digit on the {colour} card shown?"


def format_span(start: float, end: float) -> str:
    return f"{start:.1f}-{end:.1f}"


# ---------------------------------------------------------------------------------------------------------
# Writing the benchmark: MP4 / PNG files plus one `datasets` table per split.


def _meta(cards: list[Card], spec: BenchmarkSpec, num_frames: int) -> dict:
    return {
        "fps": spec.fps,
        "num_frames": num_frames,
        "duration_s": num_frames / spec.fps,
        "cards": _cards_json(cards),
    }


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


_KINDS = ("card", "compare", "grounding", "image", "long")


def _draw_item(job: tuple) -> list[dict]:
    """Draw, write and describe one media item; its own seeded rng keeps the result independent of workers."""
    from PIL import Image

    from resadapt.data.video import write_video

    root, spec, seed, split_index, split, kind, i, coarse = job
    rng = np.random.default_rng([seed, split_index, _KINDS.index(kind), i])
    root = Path(root)
    media = root / split
    vid = f"{split}-{kind}-{i:05d}"
    if kind == "image":
        cards, image = draw_image(rng, spec)
        path = media / f"{vid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        target = cards[0]
        return [
            asdict(
                Sample(
                    vid,
                    "image_qa",
                    "image",
                    _rel(path, root),
                    detail_question(target.colour),
                    target.glyph,
                    evidence_frames=[0],
                    cards=_cards_json(cards),
                )
            )
        ]
    if kind == "grounding":
        cards, frames = draw_grounding_video(rng, spec)
        num = spec.num_frames
    elif kind == "long":
        cards, frames = draw_card_video(rng, spec, spec.long_num_frames, spec.long_card_frames)
        num = spec.long_num_frames
    else:
        n_digits = 2 if kind == "compare" else 1
        cards, frames = draw_card_video(rng, spec, spec.num_frames, spec.temporal_patch, n_digits)
        num = spec.num_frames
    path = _rel(write_video(media / f"{vid}.mp4", frames, spec.fps), root)
    meta = _meta(cards, spec, num)
    target = cards[0]
    if kind == "grounding":
        start, end = target.frames[0] / spec.fps, (target.frames[-1] + 1) / spec.fps
        row = Sample(
            vid,
            "grounding",
            "video",
            path,
            grounding_question(target.colour),
            format_span(start, end),
            answer_span=[start, end],
            evidence_frames=list(target.frames),
            **meta,
        )
    elif kind == "compare":
        a, b = cards[0], cards[1]
        row = Sample(
            vid,
            "multi_frame",
            "video",
            path,
            compare_question(a.colour, b.colour),
            str(max(a.digit, b.digit)),
            evidence_frames=sorted(a.frames + b.frames),
            **meta,
        )
    else:
        task = "long_video" if kind == "long" else "detail_qa"
        row = Sample(
            vid,
            task,
            "video",
            path,
            detail_question(target.colour),
            target.glyph,
            evidence_frames=list(target.frames),
            **meta,
        )
    rows = [asdict(row)]
    if coarse:
        rows.append(asdict(_which_row(rng, f"{vid}-coarse", path, cards, i % 2 == 0, meta)))
    return rows


def _which_row(
    rng: np.random.Generator, vid: str, path: str, cards: list[Card], shown_first: bool, meta: dict
):
    """A coarse_qa row: one shown card's colour and one colour the video never shows, the shown one named
    first or second as `shown_first` says."""
    shown = cards[int(rng.integers(len(cards)))]
    absent = str(rng.choice(sorted(set(COLOURS) - {c.colour for c in cards})))
    options = [shown.colour, absent] if shown_first else [absent, shown.colour]
    return Sample(
        vid,
        "coarse_qa",
        "video",
        path,
        which_question(*options),
        shown.colour,
        options=options,
        evidence_frames=list(shown.frames),
        **meta,
    )


def write_benchmark(
    root: str | Path,
    spec: BenchmarkSpec,
    sizes: dict[str, dict[str, int]],
    seed: int = 0,
    progress: bool = True,
    workers: int = 2,
):
    """Draw every split, write its media under `root`, and save a `datasets.DatasetDict` at `root/tables`.

    Deterministic: the same (spec, sizes, seed) gives the same files and rows for any number of `workers`.
    Refuses to write into a non-empty `root` (nothing already written is overwritten; DVC clears declared
    outputs itself).
    """
    import multiprocessing as mp

    from datasets import Dataset, DatasetDict
    from tqdm.auto import tqdm

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"benchmark folder {root} is not empty; remove it first (dvc repro does this)")
    counts = {
        "card": "card_videos",
        "compare": "compare_videos",
        "grounding": "grounding_videos",
        "image": "images",
        "long": "long_videos",
    }
    tables = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) if workers > 1 else _Serial() as pool:
        for split_index, split in enumerate(("train", "val", "test")):
            if split not in sizes:
                raise KeyError(f"sizes has no entry for split {split!r}")
            n_coarse = sizes[split].get("coarse_questions", 0)
            jobs = [
                (str(root), spec, seed, split_index, split, kind, i, kind == "card" and i < n_coarse)
                for kind in _KINDS
                for i in range(sizes[split][counts[kind]])
            ]
            rows: list[dict] = []
            for item_rows in tqdm(
                pool.imap(_draw_item, jobs, chunksize=8),
                total=len(jobs),
                desc=f"prepare {split}",
                disable=not progress,
            ):
                rows += item_rows
            tables[split] = Dataset.from_list(rows)
    dataset = DatasetDict(tables)
    dataset.save_to_disk(str(root / "tables"))
    return dataset


class _Serial:
    """Pool stand-in for workers=1 (same interface as the bits of multiprocessing.Pool we use)."""

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_benchmark(root: str | Path):
    """The `datasets.DatasetDict` written by `write_benchmark`, with a clear error if it is not there."""
    from datasets import load_from_disk

    path = Path(root) / "tables"
    if not path.exists():
        raise FileNotFoundError(f"no benchmark tables at {path}; run the prepare stage (dvc repro prepare)")
    return load_from_disk(str(path))


def split_rows(root: str | Path, split: str, tasks: list[str], limit: int | None = None) -> list[dict]:
    """Rows of `split` for `tasks`, at most `limit` per task, in table order."""
    table = load_benchmark(root)
    if split not in table:
        raise KeyError(f"benchmark at {root} has no split {split!r}")
    out = []
    for task in tasks:
        part = [dict(r) for r in table[split] if r["task"] == task]
        out += part[:limit] if limit else part
    return out


def benchmark_spec(data_params) -> BenchmarkSpec:
    """The BenchmarkSpec a validated `config.DataParams` describes (its fields of the same names)."""
    keys = {f.name for f in fields(BenchmarkSpec)} & set(type(data_params).model_fields)
    values = data_params.model_dump(include=keys)
    if "glyph_sizes" in values:
        values["glyph_sizes"] = tuple(values["glyph_sizes"])
    return BenchmarkSpec(**values)
