"""Is the backbone recipe robust, not just repeatable? Train it for other seeds and calibrate each on test.

    python scripts/backbone_seeds.py --seeds 1 2 --out docs/runs/backbone_seeds.json

For each seed: params.yaml with `seed` replaced (model initialisation, sampling, training order) and
`backbone.path` under --work, the backbone stage's own training (`backbone_stage`) and calibration
(`calibrate_backbone`, test split, the tasks issue 13's bars are on), and its checks (`calibration_metrics`).
Seed 0 is the pipeline's (`metrics/backbone.json`). Entries already in --out for other seeds are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from resadapt.config import load_params
from resadapt.stages.backbone import backbone_stage, calibrate_backbone, calibration_metrics, phase_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="docs/runs/backbone_seeds.json")
    ap.add_argument("--work", default="/tmp/backbone_seeds", help="where each seed's backbone is written")
    ap.add_argument("--tasks", nargs="+", default=["detail_qa", "coarse_qa", "grounding"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    out = Path(args.out)
    for seed in args.seeds:
        path = Path(args.work) / f"seed{seed}"
        shutil.rmtree(path, ignore_errors=True)
        backbone = base.backbone.model_copy(
            update={
                "path": str(path),
                "calibration": base.backbone.calibration.model_copy(update={"tasks": args.tasks}),
            }
        )
        params = base.model_copy(update={"seed": seed, "backbone": backbone})
        model, processor, log = backbone_stage(params)
        t0 = time.time()
        per_sample, table = calibrate_backbone(params, model, processor)
        per_sample.to_csv(path / "calibration_samples.csv", index=False)  # predictions, for reading misses
        metrics = calibration_metrics(table, params)
        # Read again just before writing: other seeds may run in parallel processes on the same file.
        results = json.loads(out.read_text()) if out.exists() else {}
        results[str(seed)] = {
            "phases": phase_summary(log),
            "calibration_seconds": round(time.time() - t0, 1),
            **metrics,
        }
        out.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
        print(seed, json.dumps(metrics.get("checks", {})), flush=True)


if __name__ == "__main__":
    main()
