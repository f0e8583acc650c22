"""The `train` stage: CAPO training of the Allocator (`resadapt.trainer.CAPOTrainer`) as params configure
it, and what its report shows: the trained Allocator against the registry's methods on the test split.

Runs are resumable: each run writes checkpoints under a folder named after a fingerprint of everything that
determines it, outside the DVC outputs (DVC deletes declared outputs before a stage runs, and a killed run
must find its checkpoints). Another configuration gets another folder, so a stale run is never resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset, interleave_datasets
from transformers import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from resadapt.allocator import Allocator, build_allocator, query_tokenizer
from resadapt.backbone import load_backbone
from resadapt.baselines import MethodContext, build_method
from resadapt.baselines.base import best_of_alternatives
from resadapt.budget import realise
from resadapt.config import Params, RLParams
from resadapt.data.embedded import split_rows
from resadapt.trainer import CAPOTrainer, CAPOTrainerConfig
from resadapt.vllm_backend import VLLMBackend, server_from_params

# Library code a run's trajectory depends on: a checkpoint written by other code is not resumed.
_RUN_CODE = (
    "stages/train.py",
    "allocator.py",
    "capo.py",
    "config.py",
    "trainer.py",
    "budget.py",
    "data/sample.py",
    "backbone.py",
    "processing.py",
    "rewards.py",
)


def fingerprint(params: Params, rl: RLParams, objective: str, max_steps: int) -> str:
    """12 hex digits identifying a run: the params it reads, the code it runs, the backbone and data."""

    def files(root: Path) -> list:
        return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())

    stamp = {
        "seed": params.seed,
        "allocator": params.allocator.model_dump(),
        "rl": rl.model_dump(),
        "objective": objective,
        "max_steps": max_steps,
        "backbone": files(Path(params.backbone.path)),
        "tables": files(Path(params.data.root) / "tables"),
        "code": {
            name: hashlib.sha256((Path(__file__).parents[1] / name).read_bytes()).hexdigest()
            for name in _RUN_CODE + (("vllm_backend.py",) if rl.backend == "vllm" else ())
        },
    }
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trainer_config(
    params: Params, rl: RLParams, output_dir: str | Path, objective: str, max_steps: int, **overrides
) -> CAPOTrainerConfig:
    """The CAPOTrainerConfig of one run; CPU and single-thread friendly, checkpoints every `save_steps`."""
    group = rl.allocations_per_prompt * rl.rollouts_per_allocation
    kwargs = dict(
        output_dir=str(output_dir),
        seed=params.seed,
        data_seed=params.seed,
        max_steps=max_steps,
        per_device_train_batch_size=rl.prompts_per_step * group,
        per_device_eval_batch_size=rl.prompts_per_step * group,  # unused: evaluate() is ours; TRL checks it
        allocations_per_prompt=rl.allocations_per_prompt,
        rollouts_per_allocation=rl.rollouts_per_allocation,
        temperature=rl.temperature,
        max_completion_length=rl.max_completion_length,
        objective=objective,
        lagrangian_lambda=rl.lagrangian_lambda,
        capo=rl.capo,
        target_retention=rl.target_retention,
        allocator_learning_rate=rl.learning_rate,
        allocator_relevance_learning_rate=rl.relevance_learning_rate,
        allocator_relevance_metric_learning_rate=rl.relevance_metric_learning_rate,
        allocator_lr_scheduler_type=rl.lr_scheduler,
        joint_training=rl.joint_training,
        learning_rate=rl.backbone_learning_rate,
        beta=0.0,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=rl.save_steps,
        eval_strategy="steps",
        eval_steps=rl.eval_steps,
        logging_steps=1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return CAPOTrainerConfig(**(kwargs | overrides))


def make_trainer(
    params: Params,
    rl: RLParams,
    model,
    processor,
    run_dir: str | Path,
    objective: str | None = None,
    max_steps: int | None = None,
    allocator: Allocator | None = None,
    rollout_engine=None,
    **overrides,
) -> CAPOTrainer:
    """A CAPOTrainer over the train split (rl.tasks) with the val split as validation rows."""
    objective = objective or rl.objective
    args = trainer_config(params, rl, run_dir, objective, max_steps or rl.max_steps, **overrides)
    train_rows = split_rows(params.data.root, "train", rl.tasks)
    val_rows = split_rows(params.data.root, "val", rl.tasks, max(1, rl.val_samples // len(rl.tasks)))
    return CAPOTrainer(
        model=model,
        allocator=allocator or build_allocator(params, model),
        args=args,
        train_dataset=even_task_mix(train_rows),
        eval_dataset=Dataset.from_list([r | {"prompt": r["question"]} for r in val_rows]),
        processing_class=processor,
        media_root=params.data.root,
        allocator_tokenizer=query_tokenizer(params.allocator, processor),
        rollout_engine=rollout_engine,
    )


def even_task_mix(rows: list[dict]) -> Dataset:
    """The train rows with every task equally often: the tasks interleaved round-robin, the smaller ones
    repeated until the largest is exhausted (the split holds 1600 detail-QA rows but 200 long videos).
    The trainer's sampler shuffles it, so each prompt is any task with equal probability."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r | {"prompt": r["question"]})
    parts = [Dataset.from_list(part) for part in by_task.values()]
    if len(parts) == 1:
        return parts[0]
    return interleave_datasets(parts, stopping_strategy="all_exhausted")


