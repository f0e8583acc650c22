"""The end of `nox -s repro`: a short summary of the pipeline's results instead of `dvc metrics show`'s table
(hundreds of columns). Reads the stages' metrics files only; `dvc metrics show` / `dvc metrics diff` keep
the full numbers. Not a DVC stage: it writes nothing.

    python -m resadapt.stages.summary [ROOT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from resadapt.stages.evaluate import check_lines


def _load(root: Path, name: str) -> dict:
    path = root / "metrics" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _flags(checks: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in checks.items():
        if isinstance(value, dict):
            out += _flags(value, f"{prefix}{key}.")
        elif isinstance(value, bool):
            out.append(f"{prefix}{key}: {'yes' if value else 'NO'}")
    return out


def _every_seed(every: dict) -> str:
    """Checks over seeds (`{name: {holds, failing_seeds}}`) as one line."""
    return ", ".join(
        f"{k}: {'yes' if v['holds'] else 'NO (seeds ' + str(v['failing_seeds']) + ')'}"
        for k, v in every.items()
    )


def summary_lines(root: str | Path = ".") -> list[str]:
    root = Path(root)
    lines = []
    backbone = _load(root, "backbone").get("checks", {})
    if backbone:
        lines.append(
            f"backbone ({backbone.get('task')}): full {backbone.get('full_accuracy')}, Oracle "
            f"{backbone.get('oracle_accuracy')} at retention {backbone.get('oracle_retention')}, uniform "
            f"{backbone.get('uniform_low_accuracy')} at {backbone.get('uniform_low_retention')} (chance "
            f"{backbone.get('chance')}), uniform levels {backbone.get('uniform_levels')}; "
            + ", ".join(_flags(backbone))
        )
    train = _load(root, "train")
    if train:
        mean, sd = train.get("mean", {}).get("methods", {}), train.get("sd", {}).get("methods", {})
        rows = ", ".join(
            f"{m} {v['accuracy']:.3f}±{sd.get(m, {}).get('accuracy', 0):.3f} @ {v['retention']:.3f}"
            for m, v in mean.items()
            if "accuracy" in v
        )
        lines.append(
            f"train ({len(train.get('seeds', {}))} seeds, test {train.get('task')}, accuracy mean±sd @ "
            f"retention; target retention {train.get('target_retention')}): {rows}"
        )
        every = train.get("checks", {}).get("every_seed", {})
        lines.append(
            f"train evidence gap {train.get('mean', {}).get('evidence', {}).get('gap', float('nan')):.2f} (mean); "
            + _every_seed(every)
            + "; on the mean: "
            + ", ".join(_flags(train.get("checks", {}).get("mean_over_seeds", {})))
        )
    ablation = _load(root, "ablation")
    if ablation:
        every = ablation.get("checks", {}).get("every_seed", {})
        lines.append("ablation (every seed): " + _every_seed(every))
    evaluate = _load(root, "evaluate")
    if evaluate:
        lines.append(
            f"evaluate: {evaluate.get('samples')} samples ({evaluate.get('samples_per_cell')} per cell at least)"
        )
        lines += [f"  {line}" for line in check_lines(evaluate)]
    lines.append(
        "reports: reports/*.ipynb (executed notebooks); figures: figures/*.png; per-sample log: "
        "results/evaluate/samples.jsonl (lmms-eval layout: results/evaluate/lmms_eval/); "
        "all numbers: dvc metrics show"
    )
    return lines


if __name__ == "__main__":
    print("\n".join(summary_lines(sys.argv[1] if len(sys.argv) > 1 else ".")))
