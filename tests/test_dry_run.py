"""The paper profile's dry run: tiny same-architecture stand-ins for the 7B backbone and SmolVLM2, and a
benchmark fixture in its official layout; nothing is downloaded and no weights are loaded by the check."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import SMALL_BACKBONE
from test_allocator import _tiny_smolvlm
from test_benchmarks import charades_sta

from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone, save_backbone
from resadapt.cli import main
from resadapt.config import ConfigError, merged_params_data, parse_params
from resadapt.dry_run import dry_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    model, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL_BACKBONE))
    save_backbone(model, processor, tmp / "qwen")
    smol = _tiny_smolvlm()
    smol.save_pretrained(tmp / "smol")
    processor.tokenizer.save_pretrained(tmp / "smol")
    charades_sta(tmp / "charades")
    return tmp


def _overrides(tmp: Path, **evaluate) -> Path:
    data = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    data["backbone"]["checkpoint"] = str(tmp / "qwen")
    data["allocator"]["encoder_path"] = str(tmp / "smol")
    data["allocator"].update(dim=32, num_heads=2)
    data["evaluate"]["benchmarks"] = [{"name": "charades_sta", "root": str(tmp / "charades")}]
    data["evaluate"]["frames_task"] = "charades_sta"
    data["evaluate"].update(evaluate)
    path = tmp / "overrides.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_paper_profile_passes_with_stand_ins(stand_ins, capsys):
    path = _overrides(stand_ins)
    assert main(["dry-run", str(ROOT / "params.yaml"), "--overrides", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Qwen2_5_VLForConditionalGeneration" in out and "smolvlm encoder" in out
    assert "charades_sta: " in out and "2 rows (grounding 2)" in out and "dry run passed" in out


def test_every_problem_is_reported_with_its_key(stand_ins):
    path = _overrides(stand_ins)
    data = merged_params_data(ROOT / "params.yaml", path)
    data["backbone"]["checkpoint"] = str(stand_ins / "nowhere")
    data["evaluate"]["benchmarks"][0]["root"] = str(stand_ins / "qwen")  # no Charades annotations there
    with pytest.raises(ConfigError) as err:
        dry_run(parse_params(data, "paper"), "paper")
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "backbone.checkpoint" in text and "nowhere" in text
    assert "evaluate.benchmarks[0] charades_sta" in text


def test_shipped_paper_profile_merges_and_validates():
    params = parse_params(merged_params_data(ROOT / "params.yaml", ROOT / "params-paper.yaml"), "paper")
    assert params.backbone.source == "path" and params.allocator.encoder == "smolvlm"
    assert params.evaluate.main_frames(params.data.num_frames) == [32, 128]
    assert {b.name for b in params.evaluate.benchmarks} >= {"videomme", "charades_sta", "chartqa"}


def test_merge_params_never_overwrites_silently(tmp_path):
    out = tmp_path / "merged.yaml"
    assert main(["merge-params", str(ROOT / "params.yaml"), str(ROOT / "params-paper.yaml"), str(out)]) == 0
    assert main(["merge-params", str(ROOT / "params.yaml"), str(ROOT / "params-paper.yaml"), str(out)]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  budgetz: [0.1]\n")
    assert main(["merge-params", str(ROOT / "params.yaml"), str(bad), str(tmp_path / "x.yaml")]) == 2
