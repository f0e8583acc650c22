"""The Allocator: frozen coarse encoders, Beta policy, HF save/load, and the hard-budget rescaling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from conftest import SMALL_BACKBONE
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from resadapt.allocator import Allocator, AllocatorConfig, FrameFeatures
from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone
from resadapt.budget import (
    VisionGeometry,
    allocation_retention,
    allocation_tokens,
    chunk_scales,
    clip_to_saturation,
    hard_budget_scales,
    resize_video,
    retention,
    scaled_size,
    video_tokens,
)
from resadapt.capo import beta_log_prob

TRAINABLE_PREFIXES = (
    "frame_proj.",
    "query_proj.",
    "layers.",
    "pool.",
    "head.",
    "budget.",
    "relevance_metric.",
    "relevance_head.",
)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_tiny_backbone(TinyBackboneSpec(**SMALL_BACKBONE))


@pytest.fixture(scope="module")
def allocator(backbone):
    model, processor = backbone
    return Allocator.from_backbone(model, processor).eval()


def _video(seed: int, t: int, h: int = 224, w: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _query(allocator, ids, mask=None):
    ids = torch.tensor(ids)
    return allocator.encode_query(ids, None if mask is None else torch.tensor(mask))


def _perturb(model: Allocator, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
        # move the Beta head off its constant init, so alpha and beta depend on the inputs
        model.head.out.bias.copy_(torch.randn(2, generator=g))
        # the budget reads a whole video's mean feature: at std 0.5 it saturates every Beta at beta_max
        model.budget.weight.mul_(0.02)


def test_encode_frames_shapes_and_masks(allocator):
    feats = allocator.encode_frames([_video(0, 16), _video(1, 1, 112, 112)[0], _video(2, 5, 90, 150)])
    # 112 / 28 = 4 merged tokens per side; merged dim = backbone hidden size
    assert feats.tokens.shape == (3, 16, 16, SMALL_BACKBONE["hidden_size"])
    assert feats.tokens.dtype == torch.float32
    assert feats.num_frames == [16, 1, 5]
    assert feats.mask.dtype == torch.bool
    assert torch.all(feats.tokens[1, 1:] == 0) and torch.all(feats.tokens[2, 5:] == 0)
    single = allocator.encode_frames([_video(2, 5, 90, 150)])
    torch.testing.assert_close(single.tokens[0], feats.tokens[2, :5], atol=1e-5, rtol=1e-5)


def test_encode_frames_rejects_bad_input(allocator):
    with pytest.raises(ValueError, match=r"videos\[0\]"):
        allocator.encode_frames([np.zeros((2, 8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match=r"videos\[1\]"):
        allocator.encode_frames([_video(0, 1), np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(ValueError, match="list"):
        allocator.encode_frames(_video(0, 2))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_qwen_encoder_matches_backbone_image_path(arch, backbone, allocator):
    """Each frame goes through the tower exactly as the backbone's own image path would take it."""
    if arch == "qwen2_5_vl":
        model, processor = backbone
    else:
        torch.manual_seed(0)
        model, processor = build_tiny_backbone(TinyBackboneSpec(architecture=arch, **SMALL_BACKBONE))
        allocator = Allocator.from_backbone(model, processor)
    size = allocator.config.coarse_size
    assert size == (128 if arch == "qwen3_vl" else 112)  # 112 rounded to patch 16 x merge 2
    frame = _video(3, 1, 200, 260)[0]
    coarse = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC))
    batch = processor.image_processor(images=[coarse], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    ours = allocator.encode_frames([frame]).tokens[0, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_fresh_policy_is_a_broad_symmetric_beta(allocator):
    """Default init: alpha = beta = 1 + ln 2 for every frame, so the mean scale is mid-range everywhere."""
    feats = allocator.encode_frames([_video(0, 6), _video(1, 3)])
    q, qm = _query(allocator, [[20, 21, 22], [0, 23, 24]], [[1, 1, 1], [0, 1, 1]])
    out = allocator(feats.tokens, feats.mask, q, qm)
    m = feats.mask
    torch.testing.assert_close(
        out.alpha[m], torch.full_like(out.alpha[m], 1 + math.log(2)), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(out.beta[m], out.alpha[m])
    cfg = allocator.config
    mean = allocator.mean_scales(out)
    expected = torch.full_like(mean, (cfg.s_min + cfg.s_max) / 2) * feats.mask
    torch.testing.assert_close(mean, expected, atol=1e-4, rtol=0)
    assert out.frame_features.shape == (2, 6, cfg.dim)


def test_reference_init_is_uniform(backbone):
    """beta_init_logit = -10 is the authors' init: Beta(1, 1), log-prob 0 everywhere."""
    model, processor = backbone
    allocator = Allocator.from_backbone(model, processor, beta_init_logit=-10.0).eval()
    feats = allocator.encode_frames([_video(0, 6)])
    q, qm = _query(allocator, [[20, 21, 22]])
    out = allocator(feats.tokens, feats.mask, q, qm)
    assert torch.allclose(out.alpha, torch.ones_like(out.alpha), atol=1e-4)
    assert torch.allclose(out.beta, torch.ones_like(out.beta), atol=1e-4)
    u = torch.rand(out.alpha.shape, generator=torch.Generator().manual_seed(0))
    assert allocator.log_prob(out, u).abs().max() < 1e-3


def test_config_validation():
    with pytest.raises(ValueError, match="encoder_type"):
        AllocatorConfig(encoder_type="clip")
    with pytest.raises(ValueError, match="query_source"):
        AllocatorConfig(query_source="logits")
    with pytest.raises(ValueError, match="s_min"):
        AllocatorConfig(s_min=1.5, s_max=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        AllocatorConfig(dim=10, num_heads=4)
    with pytest.raises(ValueError, match="beta_max"):
        AllocatorConfig(beta_max=1.0)
    with pytest.raises(ValueError, match="coarse_size"):
        AllocatorConfig(coarse_size=0)
    with pytest.raises(ValueError, match="encoder_config"):
        Allocator(AllocatorConfig())


def test_coarse_size_rounds_to_token_grid(backbone):
    model, _ = backbone
    cfg = AllocatorConfig(encoder_config=model.config.to_dict(), coarse_size=100)
    assert cfg.coarse_size == 112
    with pytest.raises(ValueError, match="model_type"):
        AllocatorConfig(encoder_type="smolvlm", encoder_config=model.config.to_dict())


def test_save_load_roundtrip(backbone, tmp_path):
    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor, dim=32, num_heads=2, pool_hidden=16, head_hidden=16)
    _perturb(alloc, seed=1)  # stands in for training: the loaded model must not be re-initialised
    alloc.eval()
    videos = [_video(4, 4), _video(5, 2, 64, 96)]
    feats = alloc.encode_frames(videos)
    q, qm = _query(alloc, [[30, 31, 32, 33], [0, 0, 34, 35]], [[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        before = alloc(feats.tokens, feats.mask, q, qm)
    alloc.save_pretrained(tmp_path / "alloc")
    assert (tmp_path / "alloc" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "alloc" / "config.json").read_text())
    assert saved["model_type"] == "resadapt_allocator" and "auto_map" not in saved

    for loaded in (
        Allocator.from_pretrained(tmp_path / "alloc"),
        transformers.AutoModel.from_pretrained(tmp_path / "alloc"),
    ):
        assert type(loaded) is Allocator
        for name, p in loaded.named_parameters():
            assert p.requires_grad == name.startswith(TRAINABLE_PREFIXES), name
            torch.testing.assert_close(p, alloc.get_parameter(name), atol=0, rtol=0)
        feats2 = loaded.encode_frames(videos)
        torch.testing.assert_close(feats2.tokens, feats.tokens, atol=0, rtol=0)
        q2, qm2 = _query(loaded, [[30, 31, 32, 33], [0, 0, 34, 35]], [[1, 1, 1, 1], [0, 0, 1, 1]])
        with torch.no_grad():
            after = loaded(feats2.tokens, feats2.mask, q2, qm2)
        torch.testing.assert_close(after.alpha, before.alpha, atol=0, rtol=0)
        torch.testing.assert_close(after.beta, before.beta, atol=0, rtol=0)
        assert not torch.allclose(after.alpha, torch.ones_like(after.alpha))


def test_only_decoder_trains_and_encoders_stay_eval(backbone):
    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor)
    trainable = [n for n, p in alloc.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(TRAINABLE_PREFIXES) for n in trainable)
    alloc.train()
    assert alloc.training and alloc.head.training
    assert not any(m.training for frozen in alloc.frozen_modules() for m in frozen.modules())
    feats = alloc.encode_frames([_video(6, 3)])
    q, qm = _query(alloc, [[40, 41]])
    out = alloc(feats.tokens, feats.mask, q, qm)
    u, _, _ = alloc.sample(out, torch.Generator().manual_seed(0))
    alloc.log_prob(out, u).sum().backward()
    for name, p in alloc.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    assert alloc.head.out.weight.grad is not None and alloc.frame_proj.weight.grad is not None


def test_sample_is_reproducible_and_matches_log_prob(backbone):
    alloc = Allocator.from_backbone(*backbone)
    _perturb(alloc, seed=2)
    feats = alloc.encode_frames([_video(7, 8), _video(8, 3)])
    q, qm = _query(alloc, [[50, 51, 52], [53, 54, 55]])
    with torch.no_grad():
        out = alloc(feats.tokens, feats.mask, q, qm)
    state = torch.get_rng_state()
    u1, s1, lp1 = alloc.sample(out, torch.Generator().manual_seed(123))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    u2, s2, lp2 = alloc.sample(out, torch.Generator().manual_seed(123))
    u3, _, _ = alloc.sample(out, torch.Generator().manual_seed(124))
    assert torch.equal(u1, u2) and torch.equal(s1, s2) and torch.equal(lp1, lp2)
    assert not torch.equal(u1, u3)
    m = feats.mask
    cfg = alloc.config
    assert torch.all((s1[m] >= cfg.s_min) & (s1[m] <= cfg.s_max))
    assert torch.all(u1[~m] == 0) and torch.all(s1[~m] == 0) and torch.all(lp1[~m] == 0)
    torch.testing.assert_close(lp1[m], beta_log_prob(u1, out.alpha, out.beta)[m])
    torch.testing.assert_close(alloc.log_prob(out, u1), lp1)
    torch.testing.assert_close(s1, alloc.scales_from_latent(u1) * m)
    assert torch.all(out.alpha[~m] == 1) and torch.all(out.beta[~m] == 1)
    assert torch.all(out.alpha[m] >= 1) and torch.all(out.alpha[m] <= cfg.beta_max)


def test_query_and_frames_change_the_policy(backbone):
    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor)
    _perturb(alloc, seed=3)
    alloc.eval()
    feats = alloc.encode_frames([_video(9, 4)] * 2)
    q, qm = _query(alloc, [[60, 61, 62, 63], [60, 61, 99, 63]])
    with torch.no_grad():
        out = alloc(feats.tokens, feats.mask, q, qm)
    assert not torch.allclose(out.alpha[0], out.alpha[1])  # one token apart -> different policy
    # left padding of the query does not change anything (masked keys, masked mean)
    qp, qpm = _query(alloc, [[0, 0, 60, 61, 62, 63]], [[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = alloc(feats.tokens[:1], feats.mask[:1], qp, qpm)
    torch.testing.assert_close(padded.alpha, out.alpha[:1], atol=1e-5, rtol=1e-5)
    # padding frames do not change the valid frames' policy
    longer = FrameFeatures.cat([feats.select([0]), alloc.encode_frames([_video(10, 7)])]).select([0])
    assert longer.tokens.shape[1] == 4
    both = FrameFeatures.cat([feats.select([0]), alloc.encode_frames([_video(10, 7)])])
    qq, qqm = _query(alloc, [[60, 61, 62, 63]] * 2)
    with torch.no_grad():
        out2 = alloc(both.tokens, both.mask, qq, qqm)
    torch.testing.assert_close(out2.alpha[0, :4], out.alpha[0], atol=1e-5, rtol=1e-5)


def test_frame_features_select_and_cat():
    a = FrameFeatures(torch.randn(2, 5, 3, 4), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool())
    b = FrameFeatures(torch.randn(1, 2, 3, 4), torch.ones(1, 2, dtype=torch.bool))
    sel = a.select([1])
    assert sel.tokens.shape == (1, 2, 3, 4) and sel.num_frames == [2]
    both = FrameFeatures.cat([b, a])
    assert both.tokens.shape == (3, 5, 3, 4) and both.num_frames == [2, 5, 2]
    assert torch.all(both.tokens[0, 2:] == 0)
    torch.testing.assert_close(both.select([2, 1]).tokens[1], a.tokens[0])
    with pytest.raises(ValueError, match="out of range"):
        a.select([2])
    with pytest.raises(ValueError, match="mask"):
        FrameFeatures(torch.randn(1, 2, 3, 4), torch.ones(1, 3, dtype=torch.bool))


def test_allocate_convenience(backbone):
    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor)
    ids = torch.tensor([[70, 71], [0, 72]])
    mask = torch.tensor([[1, 1], [0, 1]])
    scales = alloc.allocate([_video(11, 5), _video(12, 1)[0]], ids, mask)
    assert [len(s) for s in scales] == [5, 1]
    np.testing.assert_allclose(scales[0], (alloc.config.s_min + alloc.config.s_max) / 2, atol=1e-4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = alloc.allocate([_video(11, 5)], ids[:1], mask[:1], mode="sample", generator=g1)
    s2 = alloc.allocate([_video(11, 5)], ids[:1], mask[:1], mode="sample", generator=g2)
    np.testing.assert_array_equal(s1[0], s2[0])
    with pytest.raises(ValueError, match="mode"):
        alloc.allocate([_video(11, 5)], ids[:1], mask[:1], mode="median")


def test_hidden_state_query_from_qwen_backbone(backbone):
    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor, query_source="hidden_states")
    ids = torch.tensor([[80, 81, 82]])
    q, qm = alloc.encode_query(ids)
    with torch.no_grad():
        ref = model.model.language_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(q, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# SmolVLM stand-in (paper profile): same architecture, tiny sizes.


def _tiny_smolvlm():
    cfg = transformers.SmolVLMConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
        ),
        scale_factor=2,
        image_token_id=99,
    )
    torch.manual_seed(0)
    return transformers.SmolVLMForConditionalGeneration(cfg).eval()


def test_smolvlm_profile_encode_forward_roundtrip(tmp_path):
    smol = _tiny_smolvlm()
    alloc = Allocator.from_smolvlm(smol, dim=32, num_heads=2)
    assert alloc.config.coarse_size == 64 and alloc.config.query_source == "hidden_states"
    assert alloc.config.image_mean == [0.5, 0.5, 0.5]
    videos = [_video(13, 3, 80, 120), _video(14, 1, 50, 50)[0]]
    feats = alloc.encode_frames(videos)
    # (64 / 16)^2 = 16 patches, pixel shuffle by 2 -> 4 tokens of the text width
    assert feats.tokens.shape == (2, 3, 4, 32) and feats.num_frames == [3, 1]

    # the same features as SmolVLM's own image path on the same normalised pixels
    coarse = np.asarray(Image.fromarray(videos[1]).resize((64, 64), Image.Resampling.LANCZOS))
    pixels = torch.from_numpy((coarse.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None, None]
    with torch.no_grad():
        ref = smol.model.get_image_features(pixels).pooler_output[0]
    torch.testing.assert_close(feats.tokens[1, 0], ref, atol=1e-5, rtol=1e-4)

    # text-only last hidden state; left padding gives the same states for the real tokens
    q, qm = alloc.encode_query(torch.tensor([[5, 6, 7]]))
    qp, qpm = alloc.encode_query(torch.tensor([[0, 0, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(qp[0, 2:], q[0], atol=1e-5, rtol=1e-5)
    assert torch.all(qp[0, :2] == 0)

    _perturb(alloc, seed=4)
    alloc.eval()
    q2, qm2 = alloc.encode_query(torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with torch.no_grad():
        out = alloc(feats.tokens, feats.mask, q2, qm2)
    alloc.save_pretrained(tmp_path / "smol")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "smol")
    assert loaded.config.encoder_type == "smolvlm"
    assert not any(p.requires_grad for m in loaded.frozen_modules() for p in m.parameters())
    feats2 = loaded.encode_frames(videos)
    q3, qm3 = loaded.encode_query(torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    torch.testing.assert_close(feats2.tokens, feats.tokens, atol=0, rtol=0)
    with torch.no_grad():
        out2 = loaded(feats2.tokens, feats2.mask, q3, qm3)
    torch.testing.assert_close(out2.alpha, out.alpha, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Hard budget


def _chunk_step_bound(n_frames: int, height: int, width: int, geom: VisionGeometry, s_min, s_max) -> int:
    """Largest single-chunk token jump for scales in [s_min, s_max] (jumps only happen at k/H or k/W)."""
    tp = geom.temporal_patch_size
    sizes = {min(tp, n_frames - i) for i in range(0, n_frames, tp)}
    points = [k / side for side in (height, width) for k in range(1, int(side * s_max) + 2)]
    points = [p for p in points if s_min < p <= s_max]
    step = 0
    for n in sizes:
        for p in points:
            step = max(
                step, video_tokens(n, height, width, geom, p) - video_tokens(n, height, width, geom, p - 1e-9)
            )
    return step


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    t=st.integers(2, 12),
    target=st.floats(0.1, 1.0),
    size=st.sampled_from([(224, 224), (336, 448), (180, 320)]),
)
def test_hard_budget_meets_target_within_one_chunk_step(seed, t, target, size):
    h, w = size
    geom = VisionGeometry()
    s_min, s_max = 0.125, 1.25
    scales = np.random.default_rng(seed).uniform(s_min, s_max, t)
    out = hard_budget_scales(scales, h, w, geom, target, s_min, s_max, image=False)
    assert out.shape == scales.shape
    assert np.all(out >= s_min) and np.all(out <= s_max)
    achieved = allocation_retention(out, h, w, geom, image=False)
    ref = video_tokens(t, h, w, geom)
    assert achieved <= target + 1e-12
    full = allocation_retention(np.full(t, s_max), h, w, geom, image=False)
    if full > target:  # otherwise everything is at s_max and retention is below the target by design
        assert target - achieved <= _chunk_step_bound(t, h, w, geom, s_min, s_max) / ref + 1e-12
    # chunk ranking kept (the operator's unit): a chunk with a smaller mean scale never ends up larger
    tp = geom.temporal_patch_size
    before, after = np.asarray(chunk_scales(scales, tp)), np.asarray(chunk_scales(out, tp))
    order = np.argsort(before)
    assert np.all(np.diff(after[order]) >= -1e-12)
    # every frame of a chunk gets the chunk's scale
    assert np.allclose(out, np.repeat(after, tp)[:t])
    # the accounting is the operator's own: resize the frames and measure
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    assert retention(resize_video(frames, out, geom), geom) == pytest.approx(achieved)


def test_hard_budget_single_image_and_errors():
    geom = VisionGeometry()
    out = hard_budget_scales([0.9], 448, 448, geom, 0.25, 0.125, 1.25)
    achieved = allocation_retention(out, 448, 448, geom)
    assert allocation_tokens(out, 448, 448, geom) == allocation_tokens(out, 448, 448, geom, image=True)
    assert 0.2 < achieved <= 0.25
    with pytest.raises(ValueError, match="target_retention"):
        hard_budget_scales([1.0, 1.0], 224, 224, geom, 0.0, 0.125, 1.25)
    with pytest.raises(ValueError, match="target_retention"):
        hard_budget_scales([1.0, 1.0], 224, 224, geom, 1.5, 0.125, 1.25)
    with pytest.raises(ValueError, match="target_retention"):
        hard_budget_scales([1.0, 1.0], 224, 224, geom, float("nan"), 0.125, 1.25)
    with pytest.raises(ValueError, match="smallest retention"):
        hard_budget_scales([1.0, 1.0], 224, 224, geom, 0.01, 0.125, 1.25)
    with pytest.raises(ValueError, match="s_min"):
        hard_budget_scales([1.0, 1.0], 224, 224, geom, 0.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="image=True"):
        hard_budget_scales([1.0, 1.0], 224, 224, geom, 0.5, 0.125, 1.25, image=True)
    # a target that s_max cannot exceed: everything gets the tokens of s_max (at its saturation scale)
    out = hard_budget_scales([0.2, 0.3], 224, 224, geom, 1.0, 0.125, 1.0)
    assert allocation_tokens(out, 224, 224, geom) == allocation_tokens([1.0, 1.0], 224, 224, geom)
    # scales above 1 add tokens, so a full-retention target can pull an allocation down
    out = hard_budget_scales([1.2, 1.25], 224, 224, geom, 1.0, 0.125, 1.25)
    assert out[0] <= out[1] < 1.25 and allocation_retention(out, 224, 224, geom) <= 1.0


def test_relevance_prior_finds_the_frame_that_matches_a_question_word():
    from resadapt.allocator import relevance

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 5, 4, 8, generator=g) * 0.1
    query = torch.randn(1, 3, 8, generator=g)
    tokens[0, 3, 2] = query[0, 1] * 3  # frame 3 holds a token that looks like question word 1
    mask = torch.tensor([[True, True, True, True, False]])
    rel = relevance(tokens, mask, query, torch.ones(1, 3, dtype=torch.bool))
    assert rel[0, :4].argmax() == 3
    assert rel[0, 4] == 0, "a padding frame gets no relevance"
    # a word every frame matches equally carries no information: centring removes it
    flat = torch.zeros(1, 4, 4, 8)
    flat[:, :, 0] = query[0, 0]
    rel_flat = relevance(
        flat, torch.ones(1, 4, dtype=torch.bool), query[:, :1], torch.ones(1, 1, dtype=torch.bool)
    )
    assert torch.allclose(rel_flat, torch.zeros_like(rel_flat))
    # a single frame (an image) has no spread; the gradient the learned metric gets must stay finite
    metric = torch.eye(8, requires_grad=True)
    one = relevance(tokens[:, :1] @ metric.T, mask[:, :1], query, torch.ones(1, 3, dtype=torch.bool))
    one.sum().backward()
    assert torch.all(one == 0) and torch.isfinite(metric.grad).all()


def test_standardise_frames_keeps_only_what_tells_frames_apart():
    from resadapt.allocator import standardise_frames

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 4, 8, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = standardise_frames(tokens, mask)
    assert torch.all(out[1, 3:] == 0), "padding frames stay zero"
    for i, n in enumerate((5, 3)):
        valid = out[i, :n]
        torch.testing.assert_close(valid.mean((0, 1)), torch.zeros(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(valid.pow(2).mean(), torch.tensor(1.0), atol=1e-4, rtol=0)
    # a vector every frame shares and the overall scale carry no ranking information
    shifted = standardise_frames(3.0 * tokens + torch.randn(8, generator=g) * 50, mask)
    torch.testing.assert_close(shifted, out, atol=1e-4, rtol=0)
    # padding content does not leak into the valid frames
    padded = tokens.clone()
    padded[1, 3:] = 1e3
    torch.testing.assert_close(standardise_frames(padded, mask), out, atol=1e-5, rtol=0)


def test_relevance_metric_starts_at_the_prior_and_is_used(backbone, tmp_path):
    from resadapt.allocator import relevance

    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor, dim=32, num_heads=2, relevance_init=1.0).eval()
    eye = torch.eye(alloc.encoder_dim)
    torch.testing.assert_close(alloc.relevance_metric.weight, eye, atol=0, rtol=0)
    feats = alloc.encode_frames([_video(6, 6)])
    q, qm = _query(alloc, [[40, 41, 42]])
    with torch.no_grad():
        before = alloc(feats.tokens, feats.mask, q, qm)
        # zero head: the split is the prior alone, the parameter-free relevance through relevance_init,
        # centred over the frames; the budget logit starts at 0 (mean 1/2 over the video's logits)
        rel = relevance(feats.tokens, feats.mask, q, qm)
        torch.testing.assert_close(before.split, rel - rel.mean(1, keepdim=True))
        torch.testing.assert_close(before.budget_logit, torch.zeros(1))
        mean = before.alpha / (before.alpha + before.beta)
        torch.testing.assert_close(mean, torch.sigmoid(before.split))
        alloc.relevance_metric.weight.copy_(
            torch.randn(eye.shape, generator=torch.Generator().manual_seed(1))
        )
        moved = alloc(feats.tokens, feats.mask, q, qm)
    assert not torch.allclose(moved.alpha, before.alpha), "the learned metric must change the prior"
    # a checkpoint written before the metric existed loads with the identity, i.e. as it behaved
    with torch.no_grad():
        alloc.relevance_metric.weight.copy_(eye)
    alloc.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "model.safetensors"
    state = load_file(str(path))
    del state["relevance_metric.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    old = Allocator.from_pretrained(tmp_path / "old").eval()
    torch.testing.assert_close(old.relevance_metric.weight, eye, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(old(feats.tokens, feats.mask, q, qm).alpha, before.alpha, atol=0, rtol=0)


def test_relevance_init_and_init_mean(backbone):
    model, processor = backbone
    allocator = Allocator.from_backbone(model, processor, relevance_init=1.5).eval()
    torch.testing.assert_close(allocator.relevance_head.weight.flatten(), torch.tensor([1.5]))
    high = Allocator.from_backbone(model, processor, init_mean_scale=1.0, relevance_prior=False)
    feats = high.encode_frames([_video(0, 4)])
    q, qm = _query(high, [[20, 21]])
    mean = high.mean_scales(high(feats.tokens, feats.mask, q, qm))
    torch.testing.assert_close(mean, torch.full_like(mean, 1.0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="init_mean_scale"):
        AllocatorConfig(init_mean_scale=1.25)


def test_hard_budget_sharpen_keeps_the_top_chunk_at_full_resolution():
    geom = VisionGeometry(min_pixels=28 * 28, max_pixels=224 * 224)
    scales = np.array([0.9, 0.9, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4])
    sharp = hard_budget_scales(scales, 224, 224, geom, 0.3, 0.125, 1.25)
    shift = hard_budget_scales(scales, 224, 224, geom, 0.3, 0.125, 1.25, mode="shift")
    for out in (sharp, shift):
        assert allocation_retention(out, 224, 224, geom) <= 0.3
        assert np.all(np.diff(out[::2]) <= 1e-12), "ranking kept"
    full = video_tokens(2, 224, 224, geom)
    assert video_tokens(2, 224, 224, geom, sharp[:2].mean()) == full, "the top chunk keeps all its tokens"
    assert video_tokens(2, 224, 224, geom, shift[:2].mean()) < full, "a plain shift lowers the top chunk too"
    with pytest.raises(ValueError, match="mode"):
        hard_budget_scales(scales, 224, 224, geom, 0.3, 0.125, 1.25, mode="topk")


def test_clip_to_saturation_keeps_the_frame_the_allocator_asked_for():
    geom = VisionGeometry(min_pixels=28 * 28, max_pixels=224 * 224)
    assert scaled_size(224, 224, 1.2499, geom) == (196, 196), "the pitfall: flooring at the pixel cap"
    clipped = clip_to_saturation([1.2499, 1.0, 0.5], 224, 224, geom, 1.25)
    assert scaled_size(224, 224, clipped[0], geom) == (224, 224)
    assert clipped[0] <= 1.0 and clipped[2] == 0.5


def test_the_concentration_regularizer_sees_the_free_concentration_unclamped(backbone):
    """At alpha = beta_max the clamped value has no gradient: a saturated frame could never be pulled back.
    The regularizer sees 1 + mu c, 1 + (1 - mu) c instead: unclamped, and blind to the alpha + beta that an
    extreme mean needs (a low mean is not pulled back to the middle)."""
    from resadapt.capo import concentration_loss

    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor, beta_max=1.5)  # starts at ~1 + ln 2: saturated
    feats = alloc.encode_frames([_video(0, 4)])
    q, qm = _query(alloc, [[60, 61, 62]])
    out = alloc(feats.tokens, feats.mask, q, qm)
    m = feats.mask
    assert torch.all(out.alpha[m] == 1.5)
    a, b = alloc.spread_parameters(out)
    torch.testing.assert_close((a + b)[m], 2.0 + out.concentration[m])
    head = alloc.head.out.bias
    (clamped,) = torch.autograd.grad(concentration_loss(out.alpha, out.beta, m), head, retain_graph=True)
    (free,) = torch.autograd.grad(concentration_loss(a, b, m), [head, alloc.budget.bias], retain_graph=True)[
        :1
    ]
    assert torch.all(clamped == 0) and free[1] > 0  # the concentration output is pushed down
    (budget,) = torch.autograd.grad(concentration_loss(a, b, m), alloc.budget.bias)
    assert budget.abs().item() < 1e-6  # the mean is not pulled anywhere


def test_budget_logit_moves_the_level_and_the_split_where_it_goes(backbone):
    """Beta mean = sigmoid(budget + split), the split zero-sum over a video's frames; the budget constraint's
    scales (`budget_mean_scales`) carry gradient to the budget logit only."""
    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor, relevance_init=1.0)
    _perturb(alloc)
    feats = alloc.encode_frames([_video(0, 6), _video(1, 4)])
    q, qm = _query(alloc, [[40, 41, 42], [43, 44, 0]], [[1, 1, 1], [1, 1, 0]])
    out = alloc(feats.tokens, feats.mask, q, qm)
    m = out.frame_mask
    assert torch.allclose(out.split.sum(1), torch.zeros(2), atol=1e-5) and torch.all(out.split[~m] == 0)
    a, b = alloc.beta_parameters(out.budget_logit, out.split, out.concentration)
    assert torch.all(a[m] >= 1.0) and torch.all(b[m] >= 1.0)
    ok = m & (out.alpha == a) & (out.beta == b)  # not clamped at beta_max
    mu = torch.sigmoid(out.budget_logit[:, None] + out.split)
    torch.testing.assert_close((out.alpha / (out.alpha + out.beta))[ok], mu[ok], atol=1e-5, rtol=0)
    torch.testing.assert_close(alloc.budget_mean_scales(out)[ok], alloc.mean_scales(out)[ok])
    scales = alloc.budget_mean_scales(out)
    (g_budget,) = torch.autograd.grad(scales.sum(), out.budget_logit, retain_graph=True)
    assert torch.all(g_budget > 0)
    split_grad = torch.autograd.grad(scales.sum(), out.split, allow_unused=True)[0]
    assert split_grad is None or torch.all(split_grad == 0)
    with torch.no_grad():
        alloc.budget.bias += 1.0  # a higher budget raises every frame (up to beta_max) and keeps the split
        higher = alloc(feats.tokens, feats.mask, q, qm)
    up, before = alloc.mean_scales(higher), alloc.mean_scales(out).detach()
    assert torch.all(up[m] >= before[m]) and torch.all(up[ok] > before[ok])
    torch.testing.assert_close(higher.split, out.split.detach())


def test_budget_constraint_pulls_a_collapsed_video_back(backbone):
    """Every frame at beta_max (or past the logit clamp): the deterministic allocation all but stops moving,
    yet the constraint's gradient on the budget logit keeps its floor and raises the budget."""
    from resadapt.allocator import BUDGET_GRAD_FLOOR
    from resadapt.capo import budget_constraint

    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor)
    feats = alloc.encode_frames([_video(0, 6), _video(1, 4)])
    q, qm = _query(alloc, [[40, 41, 42], [43, 44, 0]], [[1, 1, 1], [1, 1, 0]])
    for shift in (-6.0, -14.0):
        with torch.no_grad():
            alloc.budget.bias.fill_(shift)
        out = alloc(feats.tokens, feats.mask, q, qm)
        m = out.frame_mask
        assert torch.all(out.beta[m] == alloc.config.beta_max)
        (frozen,) = torch.autograd.grad(
            alloc.mean_scales(out)[m].mean(), alloc.budget.bias, retain_graph=True
        )
        assert abs(frozen.item()) < 1e-3 * (alloc.config.s_max - alloc.config.s_min)
        measured, target, coef = 0.02, 0.15, 30.0
        loss, _ = budget_constraint(
            alloc.budget_mean_scales(out), m, torch.full((2,), measured), target, coef
        )
        (grad,) = torch.autograd.grad(loss, alloc.budget.bias)
        # d loss / d bias <= 2 coef (R - R*) * 2 s_min (s_max - s_min) * floor: descent raises the budget
        s = alloc.config
        floor = 2 * coef * (measured - target) * 2 * s.s_min * (s.s_max - s.s_min) * BUDGET_GRAD_FLOOR
        assert grad.item() <= 0.99 * floor < 0


def test_save_pretrained_writes_a_model_card_and_leaves_weights_and_config_alone(backbone, tmp_path):
    import yaml

    from resadapt.allocator import model_card

    model, processor = backbone
    alloc = Allocator.from_backbone(model, processor, dim=32, num_heads=2, pool_hidden=16, head_hidden=16)
    alloc.save_pretrained(tmp_path / "plain")
    metrics = {"hard budget accuracy": 0.887, "retention": 0.145, "seeds": 3}
    alloc.save_pretrained(
        tmp_path / "card", card_metrics=metrics, card_training="embedded benchmark, train split"
    )
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "card" / name).read_bytes()
    card = (tmp_path / "card" / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert (
        meta["library_name"] == "transformers" and "resadapt" in meta["tags"] and meta["license"] == "other"
    )
    assert "base_model" not in meta  # built from a local model: no hub id to name
    assert "| hard budget accuracy | 0.887 |" in body and "| seeds | 3 |" in body
    assert "embedded benchmark, train split" in body and "s in [0.125, 1.25]" in body
    assert "qwen2_5_vl backbone" in body and "PlugAndPlayAllocator.from_pretrained" in body
    assert "No measured results" in (tmp_path / "plain" / "README.md").read_text()
    alloc.card_metrics = {"accuracy": 0.5}  # the attribute route (what a trainer can set before saving)
    alloc.save_pretrained(tmp_path / "attr")
    assert "| accuracy | 0.5 |" in (tmp_path / "attr" / "README.md").read_text()
    config = AllocatorConfig(**{**alloc.config.to_dict(), "encoder_config": {**alloc.config.encoder_config}})
    config.encoder_config["_name_or_path"] = "Qwen/Qwen2.5-VL-7B-Instruct"
    assert yaml.safe_load(model_card(config).split("---\n")[1])["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
