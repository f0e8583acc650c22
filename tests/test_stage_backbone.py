"""Stage helpers: calibration metrics, the calibration's processes and the backbone stage's output rules (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from resadapt.backbone import POINTER
from resadapt.config import load_params, parse_params
from resadapt.stages.backbone import (
    backbone_stage,
    calibration_conditions,
    calibration_metrics,
    distinct_levels,
)

ROOT = Path(__file__).resolve().parents[1]


def _params(**backbone):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["backbone"].update(backbone)
    return parse_params(data)


def _table(full, low, oracle, anti, low_retention=0.14, upper=(0.3, 0.5, 0.7), task="detail_qa", chance=0.1):
    rows = [
        ("full", full, 1.0),
        ("uniform_0.25", 0.1, 0.06),
        ("uniform_0.35", low, low_retention),
        ("uniform_0.5", upper[0], 0.25),
        ("uniform_0.625", upper[1], 0.39),
        ("uniform_0.75", upper[2], 0.56),
        ("oracle", oracle, 0.139),
        ("anti_oracle", anti, 0.877),
    ]
    return pd.DataFrame(
        [
            {
                "task": task,
                "condition": c,
                "kind": "uniform" if c.startswith("uniform_") else c,
                "accuracy": a,
                "retention": r,
                "n": 150,
                "chance": chance,
            }
            for c, a, r in rows
        ]
    )


def test_conditions_follow_params():
    assert [c.name for c in calibration_conditions(_params())] == [
        "full",
        "uniform_0.25",
        "uniform_0.35",
        "uniform_0.5",
        "uniform_0.625",
        "uniform_0.75",
        "uniform_0.875",
        "oracle",
        "anti_oracle",
    ]


def test_checks_pass_for_a_separating_benchmark():
    checks = calibration_metrics(_table(0.95, 0.12, 0.93, 0.08), _params())["checks"]
    assert checks["uniform_low_condition"] == "uniform_0.35"  # the uniform point nearest 13.5% retention
    assert checks["full_at_least_0.90"] and checks["oracle_at_least_full_minus_0.05"]
    assert checks["uniform_low_at_most_chance_plus_0.15"] and checks["anti_oracle_at_most_chance_plus_0.15"]


@pytest.mark.parametrize(
    ("table", "failing"),
    [
        (_table(0.85, 0.12, 0.85, 0.08), "full_at_least_0.90"),
        (_table(0.95, 0.30, 0.93, 0.08), "uniform_low_at_most_chance_plus_0.15"),
        (_table(0.95, 0.12, 0.85, 0.08), "oracle_at_least_full_minus_0.05"),
        (_table(0.95, 0.12, 0.93, 0.40), "anti_oracle_at_most_chance_plus_0.15"),
        # everything below full at chance but one scale: two levels, not graded
        (_table(0.95, 0.12, 0.93, 0.08, upper=(0.1, 0.12, 0.6)), "uniform_at_least_3_levels"),
    ],
)
def test_each_check_can_fail(table, failing):
    checks = calibration_metrics(table, _params())["checks"]
    assert checks[failing] is False
    assert sum(v is False for v in checks.values()) == 1


def test_distinct_levels_merge_values_within_the_gap():
    assert distinct_levels([0.1, 0.12, 0.3, 0.33, 0.36, 0.9]) == [0.1, 0.3, 0.36, 0.9]
    assert distinct_levels([0.5, 0.5, 0.5]) == [0.5]


@pytest.mark.parametrize(("low", "holds"), [(0.9, True), (0.85, False)])
def test_coarse_task_is_checked_at_the_low_uniform_point(low, holds):
    coarse = _table(0.96, low, 0.96, 0.5, task="coarse_qa", chance=0.5)
    table = pd.concat([_table(0.95, 0.12, 0.93, 0.08), coarse], ignore_index=True)
    checks = calibration_metrics(table, _params())["checks"]["coarse"]
    assert checks["uniform_low_condition"] == "uniform_0.35"
    assert checks["uniform_low_at_least_full_minus_0.10"] is holds


def test_metrics_are_json_and_nested_per_task():
    metrics = calibration_metrics(_table(0.95, 0.12, 0.93, 0.08), _params())
    assert metrics["tasks"]["detail_qa"]["oracle"] == {"accuracy": 0.93, "retention": 0.139}
    json.dumps(metrics)


def test_backbone_stage_refuses_to_overwrite(tmp_path):
    out = tmp_path / "backbone"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already holds files"):
        backbone_stage(_params(path=str(out)))
    assert (out / "keep.txt").read_text() == "precious"


def test_path_profile_writes_a_pointer_not_a_copy(tmp_path):
    from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone, save_backbone

    model, processor = build_tiny_backbone(
        TinyBackboneSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    )
    ckpt = save_backbone(model, processor, tmp_path / "external")
    out = tmp_path / "out"
    params = _params(source="path", checkpoint=str(ckpt), path=str(out))
    _, _, log = backbone_stage(params)
    assert log.empty
    assert json.loads((out / POINTER).read_text())["checkpoint"] == str(ckpt.resolve())
    assert not (out / "model.safetensors").exists()


def test_path_profile_requires_an_existing_checkpoint(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["backbone"].update(source="path", checkpoint=str(tmp_path / "nowhere"))
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="backbone.checkpoint"):
        load_params(file)


def test_calibration_log_does_not_depend_on_the_number_of_processes(tmp_path, tiny_bench, tiny_backbone_dir):
    from conftest import tiny_params

    from resadapt.backbone import load_backbone
    from resadapt.stages.backbone import calibrate_backbone

    data = tiny_params(tmp_path, tiny_bench, tiny_backbone_dir)
    data["backbone"]["calibration"].update(max_samples_per_task=2, tasks=["detail_qa", "multi_frame"])
    model, processor = load_backbone(tiny_backbone_dir)
    logs = {}
    for workers in (1, 2):
        data["backbone"]["calibration"]["workers"] = workers
        per_sample, table = calibrate_backbone(parse_params(data), model, processor)
        logs[workers] = per_sample.drop(columns="seconds")
    conditions = calibration_conditions(parse_params(data))
    assert list(logs[1].condition.unique()) == [c.name for c in conditions]
    assert len(logs[1]) == len(conditions) * logs[1].id.nunique() > len(conditions)
    pd.testing.assert_frame_equal(logs[1], logs[2])
