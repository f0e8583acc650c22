"""Tests for resadapt.config: the shipped params.yaml loads, and every bad value stops with a clear message."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from resadapt.config import ConfigError, Params, load_params

PARAMS_YAML = Path(__file__).resolve().parent.parent / "params.yaml"


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


def _write(tmp_path: Path, data: dict, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _variant(base: dict, edit: Callable[[dict], None]) -> dict:
    data = copy.deepcopy(base)
    edit(data)
    return data


def _error(tmp_path: Path, data: dict) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message  # the message names the file
    return message


def test_shipped_params_load() -> None:
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    assert params.data.frame_size % 28 == 0 and params.data.num_frames % 2 == 0
    assert params.budget.s_min < params.budget.s_max
    assert all(0.0 < b <= 1.0 for b in params.evaluate.budgets)
    assert params.backbone.source == "tiny"


def test_round_trip_of_unmodified_copy_loads(tmp_path: Path, base: dict) -> None:
    """The variant machinery itself produces a valid file when nothing is changed."""
    assert load_params(_write(tmp_path, copy.deepcopy(base))) == load_params(PARAMS_YAML)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(data: dict) -> None:
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "key", "allowed"),
    [
        pytest.param(
            _set("evaluate", "budgets", [0.0]), "evaluate.budgets", "must be in (0.0, 1.0]", id="budget-0"
        ),
        pytest.param(
            _set("evaluate", "budgets", [0.1, 1.5]),
            "evaluate.budgets",
            "must be in (0.0, 1.0]",
            id="budget-1.5",
        ),
        pytest.param(_set("budget", "s_min", 1.0), "budget.s_min", "must be < budget.s_max", id="s_min-eq"),
        pytest.param(_set("budget", "s_min", 2.0), "budget.s_min", "must be < budget.s_max", id="s_min-gt"),
        pytest.param(_set("data", "num_frames", 0), "data.num_frames", "must be in [1, inf)", id="frames-0"),
        pytest.param(_set("data", "num_frames", 15), "data.num_frames", "must be even", id="frames-odd"),
        pytest.param(
            _set("evaluate", "tasks", ["detail_qa", "ocr"]),
            "evaluate.tasks",
            "'image_qa', 'long_video' or 'coarse_qa'",
            id="task",
        ),
        pytest.param(_set("evaluate", "methods", ["vanila"]), "evaluate.methods", "'vanilla'", id="method"),
        pytest.param(_set("data", "frame_size", 200), "data.frame_size", "multiple of 28", id="frame_size"),
        pytest.param(
            _set("train", "backend", "tgi"), "train.backend", "'transformers' or 'vllm'", id="backend"
        ),
        pytest.param(_set("vllm", "dtype", "int3"), "vllm.dtype", "'float32'", id="vllm-dtype"),
    ],
)
def test_bad_value_names_key_and_allowed(
    tmp_path: Path, base: dict, edit: Callable[[dict], None], key: str, allowed: str
) -> None:
    message = _error(tmp_path, _variant(base, edit))
    assert key in message
    assert allowed in message


@pytest.mark.parametrize(
    "keys",
    [
        ("sed",),
        ("data", "frame_sise"),
        ("data", "splits", "train", "card_video"),
        ("budget", "smin"),
        ("backbone", "tiny", "hiden_size"),
        ("backbone", "sft", "dense_lr_"),
        ("evaluate", "method"),
        ("evaluate", "vllm"),
    ],
    ids=lambda keys: ".".join(keys),
)
def test_unknown_key_anywhere(tmp_path: Path, base: dict, keys: tuple[str, ...]) -> None:
    message = _error(tmp_path, _variant(base, _set(*keys, 1)))
    assert ".".join(keys) in message
    assert "unknown key" in message


def test_vllm_rollouts_need_a_frozen_backbone(tmp_path: Path, base: dict) -> None:
    data = _variant(base, _set("train", "backend", "vllm"))
    data["train"]["joint_training"] = True
    message = _error(tmp_path, data)
    assert "train.backend" in message and "joint_training" in message


def test_path_source_without_checkpoint(tmp_path: Path, base: dict) -> None:
    data = _variant(base, _set("backbone", "source", "path"))
    message = _error(tmp_path, data)
    assert "backbone.checkpoint" in message
    # parsing alone is fine: only the existence check fails
    assert load_params(_write(tmp_path, data), require_paths=False).backbone.source == "path"


def test_path_source_with_checkpoint_folder(tmp_path: Path, base: dict) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    data = _variant(base, _set("backbone", "source", "path"))
    data["backbone"]["checkpoint"] = str(ckpt)
    message = _error(tmp_path, data)  # folder without config.json
    assert "backbone.checkpoint" in message and str(ckpt) in message
    (ckpt / "config.json").write_text("{}")
    assert load_params(_write(tmp_path, data)).backbone.checkpoint == str(ckpt)


def test_missing_params_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_params(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["data: [unclosed\n", "seed: 0\n  data: {a: 1\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_params(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(path)


def test_several_errors_are_all_listed(tmp_path: Path, base: dict) -> None:
    data = copy.deepcopy(base)
    data["evaluate"]["budgets"] = [1.5]
    data["evaluate"]["tasks"] = ["ocr"]
    data["data"]["frame_size"] = 200
    data["backbone"]["tiny"]["hiden_size"] = 3
    data["seed"] = -1
    message = _error(tmp_path, data)
    lines = message.splitlines()[1:]
    for key in (
        "evaluate.budgets",
        "evaluate.tasks",
        "data.frame_size",
        "backbone.tiny.hiden_size",
        "seed",
    ):
        assert any(line.strip().startswith(key) for line in lines), (key, message)
    assert len(lines) == 5


def test_smolvlm_encoder_needs_a_local_checkpoint(tmp_path):
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    data["allocator"].update(encoder="smolvlm", encoder_path=str(tmp_path / "smol"))
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="allocator.encoder_path"):
        load_params(f)
    data["allocator"]["encoder_path"] = None
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="encoder_path"):
        load_params(f)
