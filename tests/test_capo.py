"""Tests for resadapt.capo: CAPO advantages against the reference's worked example, cost proxy, losses."""

from __future__ import annotations

import pytest
import torch

from resadapt.budget import VisionGeometry, token_saturation_scale, video_tokens
from resadapt.capo import (
    CAPOConfig,
    TemporalSimilarityConfig,
    asymmetric_shaping,
    beta_log_prob,
    capo_advantage,
    concentration_loss,
    dynamic_pivot,
    group_zscore,
    lagrangian_advantage,
    no_cost_advantage,
    ppo_frame_loss,
    proxy_cost,
    temporal_similarity_loss,
)

CFG = CAPOConfig()  # authors' defaults, s_min 0.2, s_max 2.0
MEAN_SCALES = torch.tensor([0.5, 0.9, 1.3, 1.8])
WORKED_COST = torch.tensor([0.1667, 0.3889, 0.6111, 0.8889])


def _cost() -> torch.Tensor:
    return proxy_cost(MEAN_SCALES[:, None].expand(4, 8), None, CFG)


# ---- worked example (reference-implementation.md §3.4) ----


def test_worked_example_cost():
    torch.testing.assert_close(_cost(), WORKED_COST, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("acc", "expected"),
    [
        ([1.0, 0.5, 0.0, 1.0], [0.962, 0.001, -1.461, 0.782]),
        ([1.0, 1.0, 1.0, 1.0], [0.057, 0.001, 0.001, 0.001]),
        ([0.0, 0.0, 0.0, 0.0], [-0.130, -0.056, 0.046, 0.101]),
    ],
)
def test_worked_example_advantages(acc, expected):
    adv, parts = capo_advantage(torch.tensor(acc), _cost(), CFG)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-3, rtol=0)
    assert set(parts) >= {"base", "pivot", "shape", "cost_pressure", "correct", "unfloored"}