@contextlib.contextmanager
def rollout_engine(params: Params, rl: RLParams, processor):
    """The engine of `rl`'s rollouts: None (the trainer generates with the backbone) or, with
    `backend: vllm`, a `VLLMBackend` on a server of `params.vllm` that lives as long as the block (one per
    process under `accelerate launch`)."""
    if rl.backend == "transformers":
        yield None
        return
    run_dir = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank its own run dir: pid files must not clash
        run_dir = Path(params.vllm.run_dir) / f"rank{os.environ.get('RANK', '0')}"
    with server_from_params(params, run_dir) as server:
        print(f"vLLM server up in {server.startup_seconds:.1f} s at {server.url}", flush=True)
        yield VLLMBackend(
            server.url,
            server.model_name,
            processor,
            max_new_tokens=rl.max_completion_length,
            batch_size=rl.prompts_per_step * rl.allocations_per_prompt,
        )


def run(
    params: Params,
    rl: RLParams,
    model,
    processor,
    checkpoints: str | Path,
    objective: str | None = None,
    max_steps: int | None = None,
    engine=None,
) -> CAPOTrainer:
    """Train (or resume, if this exact run left checkpoints) and return the trainer.

    With `rl.backend: vllm` the rollouts go to `engine` (one from `rollout_engine`), or to a server started
    for this call and stopped after it; the returned trainer then answers with the backbone itself.
    """
    objective = objective or rl.objective
    steps = max_steps or rl.max_steps
    run_dir = Path(checkpoints) / f"{objective}-{fingerprint(params, rl, objective, steps)}"
    trainer = make_trainer(params, rl, model, processor, run_dir, objective, steps)
    last = get_last_checkpoint(str(run_dir)) if run_dir.exists() else None
    if last and TrainerState.load_from_json(str(Path(last) / "trainer_state.json")).global_step >= steps:
        # The Trainer would take one more step when resumed at max_steps: load the finished run instead.
        print(f"loading the finished run from {last}", flush=True)
        trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        trainer.load_checkpoint(last)
        return trainer
    if last:
        print(f"resuming from {last}", flush=True)
    with contextlib.ExitStack() as stack:
        if engine is None:
            engine = stack.enter_context(rollout_engine(params, rl, processor))
        trainer.rollout_engine = engine
        try:
            trainer.train(resume_from_checkpoint=last)
        finally:
            trainer.rollout_engine = None
    return trainer


def seed_params(params: Params, seed: int) -> Params:
    """`params` for one of `train.seeds`: the Allocator's init, the run's RNG, its data order and its
    checkpoint folder all follow `seed`."""
    return params.model_copy(update={"seed": int(seed)})


def _seed_job(job: tuple[Callable, Params, int, dict]) -> tuple[int, object]:
    fn, params, seed, kwargs = job
    torch.set_num_threads(1)
    model, processor = load_backbone(params.backbone.path)
    return seed, fn(seed_params(params, seed), model, processor, **kwargs)


