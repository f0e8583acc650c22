"""Tests for resadapt.budget: the operators' token counts are exactly what the processor produces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.video_utils import VideoMetadata

from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone
from resadapt.budget import (
    Plan,
    TransformedVideo,
    VisionGeometry,
    chunk_scales,
    image_tokens,
    realise,
    resize_image,
    resize_video,
    retention,
    retention_of_tokens,
    scaled_size,
    uniform_scale_for_retention,
    video_tokens,
)
from resadapt.data.sample import LoadedSample
from resadapt.processing import smart_resize

# Reference implementation §2.3: video max 768 tokens, min 56x56 pixels.
REF_GEOM = VisionGeometry(min_pixels=56 * 56, max_pixels=602112)
TINY_GEOM = VisionGeometry(
    min_pixels=28 * 28, max_pixels=224 * 224, image_min_pixels=28 * 28, image_max_pixels=224 * 224
)


@pytest.fixture(scope="module")
def processor():
    _, proc = build_tiny_backbone(TinyBackboneSpec())
    return proc


@pytest.fixture(scope="module")
def geom(processor) -> VisionGeometry:
    return VisionGeometry.from_processor(processor)


def _frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def test_from_processor_reads_tiny_limits(geom):
    spec = TinyBackboneSpec()
    assert geom == VisionGeometry(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        image_min_pixels=spec.min_pixels,
        image_max_pixels=spec.max_pixels,
    )
    assert geom.factor == 28


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(28, 400),
    w=st.integers(28, 400),
    scales=st.lists(st.floats(0.1, 2.0), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_resize_video_tokens_match_processor(processor, geom, h, w, scales, seed):
    frames = _frames(len(scales), h, w, seed)
    out = resize_video(frames, scales, geom)
    assert out.frame_indices == list(range(len(scales)))
    assert [len(c) for c in out.chunks] == [len(i) for i in out.chunk_frame_indices]
    assert all(len(c) <= geom.temporal_patch_size for c in out.chunks)
    for chunk, (ch, cw), s in zip(out.chunks, out.chunk_sizes, out.chunk_scales, strict=True):
        assert chunk.shape[1:] == (ch, cw, 3) and chunk.dtype == np.uint8
        assert (ch, cw) == scaled_size(h, w, s, geom)

    enc = processor.video_processor(out.chunks)
    grid = enc["video_grid_thw"].tolist()
    p, m = geom.patch_size, geom.merge_size
    # the processor keeps our sizes (it does not resize again) ...
    assert [(gh * p, gw * p) for _, gh, gw in grid] == out.chunk_sizes
    assert all(gt == 1 for gt, _, _ in grid)
    # ... and gives exactly the tokens we count
    assert [gt * gh * gw // m**2 for gt, gh, gw in grid] == out.tokens_per_chunk
    assert sum(out.tokens_per_chunk) == out.visual_tokens
    assert enc["pixel_values_videos"].shape[0] == out.visual_tokens * m**2


@settings(max_examples=40, deadline=None)
@given(h=st.integers(28, 400), w=st.integers(28, 400), scale=st.floats(0.1, 2.0), seed=st.integers(0, 2**16))
def test_resize_image_tokens_match_processor(processor, geom, h, w, scale, seed):
    img = _frames(1, h, w, seed)[0]
    out, tokens = resize_image(img, scale, geom)
    assert out.shape[:2] == scaled_size(h, w, scale, geom, image=True)
    assert tokens == image_tokens(h, w, geom, scale)
    grid = processor.image_processor(images=[out])["image_grid_thw"].tolist()
    p, m = geom.patch_size, geom.merge_size
    assert grid == [[1, out.shape[0] // p, out.shape[1] // p]]
    assert grid[0][1] * grid[0][2] // m**2 == tokens


def test_video_pad_count_in_prompt_equals_visual_tokens(processor, geom):
    frames = _frames(7, 150, 230, seed=3)
    out = resize_video(frames, [0.3, 0.5, 1.0, 1.0, 1.7, 0.2, 0.6], geom)
    assert len({*out.chunk_sizes}) > 1  # items of different sizes in one prompt
    content = [{"type": "video"} for _ in out.chunks] + [{"type": "text", "text": "what colour is the card?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    metadata = [
        VideoMetadata(total_num_frames=len(c), fps=2.0, frames_indices=list(range(len(c))))
        for c in out.chunks
    ]
    enc = processor(text=[text], videos=out.chunks, video_metadata=metadata, return_tensors="pt")
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((enc["input_ids"] == pad_id).sum()) == out.visual_tokens
    m = geom.merge_size
    assert [int(g.prod()) // m**2 for g in enc["video_grid_thw"]] == out.tokens_per_chunk


def test_extreme_aspect_ratio_is_stable_under_processor(processor, geom):
    # A 28x3000 frame: smart_resize clamps h to 28 and leaves the area above the cap, so the processor
    # would shrink it again; scaled_size returns the fixed point instead.
    h0, w0 = smart_resize(28, 3000, geom.factor, geom.min_pixels, geom.max_pixels)
    assert smart_resize(h0, w0, geom.factor, geom.min_pixels, geom.max_pixels) != (h0, w0)
    out = resize_video(_frames(2, 28, 3000), [1.0, 1.0], geom)
    grid = processor.video_processor(out.chunks)["video_grid_thw"].tolist()
    assert [(gh * geom.patch_size, gw * geom.patch_size) for _, gh, gw in grid] == out.chunk_sizes
    assert out.visual_tokens == video_tokens(2, 28, 3000, geom)


@pytest.mark.parametrize(
    ("scale", "size", "tokens"),
    [
        (0.2, (112, 196), 28),
        (0.5, (280, 504), 180),
        (1.0, (560, 1008), 720),
        (1.5, (560, 1008), 720),
        (2.0, (560, 1008), 720),
    ],
)
def test_reference_worked_examples(scale, size, tokens):
    assert scaled_size(588, 1036, scale, REF_GEOM) == size
    assert video_tokens(1, 588, 1036, REF_GEOM, scale) == tokens
    assert video_tokens(2, 588, 1036, REF_GEOM, scale) == tokens  # two frames fuse into one temporal patch
    assert video_tokens(3, 588, 1036, REF_GEOM, scale) == 2 * tokens


def test_reference_cap_example():
    assert scaled_size(360, 640, 2.0, REF_GEOM) == (560, 1008)


def test_chunk_scales_are_chunk_means():
    assert chunk_scales([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 3.5, 5.0]
    assert chunk_scales(np.array([0.2, 0.4, 0.6]), 3) == pytest.approx([0.4])
    assert chunk_scales([0.5], 2) == [0.5]


def test_resize_video_uses_chunk_mean_and_keeps_unchanged_frames():
    frames = _frames(4, 56, 84)
    out = resize_video(frames, [0.5, 1.5, 1.0, 1.0], TINY_GEOM)
    assert out.chunk_scales == [1.0, 1.0]
    assert out.chunk_sizes == [(56, 84), (56, 84)]
    np.testing.assert_array_equal(np.concatenate(out.chunks), frames)  # no resampling at the same size
    assert retention(out, TINY_GEOM) == 1.0


@settings(max_examples=30, deadline=None)
@given(h=st.integers(28, 1200), w=st.integers(28, 1200), t=st.integers(1, 12))
def test_retention_is_one_at_unit_scale(h, w, t):
    out = resize_video(np.zeros((t, h, w, 3), np.uint8), np.ones(t), REF_GEOM)
    assert retention(out, REF_GEOM) == 1.0
    assert out.visual_tokens == video_tokens(t, h, w, REF_GEOM)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(28, 400), w=st.integers(28, 400), t=st.integers(1, 6))
def test_retention_monotone_in_uniform_scale_between_limits(h, w, t):
    # With min_pixels = factor^2 (never binding) and the cap out of reach (600x600 < 768 tokens), the
    # rounding is monotone in the scale; at either limit it is not (see the two tests below).
    geom = VisionGeometry(min_pixels=28 * 28, max_pixels=602112)
    frames = np.zeros((t, h, w, 3), np.uint8)
    values = [retention(resize_video(frames, np.full(t, s), geom), geom) for s in np.linspace(0.05, 1.5, 25)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def test_retention_can_drop_when_crossing_pixel_cap():
    # Measured, not assumed: past max_pixels smart_resize floors both sides, so a slightly larger scale
    # can give fewer tokens (tiny profile: 64 tokens at s=0.595, 56 at s=0.6 for a 399x391 frame).
    assert scaled_size(399, 391, 0.595, TINY_GEOM) == (224, 224)
    assert scaled_size(399, 391, 0.6, TINY_GEOM) == (224, 196)
    assert video_tokens(1, 399, 391, TINY_GEOM, 0.6) < video_tokens(1, 399, 391, TINY_GEOM, 0.595)


def test_min_pixels_branch_can_jump_a_whole_factor():
    # smart_resize's upscaling branch ceils a float that should be exactly 2.0 (38 * sqrt(3136 / 38**2) / 28),
    # so a 38x38 frame becomes 84x84 while 28x28 and 56x56 become 56x56: retention above 1 at s > 1.
    assert scaled_size(28, 28, 1.0, REF_GEOM) == (56, 56)
    assert scaled_size(28, 28, 38 / 28, REF_GEOM) == (84, 84)
    assert scaled_size(28, 28, 2.0, REF_GEOM) == (56, 56)
    out = resize_video(np.zeros((2, 28, 28, 3), np.uint8), [38 / 28] * 2, REF_GEOM)
    assert retention(out, REF_GEOM) == 9 / 4


def test_realise_measures_dropped_frames_against_the_whole_input():
    frames = _frames(8, 56, 84)
    row = {"id": "v", "media_type": "video"}
    sample = LoadedSample(row, frames, list(range(8)), 2.0, np.zeros(8, bool))
    out = realise(sample, Plan(scales=np.ones(4), frames=[0, 1, 6, 7]), TINY_GEOM)
    np.testing.assert_array_equal(out.visual.chunks[1], frames[6:8])
    assert out.visual.chunk_times == [0.0, 3.0]
    assert out.retention == 0.5 and out.frame_scales == [1, 1, 0, 0, 0, 0, 1, 1]
    small = realise(sample, Plan(scales=np.full(2, 0.5), frames=[0, 1]), TINY_GEOM)
    assert small.visual.chunks[0].shape[1:3] == (28, 56)
    assert small.retention == pytest.approx(2 / (4 * 6))
    with pytest.raises(ValueError, match="increasing"):
        realise(sample, Plan(scales=np.ones(2), frames=[1, 0]), TINY_GEOM)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(28, 700),
    w=st.integers(28, 700),
    t=st.integers(1, 8),
    target=st.floats(0.02, 1.0),
    tiny=st.booleans(),
)
def test_uniform_scale_for_retention(h, w, t, target, tiny):
    geom = TINY_GEOM if tiny else REF_GEOM
    ref = video_tokens(t, h, w, geom)

    def ret(s: float) -> float:
        return video_tokens(t, h, w, geom, s) / ref

    try:
        s = uniform_scale_for_retention(target, h, w, t, geom)
    except ValueError:
        assert ret(1e-4) > target  # unreachable: even the smallest frame keeps too much
        return
    assert 0 < s <= 1.0
    assert ret(s) <= target
    if s < 1.0:
        assert ret(min(s + 2e-6, 1.0)) > target
        assert all(ret(x) > target for x in np.linspace(s + 2e-6, 1.0, 7) if x <= 1.0)


def test_retention_of_tokens():
    assert retention_of_tokens(180, 720) == 0.25
    with pytest.raises(ValueError, match="reference_tokens"):
        retention_of_tokens(1, 0)
    with pytest.raises(ValueError, match="tokens"):
        retention_of_tokens(-1, 10)


def test_errors_name_the_argument():
    frames = _frames(3, 56, 56)
    with pytest.raises(ValueError, match="frame_scales"):
        resize_video(frames, [1.0, 1.0], TINY_GEOM)
    with pytest.raises(ValueError, match="frame_scales"):
        resize_video(frames, [1.0, 0.0, 1.0], TINY_GEOM)
    with pytest.raises(ValueError, match="frame_scales"):
        resize_video(frames, [1.0, float("nan"), 1.0], TINY_GEOM)
    with pytest.raises(ValueError, match="frames"):
        resize_video(frames.astype(np.float32), [1.0] * 3, TINY_GEOM)
    with pytest.raises(ValueError, match="frames"):
        resize_video(frames[0], [1.0] * 56, TINY_GEOM)
    with pytest.raises(ValueError, match="scale"):
        scaled_size(100, 100, -0.5, TINY_GEOM)
    with pytest.raises(ValueError, match="scale"):
        resize_image(frames[0], 0.0, TINY_GEOM)
    with pytest.raises(ValueError, match="image"):
        resize_image(frames, 1.0, TINY_GEOM)
    with pytest.raises(ValueError, match="target"):
        uniform_scale_for_retention(1e-6, 100, 100, 4, TINY_GEOM)
    with pytest.raises(ValueError, match="target"):
        uniform_scale_for_retention(0.0, 100, 100, 4, TINY_GEOM)
    with pytest.raises(ValueError, match="max_pixels"):
        VisionGeometry(min_pixels=10_000, max_pixels=100)


def test_transformed_video_counts_partial_chunk():
    tv = TransformedVideo(
        chunks=[np.zeros((2, 56, 84, 3), np.uint8), np.zeros((1, 28, 28, 3), np.uint8)],
        chunk_frame_indices=[[0, 1], [2]],
        chunk_sizes=[(56, 84), (28, 28)],
        chunk_scales=[1.0, 0.5],
        original_size=(56, 84),
        geom=TINY_GEOM,
    )
    assert tv.tokens_per_chunk == [6, 1]
    assert tv.visual_tokens == 7
    assert tv.input_frames == 3
    assert retention(tv, TINY_GEOM) == pytest.approx(7 / (math.ceil(3 / 2) * 6))


def test_frames_at_the_pixel_floor_are_not_clipped_to_nothing():
    """160x120 under a 128-token floor has one size at every scale: no saturation point, nothing to clip."""
    from resadapt.budget import clip_to_saturation, hard_budget_scales, token_saturation_scale

    geom = VisionGeometry(min_pixels=128 * 28 * 28)
    assert token_saturation_scale(120, 160, geom, 1.25) == 0.0
    np.testing.assert_array_equal(clip_to_saturation([0.3, 1.2], 120, 160, geom, 1.25), [0.3, 1.2])
    assert np.all(hard_budget_scales([0.3, 1.2, 0.5, 0.5], 120, 160, geom, 1.0, 0.125, 1.25) > 0)
