"""The tiny backbone's training recipe and the calibration conditions (no quality claims: those are metrics)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import SMALL_BACKBONE as SMALL
from pydantic import ValidationError

from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone
from resadapt.budget import VisionGeometry, realise, resize_video
from resadapt.calibration import Condition
from resadapt.config import BackboneParams, SFTParams
from resadapt.data.embedded import (
    CELL,
    COLOURS,
    NO_DIGIT,
    BenchmarkSpec,
    Card,
    background,
    detail_question,
    draw_card,
    draw_card_video,
    render,
    which_question,
)
from resadapt.data.sample import LoadedSample
from resadapt.sft import (
    Example,
    assistant_labels,
    chunk_scales_for,
    chunk_token_labels,
    conversation_inputs,
    crop_example,
    train_backbone,
    window_chunk,
)

SPEC = BenchmarkSpec(frame_size=112, num_frames=8)


def _example(rng) -> Example:
    cards, frames = draw_card_video(rng, SPEC, SPEC.num_frames, 2)
    target = cards[0]
    return Example(
        frames, cards, [(detail_question(target.colour), target.glyph)], SPEC.fps, list(target.frames)
    )


def test_chunk_token_labels_follow_the_card_when_downscaled():
    card = Card("red", "7", row=2, col=1, frames=(0, 1))
    d, c = chunk_token_labels([card], 0, (112, 112), 112)  # full resolution: 4x4 tokens
    assert d.reshape(4, 4)[2, 1] == 7 and (d != NO_DIGIT).sum() == 1
    assert c.reshape(4, 4)[2, 1] == 0 and (c != 6).sum() == 1
    d, c = chunk_token_labels([card], 0, (56, 56), 112)  # 2x2 tokens: the card is a quarter token
    assert (d == NO_DIGIT).all(), "a card shrunk below half a token is no longer readable"
    assert c.reshape(2, 2)[1, 0] == 0, "but its colour still marks the token"


def test_chunk_token_labels_go_to_the_token_that_holds_the_glyph():
    """At 0.75 a 224-px frame has 6 tokens a side for 8 card cells: cell 2 (px 56-84, centre 70) is drawn at
    px 42-63 after the resize, mostly in token 1 (px 28-56 holds its centre 52.5), which the footprint rule
    (cells 2-3 -> token 2) missed."""
    card = Card("red", "7", row=2, col=6, frames=(0, 1), size=4)
    d, c = chunk_token_labels([card], 0, (168, 168), 224)
    assert d.reshape(6, 6)[1, 4] == 7 and (d != NO_DIGIT).sum() == 1  # col 6: centre 182 -> 136.5 px, token 4
    assert c.reshape(6, 6)[1, 4] == 0 and (c != len(COLOURS)).sum() == 1
    frames = np.full((2, 224, 224, 3), 128, dtype=np.uint8)
    draw_card(frames[0], card)
    geom = VisionGeometry(min_pixels=28 * 28, max_pixels=224 * 224)
    small = resize_video(frames, np.full(2, 0.75), geom).chunks[0][0]
    ink = np.argwhere(small.max(-1) < 80)  # the glyph's black strokes
    assert len(ink) > 20
    in_token = (ink // CELL == [1, 4]).all(1).mean()
    assert in_token > 0.7, f"the labelled token holds {in_token:.0%} of the glyph"


def test_chunk_token_labels_are_graded_by_glyph_size():
    small = Card("red", "7", row=0, col=0, frames=(0, 1), size=2)
    large = Card("blue", "3", row=3, col=3, frames=(0, 1), size=4)
    d, _ = chunk_token_labels([small, large], 0, (56, 56), 112)  # half resolution
    assert d.reshape(2, 2)[1, 1] == 3, "a size-4 glyph keeps 2-px strokes at half resolution"
    assert d.reshape(2, 2)[0, 0] == NO_DIGIT, "a size-2 glyph does not"
    d, _ = chunk_token_labels([small, large], 0, (84, 84), 112)  # 0.75: sizes 3 and 4 readable
    assert sorted(d[d != NO_DIGIT].tolist()) == [3]


def test_window_chunk_crops_pixels_and_labels_together_around_a_card():
    card = Card("blue", "4", row=5, col=2, frames=(0, 1), size=4)
    frames = np.full((2, 224, 224, 3), 128, dtype=np.uint8)
    draw_card(frames[0], card)
    draw_card(frames[1], card)
    geom = VisionGeometry(min_pixels=28 * 28, max_pixels=224 * 224)
    chunk = resize_video(frames, np.full(2, 0.75), geom).chunks[0]
    d, c = chunk_token_labels([card], 0, chunk.shape[1:3], 224)
    for seed in range(20):
        crop, cd, cc = window_chunk(chunk, d, c, 2, np.random.default_rng(seed))
        assert crop.shape == (2, 56, 56, 3) and cd.tolist().count(4) == 1 and len(cc) == 4
        k = cd.tolist().index(4)
        token = crop[0, k // 2 * CELL : (k // 2 + 1) * CELL, k % 2 * CELL : (k % 2 + 1) * CELL]
        assert (token.max(-1) < 80).sum() > 20, "the labelled token of the crop holds the glyph"
    crop, cd, _ = window_chunk(chunk, d, c, 9, np.random.default_rng(0))
    assert crop.shape == chunk.shape and (cd == d).all(), "a window larger than the chunk keeps all of it"


def test_chunk_scales_put_evidence_at_full_or_show_the_video_at_one_scale():
    frames = np.zeros((8, 112, 112, 3), dtype=np.uint8)
    card = Card("red", "7", row=1, col=1, frames=(2, 3), size=4)
    ex = Example(frames, [card], [("q", "7")], 2.0, [2, 3])
    full = chunk_scales_for(ex, np.random.default_rng(1), 0.125, p_full=1.0, p_uniform=0.0)
    assert full[1] == 1.0 and len(full) == 4
    rng = np.random.default_rng(0)
    others = [chunk_scales_for(ex, rng, 0.125, p_full=1.0, p_uniform=0.0)[0] for _ in range(200)]
    assert min(others) < 0.2 and 0.15 < np.mean(np.array(others) == 1.0) < 0.45, (
        "the rest anywhere, 30% at full"
    )
    same = chunk_scales_for(ex, np.random.default_rng(2), 0.125, p_full=1.0, p_uniform=1.0)
    assert len(set(same)) == 1, "a uniform draw shows the whole video at one scale"


def test_readable_share_draws_downscaled_evidence_where_its_glyph_reads_and_zero_changes_nothing():
    frames = np.zeros((8, 112, 112, 3), dtype=np.uint8)
    card = Card("red", "7", row=1, col=1, frames=(2, 3), size=4)  # readable down to scale 0.5
    ex = Example(frames, [card], [("q", "7")], 2.0, [2, 3])
    rng = np.random.default_rng(0)
    drawn = [chunk_scales_for(ex, rng, 0.125, 0.0, 1.0, readable_share=1.0)[1] for _ in range(200)]
    assert min(drawn) >= 0.5 and max(drawn) <= 1.0
    rng = np.random.default_rng(0)
    drawn = [chunk_scales_for(ex, rng, 0.125, 0.0, 0.0, readable_share=0.5)[1] for _ in range(400)]
    assert 0.1 < np.mean(np.array(drawn) < 0.5) < 0.4, "the other half anywhere in [s_min, 1]"
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(50):
        assert chunk_scales_for(ex, a, 0.125, 0.5, 0.3, readable_share=0.0) == chunk_scales_for(
            ex, b, 0.125, 0.5, 0.3
        )
    assert a.random() == b.random(), "share 0 takes no extra draw from the stream"


def test_lm_dense_loss_trains_a_head_on_the_language_models_visual_tokens():
    model, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL))

    def examples(rng, crop_prob):
        while True:
            yield _example(rng)

    log = []
    schedule = SFTParams(
        dense_steps=0, crop_steps=1, sft_steps=2, crop_batch=2, sft_batch=2, lm_dense_weight=0.5
    )
    train_backbone(model, processor, examples, schedule, 0.125, 0, log.append)
    assert all("video_lm_card_digit_acc" in r for r in log if r["stage"] == "sft")
    assert not any("video_lm_card_digit_acc" in r for r in log if r["stage"] == "crop")
    with pytest.raises(ValidationError, match="lm_dense_layer"):
        BackboneParams(sft={"lm_dense_layer": 5}, tiny={"num_hidden_layers": 4})


def test_crop_example_keeps_cards_and_questions_consistent():
    rng = np.random.default_rng(0)
    ex = _example(rng)
    crop = crop_example(ex, rng, cells=2)
    assert crop.frames.shape[1:3] == (2 * CELL, 2 * CELL)
    assert len(crop.frames) == 2 * len({f // 2 for c in ex.cards for f in c.frames})
    for card in crop.cards:
        y, x = card.row * CELL, card.col * CELL
        # the card border colour sits at the card's cell in its frames of the cropped video
        for f in card.frames:
            assert tuple(crop.frames[f, y, x]) == COLOURS[card.colour]
    assert crop.turns == ex.turns  # the asked card is always in the crop


def test_crop_example_drops_only_questions_about_cards_it_cut_away():
    rng = np.random.default_rng(0)
    red = Card("red", "7", row=0, col=0, frames=(0, 1))
    blue = Card("blue", "A", row=3, col=3, frames=(0, 1))  # same chunk as red, out of a 1-cell crop around it
    green = Card("green", "E", row=1, col=1, frames=(2, 3))
    cards = [red, blue, green]
    turns = [
        (detail_question("red"), "7"),
        (which_question("purple", "red"), "red"),  # purple is never shown: still true in any crop
        (which_question("blue", "yellow"), "blue"),  # blue is cut away with its cell
        (which_question("orange", "green"), "green"),
    ]
    frames = render(cards, background(rng, SPEC.frame_size, SPEC.num_frames))
    crop = crop_example(Example(frames, cards, turns, SPEC.fps, [0, 1]), rng, cells=1)
    assert {c.colour for c in crop.cards} == {"red", "green"}
    assert crop.turns == [turns[0], turns[1], turns[3]]


def test_assistant_labels_mark_every_answer_turn():
    _, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL))
    rng = np.random.default_rng(1)
    ex = _example(rng)
    ex.turns = [("first?", "3"), ("second?", "red 4")]
    batch, dense = conversation_inputs(processor, [ex], [[1.0] * 4])
    tok = processor.tokenizer
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tok.decode(labelled) == "3<|im_end|>red 4<|im_end|>"
    assert dense["video"][0].shape[0] == int(batch["video_grid_thw"].prod(-1).sum()) // 4
    ids = torch.tensor([[5, 6, 7]])
    assert (assistant_labels(ids, tok) == -100).all()


def _train_twice_the_same():
    def examples(rng, crop_prob):
        while True:
            ex = _example(rng)
            yield crop_example(ex, rng) if rng.random() < crop_prob else ex

    weights = []
    for _ in range(2):
        model, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL))
        schedule = SFTParams(
            dense_steps=2, crop_steps=1, sft_steps=2, dense_batch=2, crop_batch=2, sft_batch=2
        )
        time.sleep(0.3)  # a different wall clock: the schedule must not depend on it
        train_backbone(model, processor, examples, schedule, 0.125, 7)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    return weights


def test_train_backbone_is_bit_identical_for_the_same_params_and_seed():
    a, b = _train_twice_the_same()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_backbone_runs_every_phase_and_changes_weights():
    model, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def examples(rng, crop_prob):
        while True:
            ex = _example(rng)
            yield crop_example(ex, rng) if rng.random() < crop_prob else ex

    log = []
    train_backbone(
        model,
        processor,
        examples,
        SFTParams(dense_steps=2, crop_steps=2, sft_steps=2, dense_batch=2, crop_batch=2, sft_batch=2),
        0.125,
        0,
        log.append,
    )
    assert [r["stage"] for r in log] == ["dense"] * 2 + ["crop"] * 2 + ["sft"] * 2
    assert all(np.isfinite(r.get("loss", r.get("lm_loss"))) for r in log)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.visual") for n in changed)
    assert any("language_model" in n for n in changed)
    assert not model.training


def _sample(evidence: list[bool]) -> LoadedSample:
    frames = np.zeros((len(evidence), 56, 56, 3), dtype=np.uint8)
    return LoadedSample(
        {"id": "s", "media_type": "video"}, frames, list(range(len(evidence))), 2.0, np.array(evidence)
    )


def test_oracle_and_anti_oracle_are_complementary_per_chunk():
    s = _sample([False, False, False, True, False, False])  # evidence in chunk 1 (frames 2-3)
    assert s.chunk_evidence(2).tolist() == [False, True, False]
    oracle = Condition("oracle").scales(s, 0.25, 2)
    anti = Condition("anti_oracle").scales(s, 0.25, 2)
    assert oracle.tolist() == [0.25, 0.25, 1, 1, 0.25, 0.25]
    assert anti.tolist() == [1, 1, 0.25, 0.25, 1, 1]
    uniform = Condition("uniform", 0.5)
    assert uniform.scales(s, 0.25, 2).tolist() == [0.5] * 6
    assert uniform.name == "uniform_0.5"
    with pytest.raises(ValueError, match="unknown calibration condition kind 'magic'"):
        Condition("magic")
    with pytest.raises(ValueError, match="a scale is given exactly for 'uniform'"):
        Condition("uniform")
    with pytest.raises(ValueError, match="a scale is given exactly for 'uniform'"):
        Condition("oracle", 0.5)


def test_realised_conditions_measure_retention_from_tokens():
    geom = VisionGeometry(
        min_pixels=28 * 28, max_pixels=224 * 224, image_min_pixels=28 * 28, image_max_pixels=224 * 224
    )
    s = _sample([True, True, False, False])
    r = realise(s, Condition("oracle").scales(s, 0.5, 2), geom)
    visual, tokens, ref = r.visual, r.tokens, r.reference_tokens
    assert ref == 2 * 4  # two chunks of 2x2 tokens at 56 px
    assert tokens == 4 + 1  # evidence chunk full, the other at 28 px
    assert [c.shape[1] for c in visual.chunks] == [56, 28]
    assert visual.chunk_times == [0.0, 1.0]


def test_split_stream_balances_tasks_and_restricts_crop_phases():
    from itertools import islice

    from resadapt.sft import _SplitStream

    groups = {f"d{i}": [{"task": "detail_qa"}] for i in range(80)}
    groups |= {f"g{i}": [{"task": "grounding"}] for i in range(5)}
    groups |= {f"m{i}": [{"task": "multi_frame"}] for i in range(15)}
    full = list(islice(_SplitStream(groups, ".", 8, 0, 0.0)._keys(np.random.default_rng(0)), 3000))
    share = {t: sum(k[0] == t for k in full) / len(full) for t in "dgm"}
    assert all(abs(v - 1 / 3) < 0.05 for v in share.values()), share
    crop = list(islice(_SplitStream(groups, ".", 8, 0, 1.0)._keys(np.random.default_rng(0)), 950))
    assert not any(k.startswith("g") for k in crop)  # grounding answers depend on time: never cropped
    assert sum(k.startswith("d") for k in crop) == 800  # proportional: each epoch shows every video once


def test_split_examples_workers_do_not_repeat_each_other(tmp_path):
    from itertools import islice

    from resadapt.data.embedded import write_benchmark
    from resadapt.sft import split_examples

    spec = BenchmarkSpec(frame_size=56, num_frames=4, long_num_frames=8, cards_per_video=2)
    sizes = {
        s: dict(card_videos=6, compare_videos=1, grounding_videos=1, images=1, long_videos=1)
        for s in ("train", "val", "test")
    }
    ds = write_benchmark(tmp_path, spec, sizes, progress=False, workers=1)
    stream = split_examples(list(ds["train"]), tmp_path, 4, workers=2)(np.random.default_rng(0), 0.0)
    keys = [ex.turns[0][0] + str(ex.frames.sum()) for ex in islice(stream, 20)]
    # the DataLoader alternates between its two workers: identical neighbours throughout would mean
    # both workers replay one stream (each example trained on twice)
    assert not all(a == b for a, b in zip(keys[::2], keys[1::2], strict=True)), (
        "two workers sent the same videos"
    )


def test_chance_is_the_majority_answer_of_the_samples():
    from resadapt.calibration import chance_levels

    def sample(task, answer, options=()):
        row = {"id": answer, "task": task, "answer": answer, "media_type": "image", "options": list(options)}
        return LoadedSample(row, np.zeros((28, 28, 3), np.uint8), [0], 0.0, np.array([True]))

    samples = [sample("multi_frame", a) for a in ("9", "9", "7", "5")]
    samples += [sample("detail_qa", a) for a in "0123456789"] + [sample("grounding", "1.0-2.0")]
    # two options, the answer first in 3 of 4: always picking the first option beats any fixed answer
    coarse = [("red", "blue"), ("red", "yellow"), ("blue", "green"), ("pink", "green")]
    samples += [
        sample("coarse_qa", a, opts) for a, opts in zip(["red", "red", "blue", "green"], coarse, strict=True)
    ]
    chance = chance_levels(samples)
    assert chance["multi_frame"] == 0.5 and chance["detail_qa"] == 0.1 and np.isnan(chance["grounding"])
    assert chance["coarse_qa"] == 0.75