def test_worked_example_parts_and_batched_layout():
    acc = torch.tensor([[1.0, 0.5, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    cost = _cost().expand(3, 4)
    adv, parts = capo_advantage(acc, cost, CFG)
    for g in range(3):
        single, _ = capo_advantage(acc[g], cost[g], CFG)
        torch.testing.assert_close(adv[g], single)
    # allocation 4: z-score 0.904, lowered to 0.782 by its cost terms (reference §3.4)
    assert parts["base"][0, 3].item() == pytest.approx(0.9045, abs=1e-3)
    pivot = 0.5 * WORKED_COST.mean() + 0.5 * 0.4
    torch.testing.assert_close(parts["pivot"], pivot.expand(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(dynamic_pivot(cost, CFG), parts["pivot"])
    shape = asymmetric_shaping(acc, cost, parts["pivot"], CFG)
    torch.testing.assert_close(parts["unfloored"], parts["base"] + 0.25 * shape - 0.05 * cost)


def test_shaping_signs():
    cost = torch.tensor([0.1, 0.9])
    pivot = torch.tensor(0.5)
    right = asymmetric_shaping(torch.tensor([1.0, 1.0]), cost, pivot, CFG)
    wrong = asymmetric_shaping(torch.tensor([0.0, 0.0]), cost, pivot, CFG)
    assert right[0] > 0 > right[1]  # correct: cheaper than the pivot is rewarded
    assert wrong[0] < 0 < wrong[1]  # wrong: spending more is rewarded
    assert abs(wrong[1]) > abs(right[0])  # wrong branch is stronger (1.3 vs 0.7)


# ---- floor, zero-std groups, ablations ----


def test_floor_applies_only_to_correct():
    acc = torch.tensor([1.0, 0.4, 0.3, 0.0])  # 0.4 correct but below the mean; 0.3 <= 0.35: not correct
    cost = torch.tensor([0.2, 0.9, 0.9, 0.9])
    adv, parts = capo_advantage(acc, cost, CFG)
    assert parts["unfloored"][1] < CFG.correct_floor and adv[1] == pytest.approx(CFG.correct_floor)
    assert parts["unfloored"][2] < 0 and adv[2] == parts["unfloored"][2]
    assert adv[3] == parts["unfloored"][3] < 0
    no_floor, _ = capo_advantage(acc, cost, CFG.model_copy(update={"apply_floor": False}))
    torch.testing.assert_close(no_floor, parts["unfloored"])


def test_zero_std_group_has_zero_base():
    assert torch.equal(group_zscore(torch.tensor([0.5, 0.5, 0.5])), torch.zeros(3))
    _, parts = capo_advantage(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.1, 0.5, 0.9]), CFG)
    assert torch.equal(parts["base"], torch.zeros(3))
    z = group_zscore(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(z, torch.tensor([1.0, -1.0]))  # population std


def test_single_allocation_group_gets_zero():
    adv, _ = capo_advantage(torch.tensor([1.0]), torch.tensor([0.1]), CFG)
    assert torch.equal(adv, torch.zeros(1))


def test_ablations():
    acc = torch.tensor([1.0, 1.0, 1.0, 0.0])
    cost = torch.tensor([0.1, 0.5, 0.9, 0.5])
    lag = lagrangian_advantage(acc, cost, lam=0.5)
    assert lag[0] > lag[1] > lag[2]  # equal accuracy: cheaper preferred
    plain = no_cost_advantage(acc)
    assert plain[0] == plain[1] == plain[2] > 0
    torch.testing.assert_close(plain, group_zscore(acc))
    torch.testing.assert_close(lagrangian_advantage(acc, cost, lam=0.0), plain)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="cost shape"):
        capo_advantage(torch.ones(4), torch.ones(3), CFG)


# ---- cost proxy ----

SMALL_GEOM = VisionGeometry(min_pixels=28 * 28, max_pixels=112 * 112)


def test_saturation_scale_is_where_tokens_stop_growing():
    sat = token_saturation_scale(112, 112, SMALL_GEOM, 2.0)
    cap_tokens = video_tokens(2, 112, 112, SMALL_GEOM, sat)
    assert cap_tokens == 16
    assert video_tokens(2, 112, 112, SMALL_GEOM, sat * 0.97) < cap_tokens
    for s in (1.0, 1.3, 1.5, 2.0):
        assert video_tokens(2, 112, 112, SMALL_GEOM, s) <= cap_tokens
    # far below the cap (56x56 source, cap 112x112) saturation is near 2.0
    assert token_saturation_scale(56, 56, SMALL_GEOM, 2.0) > 1.7


def test_proxy_cost_ignores_scale_beyond_pixel_cap():
    sat = token_saturation_scale(112, 112, SMALL_GEOM, 2.0)
    eff = torch.tensor([sat, 2.0])  # frame 0 at the cap, frame 1 (a low-res source) far below it
    mask = torch.ones(2, dtype=torch.bool)
    base = proxy_cost(torch.tensor([1.0, 0.5]), mask, CFG, eff)
    up_capped = proxy_cost(torch.tensor([1.8, 0.5]), mask, CFG, eff)
    up_free = proxy_cost(torch.tensor([1.0, 0.9]), mask, CFG, eff)
    assert up_capped == base
    assert up_free > base
    # without the clip the authors' proxy charges for it
    assert proxy_cost(torch.tensor([1.8, 0.5]), mask, CFG) > proxy_cost(torch.tensor([1.0, 0.5]), mask, CFG)


def test_proxy_cost_mask_and_clamp():
    scales = torch.tensor([[0.2, 2.0, 5.0], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(proxy_cost(scales, mask, CFG), torch.tensor([0.5, 0.0]))
    assert proxy_cost(torch.ones(3), torch.zeros(3, dtype=torch.bool), CFG) == 0


# ---- PPO surrogate ----


def _ppo(ratio: float, adv: float, **kw):
    logp_old = torch.zeros(1, 3)
    logp_new = torch.full((1, 3), float(torch.log(torch.tensor(ratio))), requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = ppo_frame_loss(logp_new, logp_old, torch.tensor([adv]), mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp_new)
    return loss.item(), grad, metrics


def test_ppo_ratio_one_is_minus_advantage_mean():
    logp = torch.randn(2, 4)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    adv = torch.tensor([0.5, -2.0])
    loss, metrics = ppo_frame_loss(logp, logp.clone(), adv, mask)
    expected = -(0.5 * 3 + -2.0 * 1) / 4  # token-mean over the 4 valid frames
    assert loss.item() == pytest.approx(expected)
    assert metrics["clipfrac"].item() == 0


@pytest.mark.parametrize(
    ("ratio", "adv", "expected", "has_grad"),
    [
        (2.0, 1.0, -1.28, False),  # positive A, ratio above 1 + clip_high: clipped
        (0.5, 1.0, -0.5, True),  # positive A, ratio below 1 - clip_low: not clipped (pessimistic)
        (2.0, -1.0, 2.0, True),  # negative A, ratio high: not clipped
        (0.5, -1.0, 0.8, False),  # negative A, ratio below 1 - clip_low: clipped
        (20.0, -1.0, 10.0, False),  # negative A, huge ratio: dual clip
    ],
)
def test_ppo_clipping(ratio, adv, expected, has_grad):
    loss, grad, _ = _ppo(ratio, adv)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert bool(grad.abs().sum() > 0) == has_grad


def test_ppo_masked_frames_ignored():
    logp_old = torch.zeros(1, 4)
    logp_new = torch.tensor([[0.1, -0.1, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    loss, _ = ppo_frame_loss(logp_new, logp_old, torch.tensor([1.0]), mask)
    wild = torch.tensor([[0.1, -0.1, 0.0, 50.0]], requires_grad=True)
    loss_wild, _ = ppo_frame_loss(wild, logp_old, torch.tensor([1.0]), mask)
    assert loss_wild.item() == pytest.approx(loss.item())
    (g,) = torch.autograd.grad(loss_wild, wild)
    assert g[0, 3] == 0 and torch.isfinite(g).all()


def test_beta_log_prob_matches_torch():
    u = torch.tensor([0.1, 0.5, 0.9])
    a, b = torch.tensor([1.0, 2.0, 3.5]), torch.tensor([1.0, 5.0, 0.7])
    expected = torch.distributions.Beta(a, b).log_prob(u)
    torch.testing.assert_close(beta_log_prob(u, a, b), expected)
    assert torch.isfinite(
        beta_log_prob(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]))
    ).all()


# ---- regularizers ----


def _sim_inputs(similar: bool, later_bigger: bool = True):
    f0 = torch.tensor([1.0, 0.2, 0.0])
    f1 = f0 + 0.01 if similar else -f0
    features = torch.stack([f0, f1])[None].requires_grad_(True)  # (1, 2, 3)
    alpha = torch.tensor([[2.0, 4.0 if later_bigger else 1.0]], requires_grad=True)
    beta = torch.tensor([[2.0, 2.0]], requires_grad=True)
    return features, alpha, beta, torch.ones(1, 2, dtype=torch.bool)


def test_temporal_similarity_weights_are_detached():
    features, alpha, beta, mask = _sim_inputs(similar=True)
    loss = temporal_similarity_loss(features, alpha, beta, mask, TemporalSimilarityConfig())
    assert loss.item() > 0
    g_feat, g_alpha, g_beta = torch.autograd.grad(loss, [features, alpha, beta], allow_unused=True)
    assert g_feat is None or torch.count_nonzero(g_feat) == 0
    assert g_alpha[0, 1] > 0 and g_alpha[0, 0] < 0  # push the later frame down, the earlier up
    assert g_beta.abs().sum() > 0


def test_temporal_similarity_equal_scales_penalised_by_margin():
    features, alpha, beta, mask = _sim_inputs(similar=True, later_bigger=False)
    alpha = torch.tensor([[2.0, 2.0]])
    w = torch.sigmoid((torch.tensor(1.0) - 0.55) / 0.12)  # cos ~ 1
    loss = temporal_similarity_loss(features, alpha, beta, mask)
    assert loss.item() == pytest.approx((0.05 * w**2).item(), rel=1e-3)


def test_temporal_similarity_dissimilar_frames_no_loss():
    features, alpha, beta, mask = _sim_inputs(similar=False)
    loss = temporal_similarity_loss(features, alpha, beta, mask)
    assert loss.item() < 1e-5
    features, alpha, beta, _ = _sim_inputs(similar=True)
    masked = temporal_similarity_loss(features, alpha, beta, torch.tensor([[True, False]]))
    assert masked.item() == 0


def test_concentration_loss():
    alpha = torch.tensor([[2.0, 3.0, 100.0]], requires_grad=True)
    beta = torch.tensor([[1.0, 4.0, 100.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = concentration_loss(alpha, beta, mask)
    assert loss.item() == pytest.approx((3.0 + 7.0) / 2)
    (ga,) = torch.autograd.grad(loss, alpha)
    assert ga[0, 0] > 0 and ga[0, 1] > 0 and ga[0, 2] == 0  # minimising flattens the Betas
    capped = concentration_loss(alpha, beta, mask, cap=5.0)
    assert capped.item() == pytest.approx((0.0 + 2.0) / 2)
    (gc,) = torch.autograd.grad(capped, alpha)
    assert gc[0, 0] == 0 and gc[0, 1] > 0


# ---- config validation ----


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha_mix", 1.5),
        ("target_cost", -0.1),
        ("tau", 0.0),
        ("encouragement", -1.0),
        ("gas", float("nan")),
        ("correct_threshold", 1.0),
        ("acc_floor", "x"),
        ("s_max", 0.1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CAPOConfig(**{field: value})


def test_config_defaults_are_the_authors():
    assert (CFG.alpha_mix, CFG.target_cost, CFG.tau, CFG.encouragement, CFG.gas) == (
        0.5,
        0.4,
        0.15,
        0.25,
        0.05,
    )
    assert (CFG.right_scale, CFG.wrong_scale, CFG.acc_pow, CFG.acc_floor, CFG.wrong_pow) == (
        0.7,
        1.3,
        0.5,
        0.05,
        1.0,
    )
    assert (CFG.correct_threshold, CFG.correct_floor, CFG.s_min, CFG.s_max) == (0.35, 0.001, 0.2, 2.0)
    with pytest.raises(ValueError, match="TemporalSimilarityConfig.sim_temp"):
        TemporalSimilarityConfig(sim_temp=0.0)


def test_an_allocation_at_the_target_retention_costs_c_star():
    from resadapt.budget import uniform_scale_for_retention
    from resadapt.capo import target_cost_for_retention

    geom = VisionGeometry(min_pixels=28 * 28, max_pixels=224 * 224)
    cfg = CAPOConfig().with_scale_range(0.125, 1.25)
    target = 25 / 64  # reachable exactly: 5 x 5 tokens of 8 x 8 per chunk
    c_star = target_cost_for_retention(target, 224, 224, 16, geom, cfg)
    s = uniform_scale_for_retention(target, 224, 224, 16, geom)
    assert video_tokens(16, 224, 224, geom, s) / video_tokens(16, 224, 224, geom) == target
    sat = token_saturation_scale(224, 224, geom, cfg.s_max)
    assert float(proxy_cost(torch.full((16,), s), None, cfg, sat)) == pytest.approx(c_star)
    # the largest scale still at that retention (5 x 5 tokens up to s just below 0.6875): cost 0.5
    assert c_star == pytest.approx(0.5, abs=1e-5)
    # 0.39 (the former default) is the top of the 4 x 4-token step, next to the cost-space default 0.4
    assert target_cost_for_retention(0.39, 224, 224, 16, geom, cfg) == pytest.approx(0.4, abs=0.01)
    costs = [target_cost_for_retention(r, 224, 224, 16, geom, cfg) for r in (0.1, 0.15, 0.39, 1.0)]
    assert costs == sorted(costs) and costs[-1] == pytest.approx((sat - 0.125) / 1.125)  # saturated
    # a per-group c* moves the pivot of that group only
    cost = torch.full((2, 3), 0.5)
    pivot = dynamic_pivot(cost, cfg, torch.tensor([0.1, 0.9]))
    assert pivot.tolist() == pytest.approx([0.3, 0.7])


def test_budget_constraint_value_is_measured_gradient_is_the_square_proxy():
    from resadapt.capo import budget_constraint

    scales = torch.tensor([[1.0, 0.125, 0.5], [0.5, 0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    measured = torch.tensor([0.4, 0.2])  # what the operator counts (rounding to whole tokens)
    loss, r_det = budget_constraint(scales, mask, measured, target=0.15, coef=10.0)
    assert r_det.item() == pytest.approx(0.3)  # the value: measured retention, mean over the batch
    assert loss.item() == pytest.approx(10.0 * 0.15**2)
    (g,) = torch.autograd.grad(loss, scales)
    # d/ds_t of coef (R - R*)^2 through mean_b mean_t s_t^2: 2 coef (R - R*) * 2 s_t / (n_t B)
    expected = 2 * 10.0 * 0.15 * 2 * scales.detach() / torch.tensor([[3.0], [2.0]]) / 2
    torch.testing.assert_close(g, torch.where(mask, expected, torch.zeros_like(expected)))
    assert (
        budget_constraint(scales, mask, torch.tensor([0.15, 0.15]), 0.15, 10.0)[0].item() == 0.0
    )  # on target
    below = torch.autograd.grad(
        budget_constraint(scales, mask, torch.tensor([0.05, 0.05]), 0.15, 1.0)[0], scales
    )
    assert (below[0][mask] <= 0).all()  # under the budget the gradient step raises the scales
    with pytest.raises(ValueError, match="measured must be"):
        budget_constraint(scales, mask, torch.tensor([0.1]), 0.15, 1.0)
    with pytest.raises(ValueError, match="match mask"):
        budget_constraint(scales, mask[:, :2], measured, 0.15, 1.0)


def test_budget_constraint_per_prompt_pulls_each_prompt_onto_the_target():
    """Batch scope lets one prompt's overspend cancel another's underspend; prompt scope does not."""
    from resadapt.capo import budget_constraint

    scales = torch.tensor([[1.0, 0.5], [0.25, 0.25]], requires_grad=True)
    mask = torch.ones_like(scales, dtype=torch.bool)
    measured = torch.tensor([0.25, 0.05])  # mean 0.15: on target as a batch
    batch, r_batch = budget_constraint(scales, mask, measured, 0.15, 10.0, "batch")
    prompt, r_prompt = budget_constraint(scales, mask, measured, 0.15, 10.0, "prompt")
    assert batch.item() == pytest.approx(0.0) and r_batch.item() == pytest.approx(0.15)
    assert prompt.item() == pytest.approx(10.0 * 0.1**2) and r_prompt.item() == pytest.approx(0.15)
    (g,) = torch.autograd.grad(prompt, scales)
    assert (g[0] > 0).all() and (g[1] < 0).all()  # a descent step lowers the first, raises the second
    with pytest.raises(ValueError, match="scope must be"):
        budget_constraint(scales, mask, measured, 0.15, 10.0, "video")


@pytest.mark.parametrize("scope", ["batch", "prompt"])
def test_budget_constraint_over_processes_averages_to_the_global_gradient(scope):
    """Two processes, each with half the batch (and, for "batch", the gathered retention of all of it):
    their gradients averaged (the trainer's all-reduce) equal one process's gradient on the whole batch,
    and both report the global mean. Without the gather, "batch" would pull each half onto the target."""
    from resadapt.capo import budget_constraint

    torch.manual_seed(0)
    scales = torch.rand(4, 3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    measured = torch.tensor([0.30, 0.10, 0.12, 0.06])  # halves at 0.20 and 0.09: global mean 0.145
    whole, r_whole = budget_constraint(scales, mask, measured, 0.15, 10.0, scope)
    (g_whole,) = torch.autograd.grad(whole, scales)
    grads, means = [], []
    for half in (slice(0, 2), slice(2, 4)):
        gathered = measured if scope == "batch" else None
        loss, r = budget_constraint(scales[half], mask[half], measured[half], 0.15, 10.0, scope, gathered)
        grads.append(torch.autograd.grad(loss, scales)[0])
        means.append(r.item())
    torch.testing.assert_close((grads[0] + grads[1]) / 2, g_whole)
    if scope == "batch":
        assert means == pytest.approx([r_whole.item()] * 2)
        local = budget_constraint(scales[:2], mask[:2], measured[:2], 0.15, 10.0, scope)[0]
        assert (torch.autograd.grad(local, scales)[0][:2][mask[:2]] > 0).all()  # 0.20 alone: pushed down
        assert (grads[0][:2][mask[:2]] < 0).all()  # globally 0.145, under target: pushed up
    with pytest.raises(ValueError, match="whole number of shards"):
        budget_constraint(scales[:3], mask[:3], measured[:3], 0.15, 10.0, "batch", measured)
