"""Training the tiny backbone into a resolution-robust reader (default profile only).

A real MLLM starts from a pretrained vision encoder; the tiny one starts from nothing, and plain SFT on
the answer token does not teach a 1M-parameter model to read a 6x10 px digit in CPU minutes (NOTES,
"Training a tiny VLM from scratch"). The recipe here:

1. **Vision pre-training with dense token labels.** The generator knows what lies under every 28x28
   token (background, or a card of some colour with some digit). A head scores each merged visual token
   against the language model's own embeddings of the digit and colour words, so the vision tower learns
   to read *and* its tokens land next to the words the question uses (which makes finding "the red card"
   a dot product for the language model). Chunks are shown at random scales, so it also learns that
   small chunks hold no readable digit.
2. **SFT of the whole model** on multi-turn conversations (several questions about one video, teacher
   forced, so the vision cost is paid once per video), with random per-chunk scales and the dense loss
   kept at a small weight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from resadapt.backbone import VisualInput, build_messages, chunk_metadata
from resadapt.budget import VisionGeometry, resize_video, scaled_size
from resadapt.config import SFTParams
from resadapt.data.embedded import CELL, COLOURS, NO_DIGIT, READABLE_STROKE_PX, Card


@dataclass
class Example:
    """One training video (or image) with its cards and the question/answer turns asked about it."""

    frames: np.ndarray  # (T, H, W, 3) uint8, or (H, W, 3) for an image
    cards: list[Card]
    turns: list[tuple[str, str]]
    fps: float
    evidence_frames: list[int]
    is_image: bool = False
    task: str = "detail_qa"
    frame_times: list[float] | None = None  # seconds of each frame; default index / fps

    def time_of(self, frame: int) -> float:
        return self.frame_times[frame] if self.frame_times is not None else frame / self.fps


# tasks whose answer does not depend on when things happen, so the short crop view keeps it valid
CROPPABLE_TASKS = ("detail_qa", "multi_frame")


def chunk_scales_for(
    example: Example,
    rng: np.random.Generator,
    s_min: float,
    p_full: float,
    p_uniform: float,
    tp: int = 2,
    readable_share: float = 0.0,
):
    """Random per-chunk scales: with probability `p_uniform` the whole video at one scale (how uniform
    downscaling shows it: the large glyphs stay readable, so the model learns to read them there); otherwise
    evidence chunks at full resolution with probability `p_full`, others anywhere (30% at full).

    Downscaled evidence (and the uniform scale) lies in [s_min, 1], or with probability `readable_share` in
    the asked glyph's readable range [READABLE_STROKE_PX / its size, 1], so the model meets the scales where
    reading is possible often enough to learn it there. With `readable_share` 0 no extra draw is taken.
    """
    n_chunks = 1 if example.is_image else math.ceil(len(example.frames) / tp)
    ev_frames = set(example.evidence_frames)
    sizes = [c.size for c in example.cards if ev_frames & set(c.frames)]
    floor = min(1.0, READABLE_STROKE_PX / max(sizes)) if sizes else s_min

    def draw():
        lo = floor if readable_share and rng.random() < readable_share else s_min
        return float(rng.uniform(lo, 1.0))

    if rng.random() < p_uniform:
        return [draw()] * n_chunks
    evidence = {f // tp for f in example.evidence_frames}
    scales = []
    for k in range(n_chunks):
        if (k in evidence or example.is_image) and rng.random() < p_full:
            scales.append(1.0)
        elif rng.random() < 0.3:
            scales.append(1.0)
        elif k in evidence:
            scales.append(draw())
        else:
            scales.append(float(rng.uniform(s_min, 1.0)))
    return scales


def resize_chunks(frames: np.ndarray, scales: list[float], processor, tp: int = 2):
    """Cut frames into temporal chunks, each resized by its scale with the budget operator; (chunks, sizes)."""
    geom = VisionGeometry.from_processor(processor)
    tv = resize_video(frames, np.repeat(np.asarray(scales, dtype=float), tp)[: len(frames)], geom)
    return tv.chunks, tv.chunk_sizes


def chunk_token_labels(cards: list[Card], first_frame: int, size: tuple[int, int], base: int):
    """Labels of the merged tokens of one chunk at its processed size (h, w), from `base`-px square frames.

    A card's labels go to the token holding the card's centre, where its glyph is drawn: colour always,
    digit only while the glyph is readable at the chunk's scale (`Card.readable_at`: a size-2 glyph at full
    resolution only, a size-4 one down to half). At a scale whose tokens do not align with the cards (0.75:
    a card is 21 px, tokens 28) the centre is the only faithful rule: a token named by the card cell's
    footprint on the full-resolution grid can hold none of the glyph. Below half resolution several cards
    can share a token; the first in `cards` keeps it.
    """
    gh, gw = size[0] // CELL, size[1] // CELL
    scale = min(size) / base
    names = list(COLOURS)
    d = np.full((gh, gw), NO_DIGIT, dtype=np.int64)
    c = np.full((gh, gw), len(COLOURS), dtype=np.int64)
    for card in cards:
        if first_frame not in card.frames:
            continue
        i = min(gh - 1, int((card.row + 0.5) * CELL * gh / base))
        j = min(gw - 1, int((card.col + 0.5) * CELL * gw / base))
        if c[i, j] != len(COLOURS):
            continue
        c[i, j] = names.index(card.colour)
        if card.digit is not None and card.readable_at(scale):
            d[i, j] = card.digit
    return d.reshape(-1), c.reshape(-1)


class DenseHead(torch.nn.Module):
    """Scores merged visual tokens against the LM's embeddings of digit and colour words."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.embed = model.get_input_embeddings()
        digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        colour_ids = [tokenizer.convert_tokens_to_ids("Ġ" + c) for c in COLOURS]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in digit_ids + colour_ids:
            raise ValueError("the tokenizer lacks single tokens for digits or colour words")
        self.register_buffer("digit_ids", torch.tensor(digit_ids), persistent=False)
        self.register_buffer("colour_ids", torch.tensor(colour_ids), persistent=False)
        dim = self.embed.weight.shape[1]
        self.none_digit = torch.nn.Parameter(torch.zeros(dim))
        self.none_colour = torch.nn.Parameter(torch.zeros(dim))
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, tokens: torch.Tensor):
        e = self.embed.weight
        dig = torch.cat([e[self.digit_ids], self.none_digit[None]])
        col = torch.cat([e[self.colour_ids], self.none_colour[None]])
        return self.scale * tokens @ dig.T, self.scale * tokens @ col.T


