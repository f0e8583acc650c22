"""The backbone: offline tokenizer/processors, tiny checkpoints of each Qwen-VL generation, per-chunk prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_BACKBONE as SMALL

from resadapt.backbone import (
    TinyBackboneSpec,
    TransformersBackend,
    VisualInput,
    build_inputs,
    build_tiny_backbone,
    load_backbone,
    save_backbone,
)
from resadapt.data.embedded import COLOURS
from resadapt.processing import QWEN_SPECIAL_TOKENS, build_tokenizer, load_processor


def _chunks(rng, sizes):
    return [rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_backbone(TinyBackboneSpec(**SMALL))


def test_tokenizer_is_deterministic_and_has_qwen_specials():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert [a.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(len(QWEN_SPECIAL_TOKENS)))
    for d in range(10):
        assert a.tokenize(str(d)) == [str(d)]
    for colour in COLOURS:  # the dense head scores visual tokens against these single word tokens
        assert a.tokenize(" " + colour) == ["Ġ" + colour]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_tiny_checkpoint_roundtrip_each_architecture(arch, tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_backbone(TinyBackboneSpec(architecture=arch, **SMALL))
    rng = np.random.default_rng(0)
    side = 64 if arch == "qwen3_vl" else 56
    visual = VisualInput(chunks=_chunks(rng, [(side * 2, side * 2), (side, side)]), chunk_times=[0.0, 1.0])
    batch = build_inputs(processor, [visual], ["What digit is on the red card?"], answers=["7"])
    with torch.no_grad():
        before = model(**batch).logits
    save_backbone(model, processor, tmp_path / arch)
    assert (tmp_path / arch / "model.safetensors").exists()
    model2, processor2 = load_backbone(tmp_path / arch)
    batch2 = build_inputs(processor2, [visual], ["What digit is on the red card?"], answers=["7"])
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(batch["pixel_values_videos"], batch2["pixel_values_videos"])
    with torch.no_grad():
        after = model2(**batch2).logits
    torch.testing.assert_close(before, after)


def test_load_backbone_rejects_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        load_backbone(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path / "missing")


def test_video_processor_matches_image_processor_layout(tiny):
    """A chunk of two identical frames must give the image processor's patches for that frame."""
    _, processor = tiny
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    video = processor.video_processor([np.stack([frame, frame])])
    image = processor.image_processor(images=[frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    torch.testing.assert_close(video["pixel_values_videos"], image["pixel_values"].float(), atol=1e-4, rtol=0)


def test_processor_save_load_roundtrip(tiny, tmp_path):
    from resadapt.processing import save_processor

    _, processor = tiny
    save_processor(processor, tmp_path)
    loaded = load_processor(tmp_path)
    assert type(loaded) is type(processor)
    assert loaded.video_processor.to_dict() == processor.video_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def _vision_blocks(ids: list[int], start_id: int, end_id: int):
    blocks, i = [], 0
    while i < len(ids):
        if ids[i] == start_id:
            j = ids.index(end_id, i)
            blocks.append((i, j))
            i = j
        i += 1
    return blocks


def _positions(model, batch):
    keys = ("mm_token_type_ids", "video_grid_thw", "second_per_grid_ts", "attention_mask")
    return model.model.get_rope_index(batch["input_ids"], **{k: batch[k] for k in keys})[0]


def test_each_chunk_gets_its_own_3d_positions(tiny):
    """Design decision 1: every chunk is a video item whose tokens get the (t, h, w) grid positions."""
    model, processor = tiny
    rng = np.random.default_rng(2)
    sizes = [(112, 112), (56, 84), (28, 28), (84, 56)]
    visual = VisualInput(chunks=_chunks(rng, sizes), chunk_times=[0.0, 1.0, 2.0, 3.0])
    other = VisualInput(chunks=_chunks(rng, [(28, 28)]), chunk_times=[0.0])
    batch = build_inputs(
        processor, [visual, other], ["q?", "a much longer question so the first row is padded?"]
    )
    pos = _positions(model, batch)
    tok = processor.tokenizer
    mask = batch["attention_mask"][0].bool()
    ids = batch["input_ids"][0][mask].tolist()
    p = pos[:, 0][:, mask]
    blocks = _vision_blocks(
        ids, tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    )
    assert len(blocks) == len(sizes)
    for (s, e), (h, w) in zip(blocks, sizes, strict=True):
        gh, gw = h // 28, w // 28
        assert e - s - 1 == gh * gw, "one token per 28x28 cell"
        start = int(p[0, s]) + 1  # the position after <|vision_start|>
        rows = np.repeat(np.arange(gh), gw)
        cols = np.tile(np.arange(gw), gh)
        assert p[0, s + 1 : e].tolist() == [start] * (gh * gw), "one temporal position per chunk"
        assert p[1, s + 1 : e].tolist() == (start + rows).tolist()
        assert p[2, s + 1 : e].tolist() == (start + cols).tolist()
        assert int(p[0, e]) == start + max(gh, gw), "text resumes after the chunk's largest side"
    # the padded row's positions do not depend on the padding
    single = build_inputs(processor, [visual], ["q?"])
    pos1 = _positions(model, single)
    assert torch.equal(pos1[:, 0], p)


def test_answer_labels_cover_only_the_answer(tiny):
    _, processor = tiny
    rng = np.random.default_rng(3)
    visual = VisualInput(chunks=_chunks(rng, [(56, 56)]), chunk_times=[0.0])
    batch = build_inputs(processor, [visual, visual], ["q?", "longer question?"], answers=["7", "red 3"])
    tok = processor.tokenizer
    for row, answer in zip(range(2), ["7", "red 3"], strict=True):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tok.decode(labelled) == answer + "<|im_end|>"


def test_transformers_backend_batches_and_counts_visual_tokens(tiny):
    model, processor = tiny
    rng = np.random.default_rng(4)
    visuals = [
        VisualInput(chunks=_chunks(rng, [(56, 56), (28, 28)]), chunk_times=[0.0, 1.0]),
        VisualInput(image=rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)),
        VisualInput(chunks=_chunks(rng, [(112, 56)]), chunk_times=[0.0]),
    ]
    backend = TransformersBackend(model, processor, max_new_tokens=3, batch_size=2)
    gens = backend.generate(visuals, ["a?", "b?", "c?"])
    assert [g.visual_tokens for g in gens] == [4 + 1, 9, 8]
    # batching must not change greedy outputs
    alone = [
        TransformersBackend(model, processor, max_new_tokens=3, batch_size=1).generate([v], [q])[0].text
        for v, q in zip(visuals, ["a?", "b?", "c?"], strict=True)
    ]
    assert [g.text for g in gens] == alone
