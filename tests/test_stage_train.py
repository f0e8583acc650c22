"""The train and ablation stages: run identity for resume, and the acceptance checks on synthetic tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_params

from resadapt.config import parse_params
from resadapt.stages.ablation import ablation_checks, checks_over_seeds, finals_table
from resadapt.stages.train import (
    compare_train_metrics,
    fingerprint,
    seed_summary,
    seed_table,
    train_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path, **train):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["data"]["root"] = str(tmp_path / "data")
    data["backbone"]["path"] = str(tmp_path / "backbone")
    data["train"].update(train)
    return parse_params(data)


def test_fingerprint_names_one_configuration(tmp_path):
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "model.safetensors").write_bytes(b"x" * 10)
    p = _params(tmp_path)
    same = fingerprint(p, p.train, "capo", 10)
    assert same == fingerprint(_params(tmp_path), p.train, "capo", 10)
    assert same != fingerprint(p, p.train, "no_cost", 10)
    assert same != fingerprint(p, p.train, "capo", 11)
    q = _params(tmp_path, learning_rate=0.01)
    assert same != fingerprint(q, q.train, "capo", 10)
    v = _params(tmp_path, backend="vllm")  # rollouts from another engine: another run
    assert same != fingerprint(v, v.train, "capo", 10)
    (tmp_path / "backbone" / "model.safetensors").write_bytes(b"x" * 11)  # another backbone
    assert same != fingerprint(p, p.train, "capo", 10)


def _table(acc):
    rows = []
    for method, (a, r) in acc.items():
        rows += [
            {"id": i, "task": "detail_qa", "method": method, "score": a, "retention": r} for i in range(4)
        ]
    return pd.DataFrame(rows)


GOOD = {
    "resadapt": (0.9, 0.41),
    "resadapt_hard": (0.88, 0.15),
    "fixed_scale": (0.1, 0.41),
    "fixed_scale_hard": (0.1, 0.14),
    "oracle": (0.95, 0.139),
    "oracle_own": (0.98, 0.4),
    "prior_only": (0.5, 0.9),
    "prior_only_own": (0.7, 0.4),
    "prior_only_hard": (0.7, 0.15),
    "full": (0.93, 1.0),
}
GAP = {"gap": 0.5, "evidence_scale": 1.0, "other_scale": 0.5}


def test_the_train_reports_oracle_retries_what_it_got_wrong_with_its_alternatives():
    """The same upper bound as the evaluator's: the Oracle's plan drops the timeline at 0.10 (wrong for a
    reader that needs every chunk), its first alternative keeps it (right), at the same retention."""
    from types import SimpleNamespace

    import numpy as np

    from resadapt.budget import VisionGeometry
    from resadapt.data.sample import LoadedSample
    from resadapt.stages.train import compare_allocations

    row = {"id": "v", "task": "detail_qa", "question": "q", "answer": "7", "options": [], "answer_span": []}
    frames = np.random.default_rng(0).integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
    sample = LoadedSample(
        row | {"media_type": "video"}, frames, list(range(16)), 2.0, np.isin(range(16), [4, 5])
    )
    trainer = SimpleNamespace(
        geometry=VisionGeometry(max_pixels=224 * 224, min_pixels=28 * 28),
        allocator=SimpleNamespace(config=SimpleNamespace(s_min=0.125)),
        args=SimpleNamespace(seed=0),
        allocator_tokenizer=None,
        sample=lambda r: sample,
        greedy_scores=lambda items, max_new_tokens=None: [
            float(len(i["visual"].chunks) == 8 and max_new_tokens == 12) for i in items
        ],
    )
    table = compare_allocations(trainer, [row], 0.10, rows=("oracle", "full"), max_new_tokens=12)
    table = table.set_index("method")
    assert table.loc["oracle", "score"] == 1.0 and table.loc["oracle", "retention"] <= 0.10
    assert table.loc["full", "score"] == 1.0, "the report answers at the evaluation's length"


def test_train_metrics_checks_follow_the_issue_bars():
    m = train_metrics(_table(GOOD), GAP, 0.15, target_retention=0.39)
    assert all(m["checks"]["resadapt"].values()) and all(m["checks"]["resadapt_hard"].values())
    assert m["checks"]["evidence_gap_ge_0.3"] and m["target_retention"] == 0.39
    bad = _table(GOOD | {"resadapt": (0.8, 0.6), "fixed_scale": (0.7, 0.6), "resadapt_hard": (0.75, 0.16)})
    m = train_metrics(bad, GAP | {"gap": 0.1}, 0.15, target_retention=0.39)
    assert m["checks"]["resadapt"] == {
        "retention_within_0.03_of_target": False,  # 0.6 vs 0.39
        "at_least_85pct_of_oracle": False,  # 0.8 < 0.85 x 0.98
        "beats_fixed_scale_by_15_points": False,
        "beats_prior_only_by_10_points": True,  # 0.8 >= 0.7 + 0.1
    }
    assert m["checks"]["resadapt_hard"] == {
        "retention_le_operating": False,
        "at_least_85pct_of_oracle": False,  # 0.75 < 0.85 x 0.95
        "beats_fixed_scale_by_15_points": True,
        "beats_prior_only_by_10_points": False,
    }
    assert not m["checks"]["evidence_gap_ge_0.3"]
    without_prior = _table({k: v for k, v in GOOD.items() if not k.startswith("prior")})
    assert (
        "beats_prior_only_by_10_points"
        not in train_metrics(without_prior, GAP, 0.15, 0.39)["checks"]["resadapt"]
    )
    side = compare_train_metrics(m, train_metrics(_table(GOOD), GAP, 0.15, 0.39))
    assert side.loc["resadapt", ["accuracy", "other_accuracy"]].tolist() == [0.8, 0.9]
    assert side.loc["evidence_gap", ["accuracy", "other_accuracy"]].tolist() == [0.1, 0.5]


def test_seed_summary_gives_mean_sd_and_the_seeds_each_check_fails_on():
    per_seed = {
        0: train_metrics(_table(GOOD), GAP, 0.15, 0.39),
        1: train_metrics(_table(GOOD | {"resadapt": (0.84, 0.45)}), GAP | {"gap": 0.2}, 0.15, 0.39),
        2: train_metrics(_table(GOOD | {"resadapt": (0.96, 0.40)}), GAP, 0.15, 0.39),
    }
    summary = seed_summary(per_seed)
    assert set(summary["seeds"]) == {"0", "1", "2"} and summary["target_retention"] == 0.39
    assert summary["mean"]["methods"]["resadapt"]["accuracy"] == pytest.approx(0.9)
    assert summary["sd"]["methods"]["resadapt"]["accuracy"] == pytest.approx(0.06)  # sample sd of .9 .84 .96
    assert summary["sd"]["methods"]["full"]["accuracy"] == 0.0
    every = summary["checks"]["every_seed"]
    assert every["resadapt/retention_within_0.03_of_target"] == {"holds": False, "failing_seeds": [1]}
    assert every["evidence_gap_ge_0.3"] == {"holds": False, "failing_seeds": [1]}
    assert every["resadapt_hard/retention_le_operating"] == {"holds": True, "failing_seeds": []}
    # on the mean: 0.9 >= 0.9 x 0.98 (the Oracle at the same retention), 0.9 >= 0.7 + 0.1 (prior only)
    assert summary["checks"]["mean_over_seeds"]["resadapt/at_least_90pct_of_oracle"]
    assert summary["checks"]["mean_over_seeds"]["resadapt/beats_prior_only_by_10_points"]
    table = seed_table(summary)
    assert table.loc["resadapt", ("seed 1", "accuracy")] == 0.84
    assert table.loc["evidence_gap", ("mean", "accuracy")] == pytest.approx(0.4)
    assert list(table.index)[:2] == ["resadapt", "resadapt_hard"]


def _ablation_val(seed=0):
    return pd.DataFrame(
        {
            "objective": ["no_cost", "no_cost", "lagrangian", "lagrangian", "capo", "capo"],
            "step": [10, 60] * 3,
            "eval_mean_scale": [0.7, 1.2, 0.7, 0.2, 0.7, 0.6],
            "seed": seed,
        }
    )


def _finals():
    return {
        "no_cost": {"accuracy": 0.9, "retention": 0.9, "final_val_mean_scale": 1.2},
        "lagrangian": {"accuracy": 0.2, "retention": 0.05, "final_val_mean_scale": 0.2},
        "capo": {"accuracy": 0.88, "retention": 0.42, "final_val_mean_scale": 0.6},
    }


def test_ablation_checks():
    val, finals = _ablation_val(), _finals()
    checks = ablation_checks(finals, val, target_retention=0.39)
    assert checks == {
        "complete": True,
        "no_cost_drifts_up": True,
        "lagrangian_collapses_with_accuracy_drop_0.3": True,
        "capo_between": True,
        "capo_retention_within_0.05_of_target": True,
        "capo_accuracy_within_0.05_of_no_cost": True,
    }
    assert not ablation_checks(finals, val, target_retention=0.3)["capo_retention_within_0.05_of_target"]
    finals["capo"]["final_val_mean_scale"] = 1.3
    assert not ablation_checks(finals, val, 0.39)["capo_between"]
    assert ablation_checks({"capo": finals["capo"]}, val, 0.39) == {"complete": False}


def test_no_cost_drift_needs_a_real_rise():
    """A run saturated from its first point rises by float noise only: not a drift."""
    val, finals = _ablation_val(), _finals()
    val.loc[val.objective == "no_cost", "eval_mean_scale"] = [1.0022313, 1.0022314]
    finals["no_cost"]["final_val_mean_scale"] = 1.0022314
    assert not ablation_checks(finals, val, target_retention=0.39)["no_cost_drifts_up"]


def test_ablation_runs_start_from_the_untrained_allocator(
    tmp_path, tiny_bench, tiny_backbone_dir, tiny_backbone
):
    from resadapt.stages.ablation import ablation_seed

    data = tiny_params(tmp_path, tiny_bench, tiny_backbone_dir, seeds=[0])
    data["ablation"].update(objectives=["no_cost", "capo"], max_steps=2, eval_steps=2, test_samples=2)
    data["ablation"]["checkpoints"] = str(tmp_path / "ablation")
    model, processor = tiny_backbone
    val, finals = ablation_seed(parse_params(data), model, processor)
    assert set(finals) == {"no_cost", "capo"}
    assert val.groupby("objective").step.apply(list).to_dict() == {"no_cost": [0, 2], "capo": [0, 2]}
    start = val[val.step == 0].drop(columns="objective")
    assert len(start.drop_duplicates()) == 1  # both objectives start from the same Allocator


def test_ablation_checks_over_seeds_name_the_failing_seeds():
    val = pd.concat([_ablation_val(0), _ablation_val(1)], ignore_index=True)
    bad = _finals()
    bad["lagrangian"]["accuracy"] = 0.7  # a drop of only 0.2 on seed 1
    checks = checks_over_seeds({0: _finals(), 1: bad}, val, 0.39)
    assert checks["every_seed"]["lagrangian_collapses_with_accuracy_drop_0.3"] == {
        "holds": False,
        "failing_seeds": [1],
    }
    assert checks["every_seed"]["no_cost_drifts_up"]["holds"]
    assert checks["seeds"]["0"]["capo_between"]
    table = finals_table({0: _finals(), 1: bad})
    assert table.loc["lagrangian", "accuracy mean"] == pytest.approx(0.45)


def test_build_allocator_draws_its_weights_from_the_seed(tmp_path, tiny_backbone):
    """The same params.seed gives the same initial Allocator whatever the global RNG state (a fresh process
    starts from a random one), and the global state is left as it was."""
    import torch

    from resadapt.allocator import build_allocator

    model, _ = tiny_backbone
    p = _params(tmp_path)
    torch.manual_seed(1)
    a = build_allocator(p, model)
    after = torch.rand(1)
    torch.manual_seed(2)
    b = build_allocator(p, model)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)  # the global RNG did not move
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    other = build_allocator(parse_params(_params(tmp_path).model_dump() | {"seed": 1}), model)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), other.parameters(), strict=True))


def test_train_seeds_in_parallel_processes_are_bit_identical_when_rerun(
    tmp_path, tiny_bench, tiny_backbone_dir
):
    """The train stage's seeds, two spawned processes: each seed's Allocator is saved in its own folder,
    differs from the other seed's, and a second run from scratch gives the same bytes; the report has every
    row, the prior-only ones included, and the seed-independent rows once over the seeds' shares."""
    from safetensors.torch import load_file

    from resadapt.stages.train import SHARED_ROWS, seed_summary, train_seeds

    def params(run: str):
        return parse_params(tiny_params(tmp_path / run, tiny_bench, tiny_backbone_dir))

    weights = {}
    for run in ("a", "b"):
        p = params(run)
        per_seed = train_seeds(p, plots_dir=tmp_path / run / "plots")
        assert sorted(per_seed) == [0, 1]
        for s in (0, 1):
            assert per_seed[s]["kept_step"] == per_seed[s]["train_steps"] == 2  # the one validated checkpoint
            weights[run, s] = load_file(str(p.allocator.seed_path(s) / "model.safetensors"))
            assert (tmp_path / run / "plots" / "seeds" / f"seed_{s}" / "allocations.png").exists()
        for r in SHARED_ROWS:  # scored once, one test row by each seed, the same in both reports
            assert (
                per_seed[0]["methods"][r] == per_seed[1]["methods"][r] and per_seed[1]["methods"][r]["n"] == 2
            )
        summary = seed_summary(per_seed)
        assert {"prior_only", "prior_only_own", "oracle_own", "resadapt"} <= set(summary["mean"]["methods"])
    head = next(k for k in weights["a", 0] if "head" in k or "out" in k)
    assert not torch.equal(weights["a", 0][head], weights["a", 1][head]), (
        "two seeds trained the same Allocator"
    )
    for s in (0, 1):
        for k, v in weights["a", s].items():
            assert torch.equal(v, weights["b", s][k]), f"seed {s}: {k} differs between two runs"


