"""The `train` and `ablation` stages: CAPO training of the Allocator and what their reports show.

Stage logic lives here (imported, linted, tested); the notebooks call these functions and plot. Runs are
resumable: each run writes checkpoints under a folder named after a fingerprint of everything that
determines it, outside the DVC outputs (DVC deletes declared outputs before a stage runs, and a killed run
must find its checkpoints). Another configuration gets another folder, so a stale run is never resumed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint

from resadapt.allocator import Allocator, hard_budget_scales
from resadapt.budget import uniform_scale_for_retention
from resadapt.calibration import apply_scales, chunk_evidence, condition_scales
from resadapt.config import Params, RLParams
from resadapt.data.embedded import load_benchmark
from resadapt.rewards import score
from resadapt.trainer import CAPOTrainer, CAPOTrainerConfig


def build_allocator(params: Params, backbone) -> Allocator:
    """A fresh Allocator (uniform initial policy) over the configured frozen encoder."""
    a = params.allocator
    kwargs = dict(
        coarse_size=a.coarse_size,
        dim=a.dim,
        depth=a.depth,
        num_heads=a.num_heads,
        s_min=a.s_min,
        s_max=a.s_max,
        beta_max=a.beta_max,
    )
    if a.encoder == "backbone":
        return Allocator.from_backbone(backbone, **kwargs)
    import transformers

    smol = transformers.AutoModelForImageTextToText.from_pretrained(a.encoder_path)
    return Allocator.from_smolvlm(smol, **kwargs)


def rows(params: Params, split: str, tasks: list[str], limit: int | None = None) -> list[dict]:
    """Benchmark rows of `split` for `tasks`, at most `limit` per task, in table order."""
    table = load_benchmark(params.data.root)
    if split not in table:
        raise KeyError(f"benchmark at {params.data.root} has no split {split!r}")
    out = []
    for task in tasks:
        part = [dict(r) for r in table[split] if r["task"] == task]
        out += part[:limit] if limit else part
    return out


def fingerprint(params: Params, rl: RLParams, objective: str, max_steps: int) -> str:
    """12 hex digits identifying a run: the params it reads plus the backbone and data it trains on."""
    backbone = Path(params.backbone.path)
    stamp = {
        "seed": params.seed,
        "data": params.data.model_dump(),
        "budget": params.budget.model_dump(),
        "allocator": params.allocator.model_dump(),
        "rl": rl.model_dump(),
        "objective": objective,
        "max_steps": max_steps,
        "backbone": sorted((p.name, p.stat().st_size) for p in backbone.glob("*") if p.is_file()),
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
        allocations_per_prompt=rl.allocations_per_prompt,
        rollouts_per_allocation=rl.rollouts_per_allocation,
        temperature=rl.temperature,
        max_completion_length=rl.max_completion_length,
        objective=objective,
        lagrangian_lambda=rl.lagrangian_lambda,
        capo=rl.capo.model_dump(),
        allocator_learning_rate=rl.learning_rate,
        concentration_coef=rl.concentration_coef,
        similarity_coef=rl.similarity_coef,
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
    **overrides,
) -> CAPOTrainer:
    """A CAPOTrainer over the train split (rl.tasks) with the val split as validation rows."""
    objective = objective or rl.objective
    args = trainer_config(params, rl, run_dir, objective, max_steps or rl.max_steps, **overrides)
    train_rows = rows(params, "train", rl.tasks)
    val_rows = rows(params, "val", rl.tasks, limit=max(1, rl.val_samples // len(rl.tasks)))
    return CAPOTrainer(
        model=model,
        allocator=allocator or build_allocator(params, model),
        args=args,
        train_dataset=Dataset.from_list([r | {"prompt": r["question"]} for r in train_rows]),
        eval_dataset=Dataset.from_list([r | {"prompt": r["question"]} for r in val_rows]),
        processing_class=processor,
        media_root=params.data.root,
    )


def run(
    params: Params,
    rl: RLParams,
    model,
    processor,
    checkpoints: str | Path,
    objective: str | None = None,
    max_steps: int | None = None,
) -> CAPOTrainer:
    """Train (or resume, if this exact run left checkpoints) and return the trainer."""
    objective = objective or rl.objective
    steps = max_steps or rl.max_steps
    run_dir = Path(checkpoints) / f"{objective}-{fingerprint(params, rl, objective, steps)}"
    trainer = make_trainer(params, rl, model, processor, run_dir, objective, steps)
    last = get_last_checkpoint(str(run_dir)) if run_dir.exists() else None
    if last:
        print(f"resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)
    return trainer


def log_frames(trainer: CAPOTrainer) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-step training log, validation log) from the trainer's history."""
    hist = pd.DataFrame(trainer.state.log_history)
    train = hist[hist.columns[hist.columns.str.startswith("alloc/") | hist.columns.isin(["step", "reward"])]]
    train = train.dropna(subset=["alloc/mean_scale"]) if "alloc/mean_scale" in train else train
    val_cols = [c for c in hist.columns if c.startswith("eval_")]
    val = hist.dropna(subset=[val_cols[0]])[["step", *val_cols]] if val_cols else pd.DataFrame()
    return train.reset_index(drop=True), val.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Test-split evaluation of the trained Allocator against FixedScale and the Oracle (the acceptance table).


