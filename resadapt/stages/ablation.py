"""The `ablation` stage: the same CAPO training under each objective (no cost, a direct cost penalty, CAPO),
shorter, and the paper's collapse figure from their validation mean scales."""

from __future__ import annotations

import tempfile
import time

import pandas as pd

from resadapt.config import Params
from resadapt.data.embedded import split_rows
from resadapt.stages.train import (
    compare_allocations,
    every_seed,
    log_frames,
    make_trainer,
    over_seeds,
    rollout_engine,
    run,
)


def ablation_seed(params: Params, model, processor) -> tuple[pd.DataFrame, dict]:
    """One seed: each `ablation.objectives` run (resumed or loaded when it exists) and its deterministic
    Allocator on the detail-QA test rows: (validation log with an `objective` column, starting at step 0
    with the untrained Allocator every objective starts from, and final figures per objective)."""
    rl = params.train.model_copy(
        update={
            "lagrangian_lambda": params.ablation.lagrangian_lambda,
            "eval_steps": params.ablation.eval_steps,
        }
    )
    test_rows = split_rows(params.data.root, "test", ["detail_qa"], params.ablation.test_samples)
    with tempfile.TemporaryDirectory() as tmp:  # where every objective starts: the untrained Allocator
        start = make_trainer(
            params, rl, model, processor, tmp, max_steps=params.ablation.max_steps
        ).evaluate()
    vals, finals = [], {}
    with rollout_engine(params, rl, processor) as engine:  # one vLLM server for every run
        for objective in params.ablation.objectives:
            t0 = time.time()
            trainer = run(
                params,
                rl,
                model,
                processor,
                params.ablation.checkpoints,
                objective,
                params.ablation.max_steps,
                engine,
            )
            _, val = log_frames(trainer)
            val = pd.concat([pd.DataFrame([{"step": 0} | start]), val], ignore_index=True)
            vals.append(val.assign(objective=objective))
            scores = compare_allocations(
                trainer,
                test_rows,
                1.0,
                rows=("resadapt",),
                max_new_tokens=params.backbone.generation.max_new_tokens,
            )
            finals[objective] = {
                "accuracy": float(scores.score.mean()),
                "retention": float(scores.retention.mean()),
                "final_val_mean_scale": float(val.eval_mean_scale.iloc[-1]),
                "seconds_this_session": round(time.time() - t0, 1),
            }
            print(f"seed {params.seed}", objective, finals[objective], flush=True)
    return pd.concat(vals, ignore_index=True), finals


def ablation_runs(params: Params, workers: int | None = None) -> tuple[pd.DataFrame, dict[int, dict]]:
    """`ablation_seed` for every `train.seeds` (in parallel processes, `over_seeds`): the validation logs
    with `seed` and `objective` columns, and {seed: final figures per objective}."""
    out = over_seeds(ablation_seed, params, workers)
    val = pd.concat([v.assign(seed=s) for s, (v, _) in sorted(out.items())], ignore_index=True)
    return val, {s: finals for s, (_, finals) in sorted(out.items())}


def plot_ablation(val: pd.DataFrame, s_min: float, s_max: float):
    """The paper's collapse figure: validation mean scale over steps, one line per objective (the mean over
    seeds, with a band from the lowest to the highest seed)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    band = {"errorbar": ("pi", 100)}  # the band spans every seed
    sns.lineplot(data=val, x="step", y="eval_mean_scale", hue="objective", marker="o", ax=axes[0], **band)
    for y in (s_min, s_max):
        axes[0].axhline(y, color="grey", ls=":", lw=0.8)
    axes[0].set(title="validation mean scale (deterministic)", ylabel="mean scale")
    if "eval_accuracy" in val:
        sns.lineplot(
            data=val,
            x="step",
            y="eval_accuracy",
            hue="objective",
            marker="o",
            ax=axes[1],
            legend=False,
            **band,
        )
        axes[1].set(title="validation accuracy", ylabel="accuracy")
    fig.tight_layout()
    return fig


# How far no_cost's val mean scale must rise to count as a drift: one run passed the bare ">" by 3e-8 (float
# noise) while saturated from its first validation point on.
DRIFT = 0.05


def ablation_checks(finals: dict, val: pd.DataFrame, target_retention: float) -> dict:
    """One seed's expectations for the collapse ablation, measured (reported, not asserted).

    no_cost drifts up (final mean scale at least `DRIFT` above its first validation point, step 0: the
    untrained Allocator; a run saturated by its first trained point still counts); the direct penalty collapses
    toward s_min (below CAPO) with an accuracy drop of at least 0.30 against no_cost; CAPO ends between
    them, its retention within 0.05 of `target_retention` and its accuracy within 0.05 of no_cost's.
    """
    need = {"no_cost", "lagrangian", "capo"}
    if not need <= set(finals):
        return {"complete": False}
    first = {
        k: float(v) for k, v in val.sort_values("step").groupby("objective").eval_mean_scale.first().items()
    }
    scale = {k: v["final_val_mean_scale"] for k, v in finals.items()}
    acc = {k: v["accuracy"] for k, v in finals.items()}
    return {
        "complete": True,
        "no_cost_drifts_up": bool(scale["no_cost"] >= first["no_cost"] + DRIFT),
        "lagrangian_collapses_with_accuracy_drop_0.3": bool(
            scale["lagrangian"] < scale["capo"] and acc["lagrangian"] <= acc["no_cost"] - 0.3
        ),
        "capo_between": bool(scale["lagrangian"] <= scale["capo"] <= scale["no_cost"]),
        "capo_retention_within_0.05_of_target": bool(
            abs(finals["capo"]["retention"] - target_retention) <= 0.05
        ),
        "capo_accuracy_within_0.05_of_no_cost": bool(acc["capo"] >= acc["no_cost"] - 0.05),
    }


def checks_over_seeds(finals: dict[int, dict], val: pd.DataFrame, target_retention: float) -> dict:
    """`ablation_checks` per seed, and each check over seeds: it holds when it holds on every seed."""
    per_seed = {
        s: ablation_checks(f, val[val.seed == s], target_retention) for s, f in sorted(finals.items())
    }
    return {"every_seed": every_seed(per_seed), "seeds": {str(s): c for s, c in per_seed.items()}}


def finals_table(finals: dict[int, dict]) -> pd.DataFrame:
    """Test accuracy, retention and final validation mean scale per (objective, seed), then mean and sd."""
    rows = [{"objective": o, "seed": s} | v for s, f in finals.items() for o, v in f.items()]
    df = pd.DataFrame(rows).drop(columns="seconds_this_session", errors="ignore")
    stats = df.groupby("objective").agg(["mean", "std"]).drop(columns="seed")
    stats.columns = [f"{c} {a}" for c, a in stats.columns]
    return stats.round(3)
