"""Print the README's Results tables from the committed metrics files and reports (nothing is recomputed).

    python scripts/readme_tables.py            # markdown, to paste under README "Results"

Every number the README states for the pipeline run comes from `metrics/*.json` or the executed notebooks'
papermill metadata (`reports/*.ipynb`); this prints them in the README's layout so that the two agree.
"""

from __future__ import annotations

import json
from pathlib import Path

BACKBONE_TASKS = ["detail_qa", "multi_frame", "grounding", "image_qa", "long_video", "coarse_qa"]
TRAIN_ROWS = [
    ("full resolution", "full"),
    ("**ResAdapt, deterministic (Beta means)**", "resadapt"),
    ("FixedScale at that retention", "fixed_scale"),
    ("Oracle at that retention", "oracle_own"),
    ("untrained Allocator (prior only), hard budget at that retention", "prior_only_own"),
    ("untrained Allocator, its own Beta means", "prior_only"),
    ("ResAdapt, hard budget at 0.15", "resadapt_hard"),
    ("untrained Allocator, hard budget at 0.15", "prior_only_hard"),
    ("FixedScale at 0.15", "fixed_scale_hard"),
    ("Oracle at 0.15", "oracle"),
]
EVAL_ROWS = [
    ("Vanilla", "vanilla", True),
    ("FixedScale", "fixed_scale", False),
    ("random chunk drop", "random_chunk_drop", False),
    ("random token drop (paper's Random Drop)", "random_token_drop", False),
    ("ToMe (across chunks)", "tome", False),
    ("VisionZip", "visionzip", False),
    ("slow-fast", "slow_fast", False),
    ("frame selection (seed 0's Allocator)", "frame_selection", False),
    ("Oracle", "oracle", False),
    ("prior only, hard budget (untrained Allocator)", "prior_only_hard", False),
    ("ResAdapt, hard budget (3 seeds)", "resadapt_hard", False),
    ("prior only, its own retention", "prior_only", True),
    ("**ResAdapt, its own retention (3 seeds)**", "resadapt", True),
]


def load(name: str) -> dict:
    return json.loads(Path(f"metrics/{name}.json").read_text())


def backbone() -> None:
    m = load("backbone")
    conds = list(m["tasks"]["detail_qa"])
    print("| task | " + " | ".join(c.replace("_", " ") for c in conds) + " |")
    print("|---" * (len(conds) + 1) + "|")
    for task in BACKBONE_TASKS:
        cells = [f"{v['accuracy']:.2f} ({v['retention']:.3f})" for v in m["tasks"][task].values()]
        print(f"| {task} | " + " | ".join(cells) + " |")
    print("\nchecks:", json.dumps(m["checks"]))
    print("phases:", m["phases"], "calibration_seconds:", m["calibration_seconds"])


def train() -> None:
    m = load("train")
    seeds = sorted(m["seeds"], key=int)
    print("| allocation | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |")
    print("|---" * (len(seeds) + 2) + "|")
    for label, key in TRAIN_ROWS:
        cells = [
            f"{m['seeds'][s]['methods'][key]['accuracy']:.3f} ({m['seeds'][s]['methods'][key]['retention']:.3f})"
            for s in seeds
        ]
        mu, sd = m["mean"]["methods"][key], m["sd"]["methods"][key]
        cells.append(
            f"{mu['accuracy']:.3f} ± {sd['accuracy']:.3f} ({mu['retention']:.3f} ± {sd['retention']:.3f})"
        )
        print(f"| {label} | " + " | ".join(cells) + " |")
    gaps = [m["seeds"][s]["evidence"]["gap"] for s in seeds]
    print(
        "| evidence gap (deterministic) | "
        + " | ".join(f"{g:.3f}" for g in gaps)
        + f" | {m['mean']['evidence']['gap']:.3f} ± {m['sd']['evidence']['gap']:.3f} |"
    )
    for s in seeds:
        r = m["seeds"][s]
        print(
            f"seed {s}: kept_step {r['kept_step']}, train {r['train_seconds_this_session']} s, "
            f"report {r['evaluation_seconds']} s, evidence {r['evidence']}, checks {json.dumps(r['checks'])}"
        )
    print("mean checks:", json.dumps(m.get("checks", {})))