def over_seeds(fn: Callable, params: Params, workers: int | None = None, **kwargs) -> dict[int, object]:
    """{seed: fn(seed_params(params, seed), model, processor, **kwargs)} for every `train.seeds`.

    Seeds go to `workers` (default `train.workers`) spawned processes, one thread each, each loading the
    backbone from the backbone stage's output; a run does not depend on which process ran it. With one
    worker (or one seed) they run here, one after the other.
    """
    seeds = list(params.train.seeds)
    workers = min(workers or params.train.workers, len(seeds))
    jobs = [(fn, params, s, kwargs) for s in seeds]
    if workers <= 1:
        return dict(_seed_job(j) for j in jobs)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return dict(pool.imap_unordered(_seed_job, jobs))


def train_seeds(params: Params, plots_dir: str | Path) -> dict[int, dict]:
    """The train stage: one Allocator per `train.seeds` (parallel processes, `over_seeds`), then each seed's
    test-split report, {seed: `train_metrics` plus the gap at the operating point, steps and seconds}."""
    return seed_reports(over_seeds(train_seed, params, plots_dir=plots_dir), plots_dir)


def train_seed(params: Params, model, processor, plots_dir: str | Path) -> dict:
    """One seed of the train stage: train (or resume), save the Allocator to `allocator.seed_path`, write
    its training logs and allocation figure under `plots_dir/seeds/seed_<k>/`, and score its test rows:
    every report row over the test split, except the `SHARED_ROWS`, which this seed scores on its share of
    the test rows only (`seed_reports` joins the shares)."""
    rl = params.train
    out = Path(plots_dir) / "seeds" / f"seed_{params.seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trainer = run(params, rl, model, processor, rl.checkpoints)
    seconds = time.time() - t0
    trained_steps = int(trainer.state.global_step)
    kept = trained_steps
    if rl.checkpoint_selection == "val":
        kept = select_checkpoint(trainer, rl.target_retention, rl.checkpoint_tolerance)
    trainer.save_allocator(params.allocator.seed_path(params.seed))
    train_log, val_log = log_frames(trainer)
    train_log.to_csv(out / "training.csv", index=False)
    val_log.to_csv(out / "validation.csv", index=False)
    t0 = time.time()
    test_rows = split_rows(params.data.root, "test", ["detail_qa"], rl.test_samples)
    prior = build_allocator(params, model)  # the same seed's untrained Allocator: its relevance prior
    own_rows = tuple(r for r in REPORT_ROWS if r not in SHARED_ROWS)
    index, count = list(rl.seeds).index(params.seed), len(rl.seeds)
    answer = params.backbone.generation.max_new_tokens
    tables = [compare_allocations(trainer, test_rows, rl.operating_retention, own_rows, prior, answer)]
    if share := test_rows[index::count]:
        tables.append(
            compare_allocations(trainer, share, rl.operating_retention, SHARED_ROWS, max_new_tokens=answer)
        )
    table = pd.concat(tables, ignore_index=True)
    # the gap measures reading where reading needs resolution: coarse questions (whose evidence is legible at
    # any scale) are left out
    gap_rows = split_rows(
        params.data.root, "test", [t for t in rl.tasks if t != "coarse_qa"], rl.test_samples
    )
    report = {
        "table": table,
        "gap": evidence_gap(trainer, gap_rows),
        "evidence_at_operating_point": evidence_gap(trainer, gap_rows, rl.operating_retention),
        "operating_retention": rl.operating_retention,
        "target_retention": rl.target_retention,
        "train_steps": trained_steps,
        "kept_step": kept,
        "train_seconds_this_session": round(seconds, 1),
        "evaluation_seconds": round(time.time() - t0, 1),
    }
    import matplotlib

    matplotlib.use("Agg")  # a worker process draws to a file; the report shows it
    plot_allocations(trainer, test_rows, n=4).savefig(out / "allocations.png", dpi=90)
    return report


