"""The reports show their figures: the figures notebook, executed by papermill on a tiny log, holds its
plots as image outputs (what a reader of `reports/figures.ipynb` sees) and saves them under figures/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from conftest import BENCH_FRAME_SIZE, BENCH_FRAMES, log_row

from resadapt.data.embedded import split_rows
from resadapt.evaluate import ResultsLog
from resadapt.stages.figures import HEATMAP_METHODS

ROOT = Path(__file__).resolve().parents[1]


def tiny_log(bench: Path, path: Path) -> None:
    """A log over the tiny benchmark's test rows: every heatmap method, plus a frames grid."""
    rng = np.random.default_rng(0)
    rows = []
    for task in ("detail_qa", "multi_frame"):
        for r in split_rows(bench, "test", [task]):
            for method in ("vanilla", *HEATMAP_METHODS):
                budget = None if method in ("vanilla", "resadapt") else 0.15
                scales = rng.uniform(0.1, 1.0, BENCH_FRAMES).round(3).tolist()
                rows.append(
                    log_row(
                        "main",
                        task,
                        BENCH_FRAMES,
                        method,
                        budget,
                        str(r["id"]),
                        1.0,
                        0.15,
                        frame_scales=scales,
                    )
                )
    for frames in (8, 16, 32, 64):
        for method in ("vanilla", "fixed_scale", "resadapt_hard"):
            budget = None if method == "vanilla" else 8 / frames
            for i in range(3):
                score = float(rng.integers(0, 2))
                rows.append(
                    log_row(
                        "frames",
                        "long_video",
                        frames,
                        method,
                        budget,
                        f"l{i}",
                        score,
                        0.5,
                        frame_scales=[1.0] * frames,
                    )
                )
    ResultsLog(path).write(rows)


def test_the_figures_report_holds_its_figures(tiny_bench, tmp_path):
    import papermill

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(root=str(tiny_bench), frame_size=BENCH_FRAME_SIZE, num_frames=BENCH_FRAMES)
    params["budget"]["max_pixels"] = BENCH_FRAME_SIZE**2
    params["evaluate"].update(results=str(tmp_path / "results"), budgets=[0.15])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tiny_log(tiny_bench, tmp_path / "results" / "samples.jsonl")
    out = tmp_path / "figures.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "figures.ipynb"),
        str(out),
        parameters={"params_file": str(tmp_path / "params.yaml"), "figures_dir": str(tmp_path / "figures")},
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
    )
    cells = json.loads(out.read_text())["cells"]
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    saved = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert saved == ["allocations.png", "frames_scaling.png", "frontier.png", "latency.png"]
    assert len(images) >= len(saved), f"{len(images)} image outputs for {len(saved)} figures"