def test_sweep_settings_validate_every_combination_before_running(tmp_path):
    from resadapt.config import ConfigError
    from resadapt.stages.sweep import parse_assignment, settings

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    grid = [parse_assignment("train.learning_rate=1e-3,3e-3"), parse_assignment("train.capo.gas=0.05,0.2")]
    out = settings(base, grid, max_steps=7)
    assert [c for c, _ in out] == [
        {"train.learning_rate": 0.001, "train.capo.gas": 0.05},
        {"train.learning_rate": 0.001, "train.capo.gas": 0.2},
        {"train.learning_rate": 0.003, "train.capo.gas": 0.05},
        {"train.learning_rate": 0.003, "train.capo.gas": 0.2},
    ]
    assert out[3][1].train.capo.gas == 0.2 and out[3][1].train.max_steps == 7
    assert base["train"]["learning_rate"] == 0.003 and base["train"]["max_steps"] == 150  # not mutated
    with pytest.raises(ConfigError, match="train.learnin_rate"):
        settings(base, [parse_assignment("train.learnin_rate=1")], None)
    with pytest.raises(ConfigError, match="learning_rate"):
        settings(base, [parse_assignment("train.learning_rate=-1")], None)
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_assignment("train.learning_rate")


def test_sweep_writes_a_val_table_per_setting_and_seed(tmp_path, tiny_bench, tiny_backbone_dir):
    from resadapt.stages.sweep import parse_assignment, run_sweep, summary

    base = tmp_path / "params.yaml"
    tasks = ["detail_qa", "multi_frame"]
    base.write_text(
        yaml.safe_dump(tiny_params(tmp_path, tiny_bench, tiny_backbone_dir, workers=1, tasks=tasks))
    )
    grid = [parse_assignment("train.learning_rate=1e-3,1e-2")]
    table = run_sweep(base, grid, tmp_path / "sweep")
    assert len(table) == 4 and sorted(set(table.seed)) == [0, 1]
    assert table["val_retention"].between(0, 1).all() and table["val_accuracy"].between(0, 1).all()
    for task in tasks:  # per-task columns: every family's own accuracy and retention
        assert table[f"val_{task}_accuracy"].between(0, 1).all()
        assert table[f"val_{task}_retention"].between(0, 1).all()
    assert (table.steps == 2).all()
    assert pd.read_csv(tmp_path / "sweep" / "val_table.csv").shape == table.shape
    assert list(summary(table, ["train.learning_rate"]).index) == [0.001, 0.01]