def compare_allocations(
    trainer: CAPOTrainer, test_rows: list[dict], operating_retention: float
) -> pd.DataFrame:
    """Per test row: prediction score and measured retention for each allocation method.

    Methods: `resadapt` (deterministic Beta mean), `resadapt_hard` (hard budget at `operating_retention`),
    `fixed_scale` (uniform scale giving ResAdapt's mean retention on this row's frames), `oracle` (evidence
    chunks at full resolution, the rest at s_min) and `full`.
    """
    geom = trainer.geometry
    s_min = float(trainer.allocator.config.s_min)
    s_max = float(trainer.allocator.config.s_max)
    allocs = trainer.validation_allocations(test_rows)
    mean_ret = float(np.mean([a["retention"] for a in allocs]))
    items, meta = [], []
    for a in allocs:
        sample = trainer._sample_cache[str(a["row"]["id"])]
        h, w = sample.frames.shape[-3:-1]
        n = len(a["scales"])
        per_method = {
            "resadapt": a["scales"],
            "resadapt_hard": hard_budget_scales(a["scales"], h, w, geom, operating_retention, s_min, s_max),
            "fixed_scale": np.full(n, uniform_scale_for_retention(mean_ret, h, w, max(n, 1), geom)),
            "oracle": condition_scales("oracle", sample, s_min, geom.temporal_patch_size),
            "full": np.ones(n),
        }
        for method, scales in per_method.items():
            visual, tokens, ref = apply_scales(sample, np.asarray(scales, dtype=np.float64), geom)
            items.append({"row": a["row"], "visual": visual})
            meta.append(
                {"id": a["row"]["id"], "task": a["row"]["task"], "method": method, "retention": tokens / ref}
            )
    out = []
    for i in range(0, len(items), 16):
        part = items[i : i + 16]
        for m, p in zip(meta[i : i + 16], _score_batch(trainer, part), strict=True):
            out.append(m | {"score": p})
    return pd.DataFrame(out)


def _score_batch(trainer: CAPOTrainer, part: list[dict]) -> list[float]:
    import torch

    from resadapt.backbone import build_inputs

    model = trainer.accelerator.unwrap_model(trainer.model)
    tok = trainer.processing_class.tokenizer
    batch = build_inputs(
        trainer.processing_class, [a["visual"] for a in part], [a["row"]["question"] for a in part]
    )
    with torch.no_grad():
        seq = model.generate(
            **batch,
            max_new_tokens=trainer.max_completion_length,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=trainer.generation_kwargs["suppress_tokens"],
        )
    texts = tok.batch_decode(seq[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        score(a["row"]["task"], t, a["row"]["answer"], a["row"]["options"], a["row"]["answer_span"])
        for a, t in zip(part, texts, strict=True)
    ]


def evidence_gap(trainer: CAPOTrainer, test_rows: list[dict]) -> dict:
    """Mean deterministic scale on evidence chunks vs the other chunks (active perception)."""
    tp = trainer.geometry.temporal_patch_size
    ev, other = [], []
    for a in trainer.validation_allocations(test_rows):
        sample = trainer._sample_cache[str(a["row"]["id"])]
        if sample.is_image:
            continue
        chunks = np.array([a["scales"][k * tp : (k + 1) * tp].mean() for k in range(len(a["scales"]) // tp)])
        mask = chunk_evidence(sample, tp)[: len(chunks)]
        ev += chunks[mask].tolist()
        other += chunks[~mask].tolist()
    return {
        "evidence_scale": float(np.mean(ev)),
        "other_scale": float(np.mean(other)),
        "gap": float(np.mean(ev) - np.mean(other)),
    }