def ablation() -> None:
    m = load("ablation")
    seeds = sorted(m["seeds"], key=int)
    print("| objective | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---" * (len(seeds) + 1) + "|")
    for obj in m["seeds"][seeds[0]]:
        cells = []
        for s in seeds:
            r = m["seeds"][s][obj]
            cells.append(f"{r['accuracy']:.3f} ({r['retention']:.3f}), {r['final_val_mean_scale']:.3f}")
        print(f"| {obj} | " + " | ".join(cells) + " |")
    print("seconds:", {s: {o: r["seconds_this_session"] for o, r in m["seeds"][s].items()} for s in seeds})
    print("checks:", json.dumps(m["checks"]))


def evaluate() -> None:
    m = load("evaluate")
    frames = next(iter(m["qa"])).split()[0]
    budgets = sorted({k.split()[2] for k in m["qa"] if k.split()[2] != "own"}, key=float)
    for task in ["detail_qa", "multi_frame", "image_qa", "long_video"]:
        print(f"\n{task} ({frames} frames): accuracy % [95% CI] (retention)")
        print("| method | " + " | ".join(f"R = {b}" for b in budgets) + " |")
        print("|---" * (len(budgets) + 1) + "|")
        for label, key, own in EVAL_ROWS:
            cols = ["own"] if own else budgets
            cells = []
            for b in cols:
                c = m["qa"].get(f"{frames} {key} {b}")
                cells.append(
                    ""
                    if c is None
                    else f"{c[f'{task} acc_%']:.1f} [{c[f'{task} low']:.1f}, {c[f'{task} high']:.1f}] "
                    f"({c[f'{task} retention_%'] / 100:.3f})"
                )
            cells += [""] * (len(budgets) - len(cells))
            print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nseeds:")
    for k, v in m["seeds"].items():
        print(" ", k, v)
    print("\nfrontier bars (detail_qa):")
    for row, r in m["frontier_detail_qa"]["rows"].items():
        print(f"  {row}: {r['accuracy']:.3f} {[round(x, 3) for x in r['ci']]} at {r['retention']:.3f}")
        for bar, b in r["bars"].items():
            print(
                f"    {bar}: diff {b['difference']:+.3f} {[round(x, 3) for x in b['ci']]} "
                f"holds {b['holds']} at CI low {b['holds_at_ci_low']} (ref {b['reference_accuracy']:.3f})"
            )
    print(
        "\noracle_bound:", m["oracle_bound"]["comparisons"], "comparisons, holds", m["oracle_bound"]["holds"]
    )
    print("flags:", m["oracle_bound"]["flags"])
    print("\nframes scaling:")
    for f, r in m["frames_scaling"]["rows"].items():
        refs = {
            k: (round(v["reference_accuracy"], 3), round(v["relative_gain"], 3), v["holds_at_ci_low"])
            for k, v in r["references"].items()
        }
        print(
            f"  {f}: {r['accuracy']:.3f} {[round(x, 3) for x in r['ci']]} {refs} holds {r['holds_at_ci_low']}"
        )
    print(
        "frames grid:", {k: {kk: vv for kk, vv in v.items() if "acc" in kk} for k, v in m["frames"].items()}
    )
    print("\noverhead:", m["overhead"])
    print("speedup at lowest retention:", m["speedup_at_lowest_retention"])
    print("samples:", m["samples"], "stage_seconds:", m["stage_seconds"])


def stage_times() -> None:
    for stage in ["prepare", "backbone", "train", "ablation", "evaluate", "figures"]:
        nb = json.loads(Path(f"reports/{stage}.ipynb").read_text())
        print(f"{stage}: {nb['metadata']['papermill']['duration']} s")


if __name__ == "__main__":
    for part in (stage_times, backbone, train, ablation, evaluate):
        print(f"\n## {part.__name__}\n")
        part()