def test_even_task_mix_gives_every_task_the_same_share():
    from resadapt.stages.train import even_task_mix

    rows = [{"id": f"d{i}", "task": "detail_qa", "question": "q"} for i in range(8)]
    rows += [{"id": f"l{i}", "task": "long_video", "question": "q"} for i in range(2)]
    mix = even_task_mix(rows)
    tasks = mix["task"]
    assert tasks.count("detail_qa") == tasks.count("long_video") == 8  # the small task repeated
    assert set(mix["id"]) == {r["id"] for r in rows}  # nothing dropped
    assert mix["prompt"] == ["q"] * 16
    assert len(even_task_mix(rows[:8])) == 8  # one task: the rows as they are


def test_select_checkpoint_keeps_the_latest_val_point_within_the_tolerance(
    tmp_path, tiny_bench, tiny_backbone_dir, tiny_backbone
):
    """Three validated checkpoints: the kept one is the latest within the tolerance of the target, not the
    last; with none within, the closest; its weights are loaded."""
    from safetensors.torch import load_file

    from resadapt.stages.train import run, select_checkpoint

    model, processor = tiny_backbone
    p = parse_params(
        tiny_params(
            tmp_path, tiny_bench, tiny_backbone_dir, seeds=[0], max_steps=3, eval_steps=1, save_steps=1
        )
    )
    trainer = run(p, p.train, model, processor, tmp_path / "runs")
    val = {1: 0.13, 2: 0.16, 3: 0.20}  # step: val retention
    for h in trainer.state.log_history:
        if "eval_retention" in h:
            h["eval_retention"] = val[h["step"]]
    run_dir = Path(trainer.args.output_dir)

    def weights(step):
        return load_file(str(run_dir / f"checkpoint-{step}" / "allocator" / "model.safetensors"))

    assert not all(torch.equal(v, weights(3)[k]) for k, v in weights(2).items())  # the steps differ
    assert select_checkpoint(trainer, 0.15, 0.03) == 2
    for k, v in trainer.allocator.state_dict().items():
        assert torch.equal(v, weights(2)[k]), f"{k} is not checkpoint-2's"
    assert select_checkpoint(trainer, 0.15, 0.03) == 2  # loading again is harmless
    assert select_checkpoint(trainer, 0.12, 0.015) == 1  # only the first within
    assert select_checkpoint(trainer, 0.30, 0.03) == 3  # none within: the closest (0.20)
    for k, v in trainer.allocator.state_dict().items():
        assert torch.equal(v, weights(3)[k])


def test_val_checkpoint_selection_needs_a_checkpoint_at_every_validation(tmp_path):
    with pytest.raises(ValueError, match="eval_steps .* multiple of train.save_steps"):
        _params(tmp_path, checkpoint_selection="val", eval_steps=15, save_steps=10)
    assert _params(tmp_path, checkpoint_selection="last", eval_steps=15, save_steps=10).train.eval_steps == 15