def seed_reports(scored: dict[int, dict], plots_dir: str | Path) -> dict[int, dict]:
    """{seed: `train_metrics` and the run's figures} from `train_seed`'s results: the `SHARED_ROWS` shares
    of every seed joined into one set of those rows, the same in every seed's report; each seed's table is
    written to `plots_dir/seeds/seed_<k>/test_scores.csv`."""
    tables = {s: r["table"] for s, r in scored.items()}
    shared = pd.concat([t[t.method.isin(SHARED_ROWS)] for _, t in sorted(tables.items())], ignore_index=True)
    out = {}
    for s, r in sorted(scored.items()):
        table = pd.concat([tables[s][~tables[s].method.isin(SHARED_ROWS)], shared], ignore_index=True)
        table.to_csv(Path(plots_dir) / "seeds" / f"seed_{s}" / "test_scores.csv", index=False)
        metrics = train_metrics(table, r["gap"], r["operating_retention"], r["target_retention"])
        out[s] = metrics | {k: v for k, v in r.items() if k not in ("table", "gap", *metrics)}
    return out


def select_checkpoint(trainer: CAPOTrainer, target: float, tolerance: float) -> int:
    """Load into `trainer` the checkpoint a seed keeps and return its step: the latest validated checkpoint
    whose val retention (the deterministic Allocator's, over every val task) is within `tolerance` of
    `target`; if none is, the one closest to the target (the later on a tie).

    Why: the deterministic retention moves in whole-token steps and hops between them late in a run
    (seed 2 of one run: 0.146 at steps 90 and 105, 0.203 at step 150), so the last step may miss the
    budget that the step before met. Val accuracy does not decide: on 60 questions the checkpoints of a run
    differ by a few answers (one run kept step 30 of 150 for 3 more right of 60). Only val is read."""
    run_dir = Path(trainer.args.output_dir)
    saved = {
        int(p.name.rsplit("-", 1)[1]): p
        for p in run_dir.glob("checkpoint-*")
        if (p / "allocator" / "model.safetensors").exists()
    }
    points = [
        (h["step"], h["eval_retention"])
        for h in trainer.state.log_history
        if "eval_retention" in h and h["step"] in saved
    ]
    if not points:
        raise ValueError(
            f"train.checkpoint_selection 'val': no checkpoint under {run_dir} has a validation point "
            "(train.eval_steps must be a multiple of train.save_steps)"
        )
    within = [step for step, retention in points if abs(retention - target) <= tolerance]
    step = max(within) if within else min(points, key=lambda p: (abs(p[1] - target), -p[0]))[0]
    trainer.load_checkpoint(saved[step])
    return int(step)


def log_frames(trainer: CAPOTrainer) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-step training log, validation log) from the trainer's history."""
    hist = pd.DataFrame(trainer.state.log_history)
    train = hist[hist.columns[hist.columns.str.startswith("alloc/") | hist.columns.isin(["step", "reward"])]]
    train = train.dropna(subset=["alloc/mean_scale"]) if "alloc/mean_scale" in train else train
    val_cols = [c for c in hist.columns if c.startswith("eval_")]
    val = (
        hist.dropna(subset=[val_cols[0]])[["step", *val_cols]].drop_duplicates("step", keep="last")
        if val_cols
        else pd.DataFrame()
    )
    return train.reset_index(drop=True), val.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# The report: the trained Allocator against the registry's methods on the test split.

# row label -> (method of the `baselines` registry, target retention): None unbudgeted, OPERATING the hard
# budget's `train.operating_retention`, OWN the mean retention the deterministic Allocator chose itself.
# The prior-only rows are the same seed's untrained Allocator: what CAPO adds is the difference.
OPERATING, OWN = "operating", "own"
REPORT_ROWS = {
    "resadapt": ("resadapt", None),
    "resadapt_hard": ("resadapt_hard", OPERATING),
    "fixed_scale": ("fixed_scale", OWN),
    "fixed_scale_hard": ("fixed_scale", OPERATING),
    "oracle": ("oracle", OPERATING),
    "oracle_own": ("oracle", OWN),
    "prior_only": ("prior_only", None),
    "prior_only_own": ("prior_only_hard", OWN),
    "prior_only_hard": ("prior_only_hard", OPERATING),
    "full": ("vanilla", None),
}
PRIOR_ROWS = ("prior_only", "prior_only_own", "prior_only_hard")
# Rows whose allocation depends on neither the Allocator nor the seed (the same backbone answers the same
# frames): scored once over the seeds, each seed a share of the test rows (`train_seed`, `seed_reports`).
SHARED_ROWS = ("full", "fixed_scale_hard", "oracle")


