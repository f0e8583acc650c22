"""ToMe / VisionZip post-encoder pruning: the reductions, the VisionZip score, and the pruned backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SMALL_BACKBONE

from resadapt.backbone import (
    TinyBackboneSpec,
    TransformersBackend,
    VisualInput,
    build_inputs,
    build_tiny_backbone,
)
from resadapt.baselines.token_pruning import (
    PrunedBackend,
    _attention_weights,
    _capture_received_attention,
    pooled_scores,
    tome_reduce,
    visionzip_reduce,
)

MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny():
    """The small backbone with larger random weights, so greedy outputs vary with the visual input."""
    torch.manual_seed(0)
    model, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL_BACKBONE))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2, generator=gen)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)

    def chunks(sizes):
        return [rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8) for h, w in sizes]

    visuals = [
        VisualInput(chunks=chunks([(112, 112), (56, 84)]), chunk_times=[0.0, 1.0]),
        VisualInput(image=rng.integers(0, 256, (224, 168, 3), dtype=np.uint8)),  # several vision windows
        VisualInput(chunks=chunks([(56, 56)]), chunk_times=[0.0]),
    ]
    return visuals, ["what is it?", "which colour is the card on the left?", "c?"]


def _item_sizes(batch) -> list[list[int]]:
    """Visual tokens per item, per row, in prompt order."""
    sizes = []
    for row_types, row_mask in zip(batch["mm_token_type_ids"], batch["attention_mask"].bool(), strict=True):
        types = row_types[row_mask].tolist()
        runs, prev = [], 0
        for t in types:
            if t and t == prev:
                runs[-1] += 1
            elif t:
                runs.append(1)
            prev = t
        sizes.append(runs)
    return sizes


# ---------------------------------------------------------------------------------------------------------
# Reductions.


def test_tome_merges_by_size_weighted_mean():
    e = torch.eye(3)
    # round 1 (A = 0, 2, 4; B = 1, 3): 0 -> 1 and 2 -> 3 (cosine 1); round 2 (A = 1, 4; B = 3): 4 -> 3
    x = torch.stack([e[0], e[0], e[1], e[1], e[1] + e[2]])
    out, idx = tome_reduce(x, 2)
    assert idx.tolist() == [1, 3]
    torch.testing.assert_close(out[0], e[0])
    # token 3 has size 2 when token 4 (size 1) merges into it: (2 * e1 + (e1 + e2)) / 3
    torch.testing.assert_close(out[1], (3 * e[1] + e[2]) / 3)


def test_tome_identity_and_order():
    x = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    out, idx = tome_reduce(x, 37)
    assert torch.equal(out, x) and idx.tolist() == list(range(37))
    for keep in (1, 5, 18, 19, 36):
        out, idx = tome_reduce(x, keep)
        assert out.shape == (keep, 8)
        assert idx.tolist() == sorted(set(idx.tolist())), "positions sorted and unique"
    with pytest.raises(ValueError, match="keep"):
        tome_reduce(x, 0)


def test_visionzip_keeps_top_scores_and_merges_the_rest():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=gen)
    scores = torch.randperm(20, generator=gen).float()
    out, idx = visionzip_reduce(x, scores, 8)  # round(54 / 64 * 8) = 7 dominant + 1 contextual
    assert out.shape == (8, 6) and idx.tolist() == sorted(set(idx.tolist()))
    top = set(torch.topk(scores, 7).indices.tolist())
    assert top <= set(idx.tolist())
    for j, i in enumerate(idx.tolist()):
        if i in top:
            assert torch.equal(out[j], x[i]), "dominant tokens pass through unchanged"
    rest = [i for i in range(20) if i not in top]
    (ctx,) = [j for j, i in enumerate(idx.tolist()) if i not in top]
    assert idx[ctx] == rest[0], "the single contextual target is the first remaining token"
    torch.testing.assert_close(out[ctx], x[rest].mean(0))
    out, idx = visionzip_reduce(x, scores, 20)
    assert torch.equal(out, x) and idx.tolist() == list(range(20))
    for keep in (1, 3, 13):
        assert visionzip_reduce(x, scores, keep)[0].shape[0] == keep


def test_received_attention_reproduces_the_vision_block(tiny, samples):
    """The recomputed weights give the block's attention output, and pooling follows the merger's order."""
    model, processor = tiny
    visual = model.model.visual
    batch = build_inputs(processor, [samples[0][1]], ["q?"])
    grid = batch["image_grid_thw"]
    got = {}

    def attn_hook(module, args, kwargs, output):
        w = _attention_weights(module, args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"])
        n = args[0].shape[0]
        v = module.qkv(args[0]).reshape(n, 3, module.num_heads, -1)[:, 2].transpose(0, 1)
        bounds = kwargs["cu_seqlens"].tolist()
        heads = [wi @ v[:, s:e] for wi, s, e in zip(w, bounds[:-1], bounds[1:], strict=True)]
        got["recomputed"] = module.proj(torch.cat(heads, dim=1).transpose(0, 1).reshape(n, -1))
        got["actual"] = output

    def merger_hook(module, args, output):
        got["merged_window_order"] = output

    handles = [
        visual.blocks[-1].attn.register_forward_hook(attn_hook, with_kwargs=True),
        visual.merger.register_forward_hook(merger_hook),
    ]
    try:
        with torch.no_grad(), _capture_received_attention(visual) as store:
            feats = model.model.get_image_features(batch["pixel_values"], grid).pooler_output[0]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got["recomputed"], got["actual"], atol=1e-5, rtol=1e-4)
    # recover the tower's window permutation by matching merged features, and check the pooled order
    window = got["merged_window_order"]
    perm = torch.cdist(feats, window).argmin(dim=1)
    assert not torch.equal(perm, torch.arange(len(perm))), "the test image must span several windows"
    expected = store[-1].view(-1, visual.spatial_merge_size**2).sum(-1)[perm]
    torch.testing.assert_close(pooled_scores(visual, store[-1], grid), expected)


# ---------------------------------------------------------------------------------------------------------
# The backend.


def _reference_ids(model, processor, batch) -> list[list[int]]:
    seq = model.generate(
        **batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
    )
    eos = model.generation_config.eos_token_id
    stop = {eos} if isinstance(eos, int) else set(eos)
    rows = seq[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


@pytest.mark.parametrize("method", ["tome", "visionzip", "random"])
def test_keep_all_matches_transformers_generate(tiny, samples, method):
    model, processor = tiny
    visuals, questions = samples
    batch = build_inputs(processor, visuals, questions)
    backend = PrunedBackend(model, processor, method, 1.0, max_new_tokens=MAX_NEW, batch_size=3)
    with torch.no_grad():
        pruned = backend.prepare(batch)
        full = model(**batch).logits
        mine = model(
            inputs_embeds=pruned.inputs_embeds,
            attention_mask=pruned.attention_mask,
            position_ids=pruned.position_ids,
        ).logits
        assert torch.equal(pruned.input_ids, batch["input_ids"])
        torch.testing.assert_close(mine, full, atol=1e-4, rtol=0)
        ref = _reference_ids(model, processor, batch)
        assert backend.decode(pruned) == ref
        assert all(len(r) == MAX_NEW for r in ref)
        # a second stop token that row 0 emits at step 2: that row stops early, the others go on
        config = model.generation_config
        saved = config.eos_token_id
        config.eos_token_id = [saved, ref[0][2]]
        try:
            ref_stop = _reference_ids(model, processor, batch)
            stopping = PrunedBackend(model, processor, method, 1.0, max_new_tokens=MAX_NEW, batch_size=3)
            assert stopping.decode(pruned) == ref_stop
        finally:
            config.eos_token_id = saved
        assert len(ref_stop[0]) == 3 and len(ref_stop[2]) > 3
    gens = backend.generate(visuals, questions)
    ref_gens = TransformersBackend(model, processor, max_new_tokens=MAX_NEW).generate(visuals, questions)
    assert [g.text for g in gens] == [g.text for g in ref_gens]
    assert any(g.text for g in gens), "outputs must be non-trivial for the comparison to mean anything"
    assert [(g.visual_tokens, g.prompt_tokens) for g in gens] == [
        (g.visual_tokens, g.prompt_tokens) for g in ref_gens
    ]


@pytest.mark.parametrize("method", ["tome", "visionzip", "random"])
def test_quarter_keep_feeds_fewer_tokens(tiny, samples, method):
    model, processor = tiny
    visuals, questions = samples
    batch = build_inputs(processor, visuals, questions)
    backend = PrunedBackend(model, processor, method, 0.25, max_new_tokens=2, batch_size=2)
    with torch.no_grad():
        pruned = backend.prepare(batch)
    sizes = _item_sizes(batch)
    assert [len(s) for s in sizes] == [2, 1, 1]
    # VisionZip reduces each item; ToMe (across time too) and random drop pool the sample's items
    expected = [
        sum(max(1, math.floor(0.25 * n)) for n in row)
        if method == "visionzip"
        else math.floor(0.25 * sum(row))
        for row in sizes
    ]
    placeholders = (pruned.input_ids == model.config.video_token_id) | (
        pruned.input_ids == model.config.image_token_id
    )
    assert pruned.visual_tokens == expected == (placeholders & pruned.attention_mask.bool()).sum(1).tolist()
    mask = batch["attention_mask"].bool()
    for b, row in enumerate(sizes):
        assert pruned.prompt_tokens[b] == int(mask[b].sum()) - sum(row) + expected[b]
        assert int(pruned.attention_mask[b].sum()) == pruned.prompt_tokens[b]
        # text tokens keep their ids and positions; kept visual tokens reuse original visual positions
        keep = pruned.attention_mask[b].bool()
        vis = placeholders[b][keep]
        original = batch["input_ids"][b][mask[b]]
        orig_vis = (original == model.config.video_token_id) | (original == model.config.image_token_id)
        assert torch.equal(pruned.input_ids[b][keep][~vis], original[~orig_vis])
        pos = backend.model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=batch["video_grid_thw"],
            second_per_grid_ts=batch["second_per_grid_ts"],
            attention_mask=batch["attention_mask"],
        )[0][:, b][:, mask[b]]
        new_pos = pruned.position_ids[:, b][:, keep]
        assert torch.equal(new_pos[:, ~vis], pos[:, ~orig_vis])
        orig_set = {tuple(p) for p in pos[:, orig_vis].T.tolist()}
        assert {tuple(p) for p in new_pos[:, vis].T.tolist()} <= orig_set
        assert int(pruned.next_position[b]) == int(pos.max()) + 1
        # the visual slots hold visual features, not the placeholder embedding
        slot = model.get_input_embeddings()(torch.tensor(model.config.video_token_id))
        assert not torch.isclose(pruned.inputs_embeds[b][keep][vis], slot).all(-1).any()
    gens = backend.generate(visuals, questions)
    assert [g.visual_tokens for g in gens] == expected
    assert [g.prompt_tokens for g in gens] == pruned.prompt_tokens
    assert all(g.seconds > 0 for g in gens)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan")])
def test_invalid_keep_ratio(tiny, bad):
    model, processor = tiny
    with pytest.raises(ValueError, match="keep_ratio"):
        PrunedBackend(model, processor, "tome", bad)
    with pytest.raises(ValueError, match="method"):
        PrunedBackend(model, processor, "fastv", 0.5)  # type: ignore[arg-type]


def test_random_token_drop_depends_on_the_sample_only(tiny, samples):
    model, processor = tiny
    visuals, questions = samples
    backend = PrunedBackend(model, processor, "random", 0.25)

    def kept(vis, qs, b):
        pruned = backend.prepare(build_inputs(processor, vis, qs))
        keep = pruned.attention_mask[b].bool()
        return pruned.position_ids[:, b][:, keep].tolist()

    with torch.no_grad():
        alone = kept(visuals[:1], questions[:1], 0)
        assert kept(visuals[:2], questions[:2], 0) == alone  # another sample in the batch changes nothing
        assert kept(visuals[::-1], questions[::-1], 2) == alone