def video_features(model, pixel_values_videos, video_grid_thw):
    out = model.model.visual(pixel_values_videos, grid_thw=video_grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def window_chunk(chunk: np.ndarray, d: np.ndarray, col: np.ndarray, window: int, rng: np.random.Generator):
    """Crop an already resized chunk to `window` x `window` merged tokens around a random card token.

    Cropping after the resize keeps where glyphs fall on the token grid at that scale (a crop taken before
    the resize is realised at one aligned size for every scale), at a fraction of a full frame's cost.
    """
    gh, gw = chunk.shape[1] // CELL, chunk.shape[2] // CELL
    d, col = d.reshape(gh, gw), col.reshape(gh, gw)
    cards = np.argwhere(col != len(COLOURS))
    i, j = cards[rng.integers(len(cards))] if len(cards) else (rng.integers(gh), rng.integers(gw))
    wh, ww = min(window, gh), min(window, gw)
    r0 = int(np.clip(i - rng.integers(0, wh), 0, gh - wh))
    c0 = int(np.clip(j - rng.integers(0, ww), 0, gw - ww))
    crop = chunk[:, r0 * CELL : (r0 + wh) * CELL, c0 * CELL : (c0 + ww) * CELL]
    return crop, d[r0 : r0 + wh, c0 : c0 + ww].reshape(-1), col[r0 : r0 + wh, c0 : c0 + ww].reshape(-1)


def dense_batch(
    examples: list[Example],
    scales: list[list[float]],
    processor,
    tp: int = 2,
    rng: np.random.Generator | None = None,
    window: int | None = None,
):
    """Pixel values, grids and token labels for the chunks of a batch of videos.

    With `rng`, chunks without any card are kept only one time in five (they teach little), and with
    `window` every chunk is cropped to that many tokens a side after its resize (`window_chunk`).
    """
    geom = VisionGeometry.from_processor(processor)
    chunks, labels_d, labels_c = [], [], []
    for ex, sc in zip(examples, scales, strict=True):
        frames = ex.frames[None] if ex.is_image else ex.frames
        for k, s in enumerate(sc):
            size = scaled_size(frames.shape[1], frames.shape[2], s, geom)
            d, col = chunk_token_labels(ex.cards, k * tp, size, frames.shape[1])
            if rng is not None and (col == len(COLOURS)).all() and rng.random() > 0.2:
                continue
            part = frames[k * tp : (k + 1) * tp]
            c = resize_video(part, np.full(len(part), s), geom).chunks[0]  # only the chunks kept
            if rng is not None and window is not None:
                c, d, col = window_chunk(c, d, col, window, rng)
            chunks.append(c)
            labels_d.append(d)
            labels_c.append(col)
    vp = processor.video_processor
    out = vp(chunks)
    return (
        out["pixel_values_videos"],
        out["video_grid_thw"],
        torch.from_numpy(np.concatenate(labels_d)),
        torch.from_numpy(np.concatenate(labels_c)),
    )


def dense_loss(head: DenseHead, feats: torch.Tensor, labels_d: torch.Tensor, labels_c: torch.Tensor):
    ld, lc = head(feats)
    # background tokens vastly outnumber cards: weight card tokens up so the reader is not lazy
    is_digit = labels_d != NO_DIGIT
    n_card = is_digit.sum().clamp(min=1)
    w = torch.where(is_digit, (labels_d.numel() - n_card) / n_card, 1.0).clamp(min=1.0)
    loss = (F.cross_entropy(ld, labels_d, reduction="none") * w).sum() / w.sum()
    loss = loss + (F.cross_entropy(lc, labels_c, reduction="none") * w).sum() / w.sum()
    acc = ((ld.argmax(-1) == labels_d) & is_digit).sum().item() / max(1, is_digit.sum().item())
    return loss, acc


def conversation_inputs(processor, examples: list[Example], scales: list[list[float]], tp: int = 2):
    """Multi-turn SFT batch (every assistant turn labelled) and the dense token labels of its visual inputs.

    Dense labels come back per modality in the order the model encodes them (images, then video chunks),
    so the features captured from the model's own forward can be scored without a second vision pass.
    """
    texts, videos, metas, images = [], [], [], []
    dense: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"image": [], "video": []}
    for ex, sc in zip(examples, scales, strict=True):
        frames = ex.frames[None] if ex.is_image else ex.frames
        cs, sizes = resize_chunks(frames, sc, processor, tp)
        base = frames.shape[1]
        if ex.is_image:
            visual = VisualInput(image=cs[0][0])
            images.append(cs[0][0])
            dense["image"].append(chunk_token_labels(ex.cards, 0, sizes[0], base))
        else:
            times = [ex.time_of(k * tp) for k in range(len(cs))]
            visual = VisualInput(chunks=cs, chunk_times=times, fps=ex.fps)
            videos.extend(cs)
            metas.extend(chunk_metadata(visual))
            dense["video"] += [
                chunk_token_labels(ex.cards, k * tp, size, base) for k, size in enumerate(sizes)
            ]
        q0, a0 = ex.turns[0]
        msgs = build_messages(visual, q0, a0)
        for q, a in ex.turns[1:]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
    kwargs = {}
    if videos:
        kwargs |= {"videos": videos, "video_metadata": metas}
    if images:
        kwargs["images"] = images
    batch = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    batch["labels"] = assistant_labels(batch["input_ids"], processor.tokenizer)
    labels = {
        k: (
            torch.from_numpy(np.concatenate([d for d, _ in v])),
            torch.from_numpy(np.concatenate([c for _, c in v])),
        )
        for k, v in dense.items()
        if v
    }
    return batch, labels