def report_context(trainer: CAPOTrainer, prior_allocator: Allocator | None = None) -> MethodContext:
    """The methods' context for the trainer's Allocator (its scale range, geometry and query tokenizer)."""
    return MethodContext(
        geometry=trainer.geometry,
        s_min=float(trainer.allocator.config.s_min),
        seed=int(trainer.args.seed),
        allocator=trainer.allocator,
        prior_allocator=prior_allocator,
        allocator_tokenizer=trainer.allocator_tokenizer,
    )


def compare_allocations(
    trainer: CAPOTrainer,
    test_rows: list[dict],
    operating_retention: float,
    rows=tuple(REPORT_ROWS),
    prior_allocator: Allocator | None = None,
    max_new_tokens: int | None = None,
) -> pd.DataFrame:
    """Per test row and report row (`REPORT_ROWS`): greedy score and measured retention.

    Answers come from the trainer (its backbone, or its rollout engine), so this works under vLLM rollouts
    too; the allocations come from the same `baselines` methods the evaluate stage runs. The prior-only rows
    are left out without `prior_allocator` (the untrained Allocator). Answers are generated up to
    `max_new_tokens` (the stages pass `backbone.generation.max_new_tokens`, as calibration and evaluate do).
    """
    unknown = set(rows) - set(REPORT_ROWS)
    if unknown:
        raise ValueError(f"unknown report rows {sorted(unknown)}; expected a subset of {tuple(REPORT_ROWS)}")
    if prior_allocator is None:
        rows = tuple(r for r in rows if r not in PRIOR_ROWS)
    context = report_context(trainer, prior_allocator)
    samples = [trainer.sample(r) for r in test_rows]
    realised, plans, budgets = {}, {}, {}
    for label in sorted(rows, key=lambda k: REPORT_ROWS[k][1] == OWN):  # OWN needs ResAdapt's retention
        name, budget = REPORT_ROWS[label]
        if budget == OWN:
            own = realised.get("resadapt") or [
                realise(s, p, trainer.geometry)
                for s, p in zip(
                    samples, build_method("resadapt", context).plan_batch(samples, None), strict=True
                )
            ]
            budget = float(np.mean([r.retention for r in own]))
        elif budget == OPERATING:
            budget = operating_retention
        budgets[label] = budget
        plans[label] = build_method(name, context).plan_batch(samples, budget)
        realised[label] = [
            realise(s, p, trainer.geometry) for s, p in zip(samples, plans[label], strict=True)
        ]
    items, meta = [], []
    for s_idx, s in enumerate(samples):
        for label in rows:
            r = realised[label][s_idx]
            items.append({"row": s.row, "visual": r.visual})
            meta.append({"id": s.row["id"], "task": s.row["task"], "method": label, "retention": r.retention})
    scores = trainer.greedy_scores(items, max_new_tokens=max_new_tokens)
    table = pd.DataFrame([m | {"score": sc} for m, sc in zip(meta, scores, strict=True)])
    for label in rows:  # the Oracle retries what it got wrong with its alternatives, as the evaluator does
        at = np.flatnonzero(table.method.to_numpy() == label)

        def run(idx, alts):
            again = [realise(samples[i], p, trainer.geometry) for i, p in zip(idx, alts, strict=True)]
            items = [{"row": samples[i].row, "visual": r.visual} for i, r in zip(idx, again, strict=True)]
            return list(
                zip(
                    [r.retention for r in again],
                    trainer.greedy_scores(items, max_new_tokens=max_new_tokens),
                    strict=True,
                )
            )

        first = list(zip(table.retention.to_numpy()[at], table.score.to_numpy()[at], strict=True))
        best, _ = best_of_alternatives(
            build_method(REPORT_ROWS[label][0], context),
            samples,
            budgets[label],
            plans[label],
            first,
            run,
            lambda result: result[1],
        )
        table.loc[table.index[at], ["retention", "score"]] = np.array(best, dtype=float)
    return table


