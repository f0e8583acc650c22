"""CAPO (Cost-Aware Policy Optimization): advantages, cost proxy and Allocator regularizers.

Pure tensor functions, no model code (reference-implementation.md §3-4; paper §3.3-3.4). The Allocator is a
contextual bandit: per prompt it draws M allocations (one per-frame scale vector each, shared by that
allocation's N backbone rollouts, design decision 3); every allocation gets one scalar advantage that is
broadcast to its frames in a per-frame PPO surrogate.

Layout: every group function reduces over the **last** dimension. A single group is a tensor of shape
(M,); a batch of G groups is (G, M) (generally (..., M)), so the same call handles both. Flat trainer rows
with `M` consecutive allocations per prompt become (G, M) with `x.view(-1, M)`.

Why CAPO and not a plain penalty: a reward `acc - lam * cost` (see `lagrangian_advantage`) rewards every
cost cut identically whether or not it breaks the answer, and collapses the policy to the minimum budget.
CAPO couples the cost signal to correctness (asymmetric sigmoid shaping around a dynamic pivot) and floors
the advantage of correct allocations, so cost can never push probability away from a correct answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from resadapt.budget import VisionGeometry, token_saturation_scale, uniform_scale_for_retention
from resadapt.config import CAPOConfig

__all__ = [
    "CAPOConfig",
    "TemporalSimilarityConfig",
    "group_zscore",
    "dynamic_pivot",
    "asymmetric_shaping",
    "capo_advantage",
    "budget_constraint",
    "no_cost_advantage",
    "lagrangian_advantage",
    "proxy_cost",
    "target_cost_for_retention",
    "beta_log_prob",
    "ppo_frame_loss",
    "temporal_similarity_loss",
    "concentration_loss",
]

# Reference: a group whose accuracy std is below this gets base advantage 0 (no accuracy signal).
_STD_EPS = 1e-4
# Reference clamps the sampled latent away from 0 and 1 before taking the Beta log-density.
_U_EPS = 1e-6
# verl clamps the per-token log-ratio before exponentiating.
_LOG_RATIO_CLAMP = 20.0


def _check_number(
    owner: str,
    name: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Validate one numeric field and name it in the error (bools and NaN are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{owner}.{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{owner}.{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


@dataclass(frozen=True)
class TemporalSimilarityConfig:
    """Temporal-similarity regularizer settings (reference §4.1; authors' saved allocator config).

    `param_min`/`param_max` clamp alpha, beta before the Beta-mean log-scale proxy, as the reference does.
    """

    sim_tau: float = 0.55
    sim_temp: float = 0.12
    sim_gamma: float = 0.05
    s_min: float = 0.2
    s_max: float = 2.0
    param_min: float = 0.1
    param_max: float = 20.0

    def __post_init__(self) -> None:
        o = "TemporalSimilarityConfig"
        _check_number(o, "sim_tau", self.sim_tau, -1.0, 1.0)
        _check_number(o, "sim_temp", self.sim_temp, 0.0, lo_open=True)
        _check_number(o, "sim_gamma", self.sim_gamma, 0.0)
        _check_number(o, "s_min", self.s_min, 0.0, lo_open=True)
        _check_number(o, "s_max", self.s_max, 0.0, lo_open=True)
        if self.s_max <= self.s_min:
            raise ValueError(f"{o}.s_max ({self.s_max}) must be > {o}.s_min ({self.s_min})")
        _check_number(o, "param_min", self.param_min, 0.0, lo_open=True)
        _check_number(o, "param_max", self.param_max, 0.0, lo_open=True)
        if self.param_max <= self.param_min:
            raise ValueError(f"{o}.param_max ({self.param_max}) must be > {o}.param_min ({self.param_min})")


def _float(x: torch.Tensor | float, name: str) -> torch.Tensor:
    """Detached floating tensor (advantages are constants to the policy gradient)."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t.detach()


def _group_pair(acc: torch.Tensor | float, cost: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    a, c = _float(acc, "acc"), _float(cost, "cost")
    if a.ndim == 0:
        raise ValueError("acc must have a group dimension (shape (M,) or (G, M)), got a scalar")
    if a.shape != c.shape:
        raise ValueError(f"acc shape {tuple(a.shape)} and cost shape {tuple(c.shape)} differ")
    return a, c.to(a.dtype)


def group_zscore(acc: torch.Tensor) -> torch.Tensor:
    """GRPO base advantage: z-score over the last dim with population std; 0 where std < 1e-4.

    A group where every allocation scores the same carries no accuracy information, so it gets no
    accuracy signal instead of an amplified numerical noise one.
    """
    a = _float(acc, "acc")
    if a.ndim == 0:
        raise ValueError("acc must have a group dimension (shape (M,) or (G, M)), got a scalar")
    mean = a.mean(dim=-1, keepdim=True)
    std = a.std(dim=-1, unbiased=False, keepdim=True)
    ok = std >= _STD_EPS
    return torch.where(ok, (a - mean) / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(a))


def dynamic_pivot(
    cost: torch.Tensor, cfg: CAPOConfig, target: torch.Tensor | float | None = None
) -> torch.Tensor:
    """P = alpha_mix * mean(cost) + (1 - alpha_mix) * c*, one per group (shape cost.shape[:-1]).

    The group mean gives a state-aware local baseline; c* anchors the policy to the absolute target:
    `target` (a scalar or one per group, e.g. from `target_cost_for_retention`), else `cfg.target_cost`.
    """
    c = _float(cost, "cost")
    if c.ndim == 0:
        raise ValueError("cost must have a group dimension (shape (M,) or (G, M)), got a scalar")
    star = cfg.target_cost if target is None else _float(target, "target").to(c.dtype)
    return cfg.alpha_mix * c.mean(dim=-1) + (1.0 - cfg.alpha_mix) * star


def _correct(acc: torch.Tensor, cfg: CAPOConfig) -> torch.Tensor:
    return acc > cfg.correct_threshold


def asymmetric_shaping(
    acc: torch.Tensor, cost: torch.Tensor, pivot: torch.Tensor | float, cfg: CAPOConfig
) -> torch.Tensor:
    """Correctness-dependent cost signal around the pivot (before the `encouragement` factor).

    correct (acc > threshold): right_scale * max(acc^acc_pow, acc_floor) * (sigmoid((P - c)/tau) - 0.5),
    i.e. cheaper than the pivot is rewarded; wrong: wrong_scale * (1 - acc)^wrong_pow *
    (sigmoid((c - P)/tau) - 0.5), i.e. a wrong answer is told to spend *more*. `pivot` has shape
    acc.shape[:-1] (one per group) or is a scalar.
    """
    a, c = _group_pair(acc, cost)
    p = _float(pivot, "pivot").to(a.dtype).unsqueeze(-1)
    r_small = torch.sigmoid((p - c) / cfg.tau) - 0.5
    right = cfg.right_scale * torch.clamp(a.clamp(min=0.0) ** cfg.acc_pow, min=cfg.acc_floor) * r_small
    wrong = cfg.wrong_scale * (1.0 - a).clamp(min=0.0) ** cfg.wrong_pow * (-r_small)
    return torch.where(_correct(a, cfg), right, wrong)


def capo_advantage(
    acc: torch.Tensor, cost: torch.Tensor, cfg: CAPOConfig, target: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CAPO advantage per allocation: A0 + encouragement * shape - gas * cost, floored when correct.

    `acc` is each allocation's mean accuracy over its rollouts, `cost` its proxy cost (`proxy_cost`), both
    (M,) or (G, M); `target` is c* per group (default `cfg.target_cost`). Correct allocations get max(A, correct_floor) on the *whole* advantage (reference
    §3.2 step 8), so cost never pushes probability away from a correct answer. Groups with M <= 1 get 0
    (reference §3.1). Returns (advantages, parts) with the parts for logging: base, pivot (per group),
    shape, cost_pressure, correct, unfloored.
    """
    a, c = _group_pair(acc, cost)
    base = group_zscore(a)
    pivot = dynamic_pivot(c, cfg, target)
    shape = asymmetric_shaping(a, c, pivot, cfg)
    pressure = cfg.gas * c
    unfloored = base + cfg.encouragement * shape - pressure
    correct = _correct(a, cfg)
    adv = (
        torch.where(correct, unfloored.clamp(min=cfg.correct_floor), unfloored)
        if cfg.apply_floor
        else unfloored
    )
    if a.shape[-1] <= 1:
        adv = torch.zeros_like(a)
    parts = {
        "base": base,
        "pivot": pivot,
        "shape": shape,
        "cost_pressure": pressure,
        "correct": correct,
        "unfloored": unfloored,
    }
    return adv, parts


def budget_constraint(
    mean_scales: torch.Tensor,
    mask: torch.Tensor,
    measured: torch.Tensor,
    target: float,
    coef: float,
    scope: str = "batch",
    batch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rho * (R_det - R*)^2: the deterministic allocations' retention pulled onto the target.

    `mean_scales` (B, T) are the Beta-mean scales (differentiable), `measured` (B,) the retention the budget
    operator measures for them (token arithmetic, rounding included). The value is the measured one, the
    gradient that of the smooth proxy mean_t s_t^2 (tokens grow with the square of the scale), a
    straight-through estimate: the rounding to whole 28-px tokens has no gradient. `scope` "batch"
    constrains the batch mean (the paper's budget is an average), so one question may spend what another
    saves; "prompt" averages (R_det,i - R*)^2 over the prompts, so each lands on the budget by itself.

    Under several processes, `batch` is the measured R_det of the whole step's batch (gathered over the
    processes, these prompts included, each process holding as many): the "batch" mean is then the global
    one, its gradient flowing through this process's prompts only and scaled by the number of processes,
    so that gradients averaged over the processes equal the single-process gradient of the global batch.
    ("prompt" needs no gather: its mean over equal shards averages to the global one.)
    Returns (loss, mean R_det of the batch).
    """
    if scope not in ("batch", "prompt"):
        raise ValueError(f"budget_constraint: scope must be 'batch' or 'prompt', got {scope!r}")
    m = torch.as_tensor(mask, dtype=torch.bool)
    if mean_scales.shape != m.shape or mean_scales.ndim != 2:
        raise ValueError(
            f"mean_scales {tuple(mean_scales.shape)} must be (B, T) and match mask {tuple(m.shape)}"
        )
    measured = _float(measured, "measured").to(mean_scales.dtype)
    if measured.shape != mean_scales.shape[:1]:
        raise ValueError(
            f"measured must be (B,) = {tuple(mean_scales.shape[:1])}, got {tuple(measured.shape)}"
        )
    w = m.to(mean_scales.dtype)
    proxy = (mean_scales**2 * w).sum(-1) / w.sum(-1).clamp(min=1.0)
    r_det = proxy + (measured - proxy).detach()
    if scope == "prompt":
        return float(coef) * ((r_det - float(target)) ** 2).mean(), r_det.mean().detach()
    if batch is None:
        return float(coef) * (r_det.mean() - float(target)) ** 2, r_det.mean().detach()
    batch = _float(batch, "batch").to(mean_scales.dtype).reshape(-1)
    if batch.numel() % measured.numel():
        raise ValueError(
            f"batch holds {batch.numel()} values: not a whole number of shards of {measured.numel()} prompts"
        )
    processes = batch.numel() // measured.numel()
    total = r_det.sum() + (batch.sum() - measured.sum())  # value: the global sum; gradient: local prompts
    mean = total / batch.numel()
    return processes * float(coef) * (mean - float(target)) ** 2, mean.detach()


def no_cost_advantage(acc: torch.Tensor) -> torch.Tensor:
    """Ablation: plain GRPO z-score of accuracy; cost plays no role, so nothing pushes the budget down."""
    return group_zscore(acc)


def lagrangian_advantage(acc: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    """Ablation: z-score of the penalised reward acc - lam * cost (the paper's "direct cost penalty").

    Every cost reduction is rewarded the same whether or not it breaks the answer, which is what the
    paper reports collapsing the policy to the minimum budget.
    """
    lam = _check_number("lagrangian_advantage", "lam", lam)
    a, c = _group_pair(acc, cost)
    return group_zscore(a - lam * c)


def proxy_cost(
    frame_scales: torch.Tensor,
    mask: torch.Tensor | None,
    cfg: CAPOConfig,
    effective_max_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Normalised mean scale c = clamp((mean_s - s_min) / (s_max - s_min), 0, 1) per allocation.

    `frame_scales` is (..., T), `mask` (..., T) bool (None: all valid); returns shape (...). Linear in the
    scale like the authors' proxy (smoother than the quadratic token retention, paper §3.3), but each
    frame's scale is first clipped at `effective_max_scale` (scalar, or broadcastable to (..., T); from
    `token_saturation_scale`), so scale that adds no tokens costs nothing (design decision 2) -- the
    authors' proxy charges for it (reference §8.2). Clipping is per frame while the operator resizes per
    temporal chunk (chunk mean), so the proxy is exact only when a chunk's frames are both below or both
    above the cap. An allocation with no valid frame costs 0.
    """
    s = _float(frame_scales, "frame_scales")
    if s.ndim == 0:
        raise ValueError("frame_scales must have a frame dimension (..., T), got a scalar")
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    if m.shape != s.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} differs from frame_scales shape {tuple(s.shape)}")
    if effective_max_scale is not None:
        s = torch.minimum(s, _float(effective_max_scale, "effective_max_scale").to(s.dtype))
    valid = m.to(s.dtype)
    mean = torch.where(m, s, torch.zeros_like(s)).sum(-1) / valid.sum(-1).clamp(min=1.0)
    c = ((mean - cfg.s_min) / (cfg.s_max - cfg.s_min)).clamp(0.0, 1.0)
    return torch.where(m.any(-1), c, torch.zeros_like(c))


def target_cost_for_retention(
    retention: float, height: int, width: int, num_frames: int, geom: VisionGeometry, cfg: CAPOConfig
) -> float:
    """c* for a budget given as token retention R (the unit of every table): the proxy cost (`proxy_cost`,
    scales clipped at token saturation) of the uniform allocation at the largest scale whose measured
    retention is <= R, for a video of `num_frames` frames of `height` x `width`.

    The proxy is linear in the scale while tokens grow with its square, so one retention maps to one cost
    only for a given frame size; the trainer computes c* per prompt. An allocation exactly at retention R
    costs c* (tested).
    """
    s = uniform_scale_for_retention(retention, height, width, num_frames, geom, max_scale=cfg.s_max)
    saturation = token_saturation_scale(height, width, geom, cfg.s_max)
    return float(proxy_cost(torch.full((num_frames,), s, dtype=torch.float64), None, cfg, saturation))


def beta_log_prob(u: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-frame Beta log-density log pi(u) (the policy acts on the latent u, s = s_min + u (s_max - s_min)).

    u is clamped to [1e-6, 1 - 1e-6] as in the reference, so log-probs stay finite for sampled extremes.
    Never summed over frames: the PPO ratio is per frame (reference §3.5).
    """
    u = torch.as_tensor(u).clamp(_U_EPS, 1.0 - _U_EPS)
    log_norm = torch.lgamma(alpha + beta) - torch.lgamma(alpha) - torch.lgamma(beta)
    return (alpha - 1.0) * torch.log(u) + (beta - 1.0) * torch.log1p(-u) + log_norm


def ppo_frame_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages_per_allocation: torch.Tensor,
    frame_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-frame clipped PPO surrogate of the Allocator (verl `vanilla`, token-mean; reference §3.5).

    logp_* and frame_mask are (..., T), advantages (...,): one per allocation, broadcast to its frames.
    ratio_t = exp(logp_new - logp_old); loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and for
    A < 0 additionally min(., -A * dual_clip) so a huge ratio on a bad allocation cannot blow up the step.
    The loss is the mean over valid frames of all allocations (masked frames never touch the value or the
    gradient). Returns (loss, metrics) with clip fractions and the approximate KL for logging.
    """
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"ppo_frame_loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}"
        )
    if dual_clip <= 1.0:
        raise ValueError(f"ppo_frame_loss: dual_clip must be > 1, got {dual_clip}")
    if logp_new.shape != logp_old.shape or logp_new.shape != frame_mask.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and frame_mask "
            f"{tuple(frame_mask.shape)} must have the same shape"
        )
    adv = _float(advantages_per_allocation, "advantages_per_allocation").to(logp_new.dtype)
    if adv.shape != logp_new.shape[:-1]:
        raise ValueError(
            f"advantages_per_allocation shape {tuple(adv.shape)} must be the logp shape without the frame dim "
            f"{tuple(logp_new.shape[:-1])}"
        )
    a = adv.unsqueeze(-1).expand_as(logp_new)
    m = frame_mask.to(torch.bool)
    log_ratio = torch.where(m, logp_new - logp_old.detach(), torch.zeros_like(logp_new))
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    loss1 = -a * ratio
    loss2 = -a * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.minimum(clipped, -a * dual_clip)
    per_frame = torch.where(a < 0, dual, clipped)
    per_frame = torch.where(m, per_frame, torch.zeros_like(per_frame))
    n = m.sum().clamp(min=1).to(per_frame.dtype)
    loss = per_frame.sum() / n
    with torch.no_grad():
        mf = m.to(per_frame.dtype)
        metrics = {
            "clipfrac": ((loss2 > loss1).to(mf.dtype) * mf).sum() / n,
            "dual_clipfrac": (((a < 0) & (clipped > -a * dual_clip)).to(mf.dtype) * mf).sum() / n,
            "approx_kl": (0.5 * log_ratio**2 * mf).sum() / n,
            "ratio_mean": (ratio * mf).sum() / n,
        }
    return loss, metrics


def temporal_similarity_loss(
    features: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor,
    cfg_sim: TemporalSimilarityConfig | None = None,
) -> torch.Tensor:
    """Penalise a later frame not being smaller than a similar earlier one (reference §4.1).

    features (..., T, D), alpha/beta/mask (..., T). w_t = sigmoid((cos(f_t, f_{t+1}) - sim_tau)/sim_temp)
    from DETACHED features (design decision 4: the authors' version lets the allocator lower the loss by
    making features dissimilar instead of changing scales, reference §8.6). With the log-scale proxy
    s_t = log(s_min + mean_t (s_max - s_min)), mean_t = alpha/(alpha+beta) on alpha, beta clamped to
    [param_min, param_max]: L = sum_t m_t w_t relu(s_{t+1} - s_t + sim_gamma w_t) / sum_t m_t, with m_t
    true when both frames are valid. The gate is a sigmoid, so dissimilar pairs contribute ~0, not 0.
    """
    cfg = cfg_sim or TemporalSimilarityConfig()
    if features.shape[:-1] != alpha.shape or alpha.shape != beta.shape or alpha.shape != mask.shape:
        raise ValueError(
            f"features {tuple(features.shape)} must be (..., T, D) and alpha {tuple(alpha.shape)}, "
            f"beta {tuple(beta.shape)}, mask {tuple(mask.shape)} (..., T)"
        )
    if alpha.shape[-1] < 2:
        return (alpha.sum() + beta.sum()) * 0.0
    f = features.detach()
    sim = F.cosine_similarity(f[..., :-1, :], f[..., 1:, :], dim=-1, eps=1e-8)
    w = torch.sigmoid((sim - cfg.sim_tau) / cfg.sim_temp)
    a = alpha.clamp(cfg.param_min, cfg.param_max)
    b = beta.clamp(cfg.param_min, cfg.param_max)
    log_s = torch.log(cfg.s_min + a / (a + b) * (cfg.s_max - cfg.s_min))
    m = mask.to(torch.bool)
    pair = m[..., :-1] & m[..., 1:]
    term = w * F.relu(log_s[..., 1:] - (log_s[..., :-1] - cfg.sim_gamma * w))
    term = torch.where(pair, term, torch.zeros_like(term))
    return term.sum() / pair.sum().clamp(min=1).to(term.dtype)


def concentration_loss(
    alpha: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor, cap: float | None = None
) -> torch.Tensor:
    """Keep the Beta policies from collapsing to spikes, so the Allocator keeps exploring.

    Default (cap=None) is the reference's code (§4.2): mean over valid frames of alpha + beta. With `cap`,
    the paper text's soft cap: mean over valid frames of relu(alpha + beta - cap), which only acts on
    frames whose total concentration exceeds `cap`.
    """
    if alpha.shape != beta.shape or alpha.shape != mask.shape:
        raise ValueError(
            f"alpha {tuple(alpha.shape)}, beta {tuple(beta.shape)} and mask {tuple(mask.shape)} must match"
        )
    total = alpha + beta
    if cap is not None:
        cap = _check_number("concentration_loss", "cap", cap, 0.0)
        total = F.relu(total - cap)
    m = mask.to(torch.bool)
    total = torch.where(m, total, torch.zeros_like(total))
    return total.sum() / m.sum().clamp(min=1).to(total.dtype)
