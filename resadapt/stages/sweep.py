"""Hyperparameter selection on the validation split: short train-stage runs over values of params keys.

The selection protocol (README, "Choosing hyperparameters"): every value is chosen from this table, which
reads the train split (training) and the val split (the deterministic Allocator's accuracy, retention and
evidence gap at the run's last step) only; the test split is read by the train stage's final report and
the evaluate stage. Not a DVC stage: it writes under `--out` and changes nothing the pipeline tracks.

    python -m resadapt.stages.sweep train.learning_rate=1e-3,3e-3 [KEY=V1,V2 ...] [--max-steps N]
    nox -s sweep -- train.learning_rate=1e-3,3e-3

Every combination of the listed values runs once per seed of `train.seeds` (parallel processes,
`train.workers`); runs are resumable like the train stage's (checkpoints under `--out`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from resadapt.config import ConfigError, Params, parse_params
from resadapt.stages.train import over_seeds, run

VAL_COLUMNS = {
    "eval_accuracy": "val_accuracy",
    "eval_retention": "val_retention",
    "eval_mean_scale": "val_mean_scale",
    "eval_evidence_gap": "val_evidence_gap",
}


def parse_assignment(text: str) -> tuple[str, list]:
    """'train.learning_rate=1e-3,3e-3' -> ('train.learning_rate', [0.001, 0.003]); values are YAML scalars."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"sweep: expected KEY=V1,V2,... (e.g. train.learning_rate=1e-3,3e-3), got {text!r}")
    return key.strip(), [_scalar(v) for v in values.split(",")]


def _scalar(text: str):
    """A YAML scalar; '1e-3' is a number too (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _set(data: dict, dotted: str, value) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for i, k in enumerate(parents):
        if not isinstance(node.get(k), dict):
            raise ConfigError(
                f"sweep: {'.'.join(parents[: i + 1])} is not a section of params (key {dotted})"
            )
        node = node[k]
    node[leaf] = value  # a key params does not know fails validation, named


def settings(base: dict, grid: list[tuple[str, list]], max_steps: int | None) -> list[tuple[dict, Params]]:
    """Every combination of the grid's values applied to `base` (a params mapping), validated: (the
    combination, its Params). A bad key or value fails before anything runs, naming it."""
    out = []
    keys = [k for k, _ in grid]
    for values in itertools.product(*(v for _, v in grid)):
        combo = dict(zip(keys, values, strict=True))
        data = copy.deepcopy(base)
        for k, v in combo.items():
            _set(data, k, v)
        if max_steps is not None:
            data["train"]["max_steps"] = max_steps
        out.append((combo, parse_params(data, f"sweep setting {combo}")))
    return out


def sweep_seed(params: Params, model, processor) -> dict:
    """One (setting, seed) run of the train stage's training; the last validation row of its log."""
    t0 = time.time()
    trainer = run(params, params.train, model, processor, params.train.checkpoints)
    evals = [h for h in trainer.state.log_history if "eval_retention" in h]
    last = evals[-1] if evals else trainer.evaluate()
    row = {new: last.get(old, float("nan")) for old, new in VAL_COLUMNS.items()}
    row |= {  # per task, when the run trains several (the trainer logs eval_<task>_accuracy / _retention)
        "val_" + k.removeprefix("eval_"): v
        for k, v in last.items()
        if k.startswith("eval_") and k.endswith(("_accuracy", "_retention")) and k not in VAL_COLUMNS
    }
    return row | {"steps": int(trainer.state.global_step), "seconds": round(time.time() - t0, 1)}


def run_sweep(
    params_file: str | Path, grid: list[tuple[str, list]], out: str | Path, max_steps: int | None = None
) -> pd.DataFrame:
    """The val table: one row per (setting, seed), written to `out`/val_table.csv as it grows."""
    base = yaml.safe_load(Path(params_file).read_text())
    out = Path(out)
    base.setdefault("train", {})["checkpoints"] = str(out / "checkpoints")
    rows = []
    for combo, params in settings(base, grid, max_steps):
        for seed, val in sorted(over_seeds(sweep_seed, params).items()):
            rows.append(combo | {"seed": seed} | val)
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out / "val_table.csv", index=False)
        print(pd.DataFrame(rows).tail(len(params.train.seeds)).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and sd over seeds of each validation column, per setting."""
    cols = [c for c in table.columns if c.startswith("val_")]
    return table.groupby(keys, dropna=False)[cols].agg(["mean", "std"]).round(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resadapt.stages.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("assignments", nargs="+", help="KEY=V1,V2,... (a params key and the values to try)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument(
        "--max-steps", type=int, default=None, help="train.max_steps of each run (default: params')"
    )
    ap.add_argument("--out", default="outputs/sweep")
    args = ap.parse_args(argv)
    try:
        grid = [parse_assignment(a) for a in args.assignments]
        table = run_sweep(args.params, grid, args.out, args.max_steps)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(table, [k for k, _ in grid]).to_string())
    print(f"val table: {Path(args.out) / 'val_table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