def evidence_gap(
    trainer: CAPOTrainer, test_rows: list[dict], operating_retention: float | None = None
) -> dict:
    """Mean deterministic scale on evidence chunks vs the other chunks (active perception).

    The scales are the operator's (clipped at token saturation); with `operating_retention`, those of the
    hard-budget allocation at that retention instead of the Beta means.
    """
    tp = trainer.geometry.temporal_patch_size
    samples = [s for s in (trainer.sample(r) for r in test_rows) if not s.is_image]
    name = "resadapt" if operating_retention is None else "resadapt_hard"
    plans = build_method(name, report_context(trainer)).plan_batch(samples, operating_retention)
    ev, other = [], []
    for sample, plan in zip(samples, plans, strict=True):
        scales = np.asarray(plan.scales)
        chunks = np.array([scales[k * tp : (k + 1) * tp].mean() for k in range(len(scales) // tp)])
        mask = sample.chunk_evidence(tp)[: len(chunks)]
        ev += chunks[mask].tolist()
        other += chunks[~mask].tolist()
    return {
        "evidence_scale": float(np.mean(ev)),
        "other_scale": float(np.mean(other)),
        "gap": float(np.mean(ev) - np.mean(other)),
    }


def train_metrics(
    table: pd.DataFrame,
    gap: dict,
    operating_retention: float,
    target_retention: float,
    task: str = "detail_qa",
) -> dict:
    """One seed's accuracy / retention per report row on `task` and the issue's per-seed acceptance checks
    (reported, not asserted). The deterministic Allocator is compared at its own retention with the Oracle
    and the untrained Allocator (`*_own` rows); the hard budget at `operating_retention`."""
    part = table[table.task == task]
    summary = part.groupby("method").agg(
        accuracy=("score", "mean"), retention=("retention", "mean"), n=("score", "size")
    )
    m = {k: {c: float(v) for c, v in row.items()} for k, row in summary.iterrows()}
    acc = {k: v["accuracy"] for k, v in m.items()}
    own = m["resadapt"]["retention"]
    checks = {
        "resadapt": {
            "retention_within_0.03_of_target": abs(own - target_retention) <= 0.03,
            "at_least_85pct_of_oracle": acc["resadapt"] >= 0.85 * acc["oracle_own"],
            "beats_fixed_scale_by_15_points": acc["resadapt"] >= acc["fixed_scale"] + 0.15,
        },
        "resadapt_hard": {
            "retention_le_operating": m["resadapt_hard"]["retention"] <= operating_retention,
            "at_least_85pct_of_oracle": acc["resadapt_hard"] >= 0.85 * acc["oracle"],
            "beats_fixed_scale_by_15_points": acc["resadapt_hard"] >= acc["fixed_scale_hard"] + 0.15,
        },
        "evidence_gap_ge_0.3": gap["gap"] >= 0.3,
    }
    if "prior_only_own" in acc:
        checks["resadapt"]["beats_prior_only_by_10_points"] = acc["resadapt"] >= acc["prior_only_own"] + 0.1
        checks["resadapt_hard"]["beats_prior_only_by_10_points"] = (
            acc["resadapt_hard"] >= acc["prior_only_hard"] + 0.1
        )
    return {
        "task": task,
        "methods": m,
        "evidence": gap,
        "operating_retention": operating_retention,
        "target_retention": target_retention,
        "checks": checks,
    }


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict as {"a/b/c": value} (bools are checks, not numbers)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _numbers(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _nest(flat: dict[str, float]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _checks(d: dict, prefix: str = "") -> dict[str, bool]:
    """The boolean leaves of a nested dict as {"a/b": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _checks(v, f"{prefix}{k}/")
        elif isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def every_seed(checks: dict[int, dict]) -> dict[str, dict]:
    """Each check (nested names joined by '/') over seeds: it holds when it holds on every seed; the seeds
    where it fails (or that lack it) are listed."""
    flat = {s: _checks(c) for s, c in sorted(checks.items())}
    names = dict.fromkeys(k for f in flat.values() for k in f)
    return {
        k: {
            "holds": all(f.get(k, False) for f in flat.values()),
            "failing_seeds": [s for s, f in flat.items() if not f.get(k, False)],
        }
        for k in names
    }


def seed_summary(per_seed: dict[int, dict]) -> dict:
    """`metrics/train.json`: every seed's `train_metrics` under `seeds`, each number's `mean` and `sd` over
    the seeds (sample sd; 0 for one seed), and the acceptance checks over seeds: a per-seed check holds
    when it holds on every seed (the seeds where it fails are listed), the Oracle and prior-only bars on
    the mean (paper: >= 90% of the Oracle, >= prior only + 0.10)."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    flat = pd.DataFrame([_numbers(per_seed[s]) for s in seeds])
    mean = flat.mean().to_dict()
    sd = (flat.std(ddof=1) if len(seeds) > 1 else flat.std(ddof=0)).to_dict()

    every = every_seed({s: per_seed[s]["checks"] for s in seeds})
    acc = {
        k.split("/")[1]: v for k, v in mean.items() if k.startswith("methods/") and k.endswith("/accuracy")
    }
    on_mean = {"resadapt/at_least_90pct_of_oracle": acc["resadapt"] >= 0.9 * acc["oracle_own"]}
    if "prior_only_own" in acc:
        on_mean["resadapt/beats_prior_only_by_10_points"] = acc["resadapt"] >= acc["prior_only_own"] + 0.1
    return {
        "task": first["task"],
        "target_retention": first["target_retention"],
        "operating_retention": first["operating_retention"],
        "seeds": {str(s): per_seed[s] for s in seeds},
        "mean": _nest(mean),
        "sd": _nest(sd),
        "checks": {"every_seed": every, "mean_over_seeds": on_mean},
    }


def seed_table(summary: dict) -> pd.DataFrame:
    """Detail-QA accuracy and retention per report row: one column pair per seed, then mean and sd; the
    evidence gap and the step of the kept checkpoint as the last rows."""
    cols = {}
    for s, m in summary["seeds"].items():
        for k in ("accuracy", "retention"):
            cols[(f"seed {s}", k)] = {r: v[k] for r, v in m["methods"].items()}
        cols[(f"seed {s}", "accuracy")]["evidence_gap"] = m["evidence"]["gap"]
        cols[(f"seed {s}", "accuracy")]["kept_step"] = m.get("kept_step", m.get("train_steps"))
    for name in ("mean", "sd"):
        for k in ("accuracy", "retention"):
            cols[(name, k)] = {r: v[k] for r, v in summary[name]["methods"].items()}
        cols[(name, "accuracy")]["evidence_gap"] = summary[name]["evidence"]["gap"]
    order = [r for r in REPORT_ROWS if r in summary["mean"]["methods"]] + ["evidence_gap", "kept_step"]
    return pd.DataFrame(cols).reindex(order).round(3)


def compare_train_metrics(reference: dict, other: dict) -> pd.DataFrame:
    """Two `train_metrics` (or `seed_summary`: their means) side by side: detail-QA accuracy and retention
    per method, evidence gap."""
    reference, other = reference.get("mean", reference), other.get("mean", other)
    rows = []
    for method, ref in reference["methods"].items():
        got = other["methods"].get(method, {})
        rows.append(
            {
                "method": method,
                "accuracy": ref["accuracy"],
                "retention": ref["retention"],
                "other_accuracy": got.get("accuracy", np.nan),
                "other_retention": got.get("retention", np.nan),
            }
        )
    rows.append(
        {
            "method": "evidence_gap",
            "accuracy": reference["evidence"]["gap"],
            "other_accuracy": other["evidence"]["gap"],
        }
    )
    return pd.DataFrame(rows).set_index("method")


def read_logs(plots_dir: str | Path, seeds) -> dict[int, tuple[pd.DataFrame, pd.DataFrame]]:
    """{seed: (training log, validation log)} as `train_seed` wrote them."""
    out = {}
    for s in seeds:
        d = Path(plots_dir) / "seeds" / f"seed_{s}"
        val = d / "validation.csv"
        out[int(s)] = (
            pd.read_csv(d / "training.csv"),
            pd.read_csv(val) if val.stat().st_size > 1 else pd.DataFrame(),
        )
    return out


def write_logs(plots_dir: str | Path, logs: dict[int, tuple[pd.DataFrame, pd.DataFrame]]) -> None:
    """Every seed's training and validation log in one file each (`training.csv`, `validation.csv` under
    `plots_dir`, a `seed` column), the files dvc.yaml declares as the stage's plots."""
    for name, i in (("training", 0), ("validation", 1)):
        table = pd.concat([log[i].assign(seed=s) for s, log in logs.items()])
        table.to_csv(Path(plots_dir) / f"{name}.csv", index=False)


def plot_training_curves(
    logs: dict[int, tuple[pd.DataFrame, pd.DataFrame]], window: int = 10, kept: dict[int, int] | None = None
):
    """Per seed (one colour each): rollout accuracy, mean scale and measured retention per step (rolling
    mean, solid) with the deterministic validation points (circles; the kept checkpoint's, `kept`
    {seed: step}, ringed), and the sampled scale on evidence (solid) vs other frames (dashed)."""
    import matplotlib.pyplot as plt

    panels = [
        ("alloc/accuracy", "eval_accuracy", "accuracy"),
        ("alloc/mean_scale", "eval_mean_scale", "mean scale"),
        ("alloc/retention", "eval_retention", "measured retention"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.0 * (len(panels) + 1), 3.2))
    for i, (seed, (train, val)) in enumerate(sorted(logs.items())):
        colour = f"C{i}"
        for ax, (col, vcol, title) in zip(axes, panels, strict=False):
            if col in train:
                ax.plot(
                    train.step,
                    train[col].rolling(window, min_periods=1).mean(),
                    color=colour,
                    label=f"seed {seed}",
                )
            if len(val) and vcol in val:
                ax.plot(val.step, val[vcol], "o", color=colour, ms=3)
                at = val[val.step == (kept or {}).get(seed)]
                ax.plot(at.step, at[vcol], "o", mfc="none", mec=colour, ms=9)
            ax.set(title=title, xlabel="step")
        for col, ls in (("alloc/evidence_scale", "-"), ("alloc/other_scale", "--")):
            if col in train:
                axes[-1].plot(train.step, train[col].rolling(window, min_periods=1).mean(), ls, color=colour)
    axes[-1].set(title="sampled scale: evidence (solid) vs other (dashed)", xlabel="step")
    axes[0].legend(fontsize=7, title="rolling mean; o validation (ringed: kept)", title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_allocations(trainer: CAPOTrainer, test_rows: list[dict], n: int = 4):
    """For `n` test videos: the frames (thumbnails) above the deterministic per-frame scales, evidence in red."""
    import matplotlib.pyplot as plt

    allocs = [a for a in trainer.validation_allocations(test_rows) if len(a["scales"]) > 1][:n]
    t = max(len(a["scales"]) for a in allocs)
    fig, axes = plt.subplots(
        2 * len(allocs),
        t,
        figsize=(0.9 * t, 2.2 * len(allocs)),
        squeeze=False,
        gridspec_kw={"height_ratios": [1, 1] * len(allocs)},
    )
    cfg = trainer.allocator.config
    for i, a in enumerate(allocs):
        sample = trainer.sample(a["row"])
        for j in range(t):
            ax_img, ax_bar = axes[2 * i, j], axes[2 * i + 1, j]
            ax_img.axis("off")
            ax_bar.set(ylim=(0, cfg.s_max), xticks=[], yticks=[] if j else [0, 1])
            if j >= len(a["scales"]):
                ax_bar.axis("off")
                continue
            ax_img.imshow(sample.frames[j], interpolation="nearest")
            colour = "tab:red" if a["evidence"][j] else "tab:blue"
            ax_bar.bar([0], [a["scales"][j]], color=colour, width=0.8)
            ax_bar.axhline(1.0, color="grey", lw=0.5, ls=":")
        axes[2 * i, 0].set_title(
            f"{a['row']['question']}  (answer {a['row']['answer']}, retention {a['retention']:.2f})",
            fontsize=8,
            loc="left",
        )
    fig.suptitle("deterministic scale per frame (red: evidence frames)", fontsize=9)
    fig.tight_layout()
    return fig