class VisualCapture:
    """Keeps the merged visual tokens of the model's own forward (one entry per call to the vision tower)."""

    def __init__(self, model):
        self.outputs: list[torch.Tensor] = []
        self.handle = model.model.visual.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.outputs.append(output.pooler_output if hasattr(output, "pooler_output") else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        self.handle.remove()


def assistant_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """-100 everywhere except the content of assistant turns and their closing <|im_end|>."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    labels = torch.full_like(input_ids, -100)
    for b, row in enumerate(input_ids.tolist()):
        i = 0
        while i < len(row):
            if row[i] == start and row[i + 1 : i + 1 + len(header)] == header:
                j = i + 1 + len(header)
                while j < len(row) and row[j] != end:
                    labels[b, j] = row[j]
                    j += 1
                if j < len(row):
                    labels[b, j] = end
                i = j
            i += 1
    return labels


def _loop(name, steps, time_limit_minutes, step_fn, log: Callable[[dict], None] | None):
    """Run `step_fn(step, step / steps)` `steps` times (or until the opt-in time limit); logs every step."""
    t0 = time.time()
    for step in range(steps):
        if time_limit_minutes is not None and time.time() - t0 >= time_limit_minutes * 60:
            print(f"{name}: time limit of {time_limit_minutes} min reached after {step} of {steps} steps")
            return step
        stats = step_fn(step, step / steps)
        if log is not None:
            log({"stage": name, "step": step + 1, "time_s": round(time.time() - t0, 1), **stats})
    return steps


def dense_scales_for(example: Example, rng: np.random.Generator, floor: float, tp: int = 2) -> list[float]:
    """Dense-phase chunk scales: full resolution one time in four, else uniform in [floor, 1], each chunk
    its own, so the tower meets every realised size and every way glyphs fall on its token grid there."""
    n_chunks = 1 if example.is_image else math.ceil(len(example.frames) / tp)
    return [1.0 if rng.random() < 0.25 else float(rng.uniform(floor, 1.0)) for _ in range(n_chunks)]


def dense_phase(
    model,
    head: DenseHead,
    processor,
    take: Callable[[int], list[Example]],
    schedule: SFTParams,
    rng: np.random.Generator,
    log: Callable[[dict], None] | None = None,
) -> int:
    """Stage 1 of the recipe: the vision tower (and `head`) learn to read with the dense token loss, on
    full videos at `dense_scales_for` scales, each chunk cropped after its resize to `dense_window` tokens
    a side around a card (cheap, and glyphs stay where that scale puts them); every decoded video is shown
    `dense_views` times at fresh scales (decoding costs more than a view). Returns the steps run."""
    vis_params = list(model.model.visual.parameters()) + [
        p for n, p in head.named_parameters() if n != "embed.weight"
    ]
    opt = torch.optim.AdamW(vis_params + [head.embed.weight], lr=schedule.dense_lr, weight_decay=0.0)

    def dense_step(step, frac):
        for g in opt.param_groups:
            g["lr"] = schedule.dense_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - frac))
        exs = take(schedule.dense_batch) * schedule.dense_views
        scales = [dense_scales_for(e, rng, schedule.dense_scale_floor) for e in exs]
        pv, grid, ld, lc = dense_batch(exs, scales, processor, rng=rng, window=schedule.dense_window)
        loss, acc = dense_loss(head, video_features(model, pv, grid), ld, lc)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis_params, 1.0)
        opt.step()
        return {"loss": round(loss.item(), 4), "card_digit_acc": round(acc, 3)}

    return _loop("dense", schedule.dense_steps, schedule.time_limit_minutes, dense_step, log)


def train_backbone(
    model,
    processor,
    examples: Callable[[np.random.Generator, float], Iterator[Example]],
    schedule: SFTParams,
    s_min: float,
    seed: int,
    log: Callable[[dict], None] | None = None,
):
    """Run the recipe in place on `model`: `schedule` gives the step count of each phase, batch sizes and
    rates (counted in steps, so the same params and seed give the same model on the same machine; not across
    CPUs, whose float kernels round differently); `s_min` is the
    smallest scale chunks are shown at.

    `examples(rng, crop_prob)` yields training examples forever, a `crop_prob` share of card videos in
    the short curriculum view (`crop_example`).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    head = DenseHead(model, processor.tokenizer)
    # the SFT phase's language-side reader: its own head on the LM's hidden state at every visual token
    lm_head = DenseHead(model, processor.tokenizer) if schedule.lm_dense_weight > 0 else None
    token_ids = {"image": model.config.image_token_id, "video": model.config.video_token_id}
    streams = {}

    def take(n, crop_prob=0.0):
        if crop_prob not in streams:
            streams[crop_prob] = examples(rng, crop_prob)
        return [next(streams[crop_prob]) for _ in range(n)]

    model.train()
    dense_phase(model, head, processor, take, schedule, rng, log)

    vision = list(model.model.visual.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    for h in (head, lm_head) if lm_head is not None else (head,):
        rest += [p for n, p in h.named_parameters() if n != "embed.weight"]
    params = vision + rest
    # the vision tower is already a reader after stage 1: a smaller rate keeps SFT from wrecking it
    opt = torch.optim.AdamW(
        [{"params": vision, "lr_scale": schedule.vision_lr_scale}, {"params": rest, "lr_scale": 1.0}],
        lr=schedule.sft_lr,
        weight_decay=0.0,
    )

    capture = VisualCapture(model)

    def sft_step(step, frac, crop=False):
        for g in opt.param_groups:
            warm = min(1.0, (step + 1) / 20)
            g["lr"] = (
                g["lr_scale"] * schedule.sft_lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            )
        exs = take(schedule.crop_batch, 1.0) if crop else take(schedule.sft_batch)
        # the crop curriculum keeps the plain sampler; the readable share and the LM-side loss are the SFT phase's
        p_uniform, share = (
            (schedule.crop_p_uniform, 0.0) if crop else (schedule.p_uniform, schedule.readable_share)
        )
        lm_weight = 0.0 if crop else schedule.lm_dense_weight
        scales = [
            chunk_scales_for(e, rng, s_min, schedule.p_full, p_uniform, readable_share=share) for e in exs
        ]
        batch, dense = conversation_inputs(processor, exs, scales)
        capture.take()
        out = model(**batch, output_hidden_states=lm_weight > 0)
        loss = out.loss
        stats = {"lm_loss": round(loss.item(), 4)}
        feats = capture.take()
        # the model encodes images first, then videos (one vision call each)
        order = [k for k in ("image", "video") if k in dense]
        for kind, f in zip(order, feats, strict=True):
            if schedule.dense_weight > 0:
                dl, acc = dense_loss(head, f, *dense[kind])
                loss = loss + schedule.dense_weight * dl
                stats[f"{kind}_card_digit_acc"] = round(acc, 3)
            if lm_weight > 0:
                # the digit a card token carries must survive into the language model, not only the tower
                h = out.hidden_states[schedule.lm_dense_layer][batch["input_ids"] == token_ids[kind]]
                hl, hacc = dense_loss(lm_head, h, *dense[kind])
                loss = loss + lm_weight * hl
                stats[f"{kind}_lm_card_digit_acc"] = round(hacc, 3)
        opt.zero_grad()
        loss.backward()
        stats["grad_norm"] = round(float(torch.nn.utils.clip_grad_norm_(params, schedule.clip)), 3)
        opt.step()
        return stats

    def crop_step(step, frac):
        return sft_step(step, frac, crop=True)

    _loop("crop", schedule.crop_steps, schedule.time_limit_minutes, crop_step, log)
    _loop("sft", schedule.sft_steps, schedule.time_limit_minutes, sft_step, log)
    capture.close()
    model.eval()
    return model


def crop_example(example: Example, rng: np.random.Generator, cells: int = 3, tp: int = 2) -> Example:
    """Curriculum view of a card video: only the chunks holding cards, each cropped to `cells` x `cells`
    tokens around its card (aligned to the token grid), so a sequence is ~10x shorter and the question
    still has to pick one card out of several.
    """
    if example.is_image or example.task not in CROPPABLE_TASKS:
        return example
    grid = example.frames.shape[1] // CELL
    keep = sorted({f // tp for c in example.cards for f in c.frames})
    frames, cards = [], []
    for new_k, k in enumerate(keep):
        chunk_cards = [c for c in example.cards if k * tp in c.frames]
        anchor = chunk_cards[0]
        r0 = int(np.clip(anchor.row - rng.integers(0, cells), 0, grid - cells))
        c0 = int(np.clip(anchor.col - rng.integers(0, cells), 0, grid - cells))
        frames.append(
            example.frames[
                k * tp : (k + 1) * tp, r0 * CELL : (r0 + cells) * CELL, c0 * CELL : (c0 + cells) * CELL
            ]
        )
        for c in chunk_cards:
            if r0 <= c.row < r0 + cells and c0 <= c.col < c0 + cells:
                cards.append(
                    replace(
                        c, row=c.row - r0, col=c.col - c0, frames=tuple(range(new_k * tp, new_k * tp + tp))
                    )
                )
    # keep the questions the crop still answers: none about a card it cut away (a question about a colour the
    # video never shows, answered "no", stays true)
    lost = {c.colour for c in example.cards} - {c.colour for c in cards}
    turns = [(q, a) for q, a in example.turns if not any(col in q for col in lost)] or example.turns[:1]
    return Example(
        np.concatenate(frames),
        cards,
        turns,
        example.fps,
        [f for c in cards for f in c.frames],
        task=example.task,
    )


def _identity(x):
    return x


class _SplitStream(torch.utils.data.IterableDataset):
    """Endless shuffled examples of a split, decoded in a DataLoader worker (the second core)."""

    def __init__(self, groups: dict[str, list[dict]], root, num_frames: int, seed: int, crop_prob: float):
        self.groups, self.root, self.num_frames = groups, root, num_frames
        self.seed, self.crop_prob = seed, crop_prob

    def _load(self, key: str, rng: np.random.Generator) -> Example:
        from pathlib import Path

        from PIL import Image

        from resadapt.data.embedded import cards_from_json
        from resadapt.data.video import read_video

        rs = self.groups[key]
        cards = cards_from_json(rs[0]["cards"])
        order = rng.permutation(len(rs))
        turns = [(rs[i]["question"], rs[i]["answer"]) for i in order]
        evidence = sorted({f for r in rs for f in r["evidence_frames"]})
        path = Path(self.root) / key
        task = rs[0]["task"]
        if rs[0]["media_type"] == "image":
            image = np.asarray(Image.open(path).convert("RGB"))
            return Example(image, cards, turns, 0.0, [0], is_image=True, task=task)
        frames, meta = read_video(path, self.num_frames)
        # re-index cards and evidence onto the sampled frames
        pos = {src: i for i, src in enumerate(meta.frame_indices)}
        cards = [
            replace(c, frames=tuple(pos[f] for f in c.frames if f in pos))
            for c in cards
            if any(f in pos for f in c.frames)
        ]
        ev = [pos[f] for f in evidence if f in pos]
        times = [i / meta.fps for i in meta.frame_indices]
        return Example(frames, cards, turns, meta.fps, ev, task=task, frame_times=times)

    def _keys(self, rng: np.random.Generator):
        """Endless sequence of videos to show.

        Curriculum phases (crop_prob 1): only tasks the crop view keeps valid, in proportion. Full videos:
        every task equally often, so rarer answer formats (grounding spans) get enough examples.
        """
        keys = sorted(self.groups)
        if self.crop_prob >= 1.0:
            keys = [k for k in keys if self.groups[k][0]["task"] in CROPPABLE_TASKS]
            while True:
                for i in rng.permutation(len(keys)):
                    yield keys[i]
        by_task: dict[str, list[str]] = {}
        for k in keys:
            by_task.setdefault(self.groups[k][0]["task"], []).append(k)
        tasks = sorted(by_task)
        while True:
            pool = by_task[tasks[rng.integers(len(tasks))]]
            yield pool[rng.integers(len(pool))]

    def __iter__(self):
        # each DataLoader worker runs its own copy of this iterator: give each its own stream, or every
        # example would arrive once per worker
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        for key in self._keys(rng):
            ex = self._load(key, rng)
            if (
                self.crop_prob > 0
                and rng.random() < self.crop_prob
                and all(len(c.frames) >= 2 for c in ex.cards)
            ):
                ex = crop_example(ex, rng)
            yield ex


def split_examples(rows: list[dict], root, num_frames: int, workers: int = 2):
    """A callable `examples(rng, crop_prob)` for `train_backbone` that reads a benchmark split from disk.

    Questions about the same video become the turns of one conversation. Videos are decoded from their
    MP4 files (sampled to `num_frames`), so training sees exactly what the pipeline's readers produce;
    decoding runs in `workers` DataLoader processes while the main process trains (0: in process).
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["media_path"], []).append(r)
    if not groups:
        raise ValueError("no training rows")

    def examples(rng: np.random.Generator, crop_prob: float = 0.0):
        stream = _SplitStream(groups, root, num_frames, int(rng.integers(2**31)), crop_prob)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=16 if workers else None,
        )
        return iter(loader)

    return examples
