"""The train and ablation stages: run identity for resume, and the acceptance checks on synthetic tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from resadapt.config import parse_params
from resadapt.stages.ablation import ablation_checks
from resadapt.stages.train import compare_train_metrics, fingerprint, train_metrics

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


def test_train_metrics_checks_follow_the_issue_bars():
    good = _table(
        {
            "resadapt": (0.9, 0.14),
            "resadapt_hard": (0.88, 0.15),
            "fixed_scale": (0.1, 0.14),
            "fixed_scale_hard": (0.1, 0.14),
            "oracle": (0.95, 0.139),
            "full": (0.93, 1.0),
        }
    )
    m = train_metrics(good, {"gap": 0.5, "evidence_scale": 1.0, "other_scale": 0.5}, 0.15)
    assert all(m["checks"]["resadapt"].values()) and m["checks"]["evidence_gap_ge_0.3"]
    bad = _table(
        {
            "resadapt": (0.3, 0.6),
            "resadapt_hard": (0.5, 0.15),
            "fixed_scale": (0.4, 0.6),
            "fixed_scale_hard": (0.3, 0.14),
            "oracle": (0.95, 0.139),
            "full": (0.93, 1.0),
        }
    )
    m = train_metrics(bad, {"gap": 0.1, "evidence_scale": 0.8, "other_scale": 0.7}, 0.15)
    assert m["checks"]["resadapt"] == {
        "retention_le_0.15": False,
        "beats_fixed_scale_by_15_points": False,
        "at_least_90pct_of_oracle": False,
    }
    assert m["checks"]["resadapt_hard"]["retention_le_0.15"] and not m["checks"]["evidence_gap_ge_0.3"]
    side = compare_train_metrics(m, train_metrics(good, {"gap": 0.5}, 0.15))
    assert side.loc["resadapt", ["accuracy", "other_accuracy"]].tolist() == [0.3, 0.9]
    assert side.loc["evidence_gap", ["accuracy", "other_accuracy"]].tolist() == [0.1, 0.5]


def test_ablation_checks():
    val = pd.DataFrame(
        {
            "objective": ["no_cost", "no_cost", "lagrangian", "lagrangian", "capo", "capo"],
            "step": [10, 60] * 3,
            "eval_mean_scale": [0.7, 1.2, 0.7, 0.2, 0.7, 0.6],
        }
    )
    finals = {
        "no_cost": {"accuracy": 0.9, "final_val_mean_scale": 1.2},
        "lagrangian": {"accuracy": 0.2, "final_val_mean_scale": 0.2},
        "capo": {"accuracy": 0.88, "final_val_mean_scale": 0.6},
    }
    checks = ablation_checks(finals, val)
    assert checks == {
        "complete": True,
        "no_cost_drifts_up": True,
        "lagrangian_collapses_with_accuracy_drop": True,
        "capo_between": True,
        "capo_accuracy_near_no_cost": True,
    }
    finals["capo"]["final_val_mean_scale"] = 1.3
    assert not ablation_checks(finals, val)["capo_between"]
    assert ablation_checks({"capo": finals["capo"]}, val) == {"complete": False}


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
