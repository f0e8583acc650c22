"""CAPOTrainer: a TRL `GRPOTrainer` that trains the Allocator with CAPO (paper §3.3-3.4).

One generation batch holds whole prompt groups: for every prompt the Allocator draws M allocations (per-frame
scales), the budget operator resizes the frames, and the backbone rolls out N completions per allocation,
so TRL's `num_generations` is M x N and the rows of one prompt are consecutive (TRL's `RepeatSampler`). The
rewards give two advantages:

- per allocation (CAPO, or an ablation objective) for the Allocator, whose per-frame clipped PPO surrogate
  plus the concentration and temporal-similarity regularizers is optimised by its own optimizer;
- per rollout (GRPO group z-score over the prompt's M x N rollouts) for the backbone, which TRL's own loss
  optimises only when `joint_training` is on (the paper's ResAdapt-RL); by default the backbone is frozen.

What TRL 1.16 does not do for us (NOTES.md): it drops video features from the loss forward, so the visual
inputs of every rollout are carried per row and fed to every log-prob forward (`_get_per_token_logps_and_entropies`),
and generation suppresses the video pad token too.

Rollouts run on the backbone itself (transformers `generate`) or, with a frozen backbone, on a rollout engine:
an object with `sample(visuals, questions, samplings, max_new_tokens) -> list[Rollouts]`, in practice a
`resadapt.vllm_backend.VLLMBackend` on a running vLLM server. The weights never change then, so one server
serves every rollout; each allocation is one request carrying its own resized frames and a seed derived
from (seed, step, row), so rollouts do not depend on the server's state. TRL's own vLLM integration
(`use_vllm`) does not apply: it sends dataset images only (`multi_modal_data={"image": ...}`), never the
per-allocation video items, and its weight sync for joint training is an NCCL (CUDA) communicator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import get_scheduler
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from resadapt import capo
from resadapt.allocator import Allocator, FrameFeatures
from resadapt.backbone import build_inputs
from resadapt.budget import (
    VisionGeometry,
    allocation_retention,
    clip_to_saturation,
    realise,
    token_saturation_scale,
)
from resadapt.config import ALLOCATOR_SCHEDULES, OBJECTIVES, CAPOConfig
from resadapt.data.sample import LoadedSample, load_sample
from resadapt.rewards import score
from resadapt.vllm_backend import Sampling

# Keys of the backbone inputs that hold one sample's visual features (flat patch rows or per-item grids).
_VISUAL_KEYS = (
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "pixel_values",
    "image_grid_thw",
)


@dataclass
class CAPOTrainerConfig(GRPOConfig):
    """`GRPOConfig` plus the Allocator's side of CAPO. `num_generations` is derived: M x N.

    `capo` is the one typed `resadapt.config.CAPOConfig` (a mapping of its keys is validated into one); its
    scale range is replaced by the Allocator's. The Allocator's PPO clip defaults to the authors' values.
    """

    allocations_per_prompt: int = field(default=8, metadata={"help": "M: allocations drawn per prompt"})
    rollouts_per_allocation: int = field(default=2, metadata={"help": "N: backbone rollouts per allocation"})
    num_frames: int | None = field(
        default=None, metadata={"help": "frames sampled per video (None: the row's)"}
    )
    objective: str = field(default="capo", metadata={"help": f"allocator advantage: one of {OBJECTIVES}"})
    lagrangian_lambda: float = field(
        default=1.0, metadata={"help": "cost weight of the 'lagrangian' objective"}
    )
    capo: CAPOConfig = field(default_factory=CAPOConfig, metadata={"help": "CAPO coefficients"})
    target_retention: float | None = field(
        default=None,
        metadata={"help": "CAPO's target as token retention (c* per prompt); None: capo.target_cost"},
    )
    allocator_learning_rate: float = 1e-3
    allocator_relevance_learning_rate: float | None = field(
        default=None, metadata={"help": "lr of the Allocator's relevance-prior weights (None: allocator lr)"}
    )
    allocator_relevance_metric_learning_rate: float | None = field(
        default=None, metadata={"help": "lr of the relevance prior's bilinear form (None: allocator lr)"}
    )
    allocator_weight_decay: float = 0.0
    allocator_lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": f"the Allocator's learning-rate schedule over max_steps: one of {ALLOCATOR_SCHEDULES}"
        },
    )
    allocator_max_grad_norm: float = 1.0
    allocator_clip_low: float = 0.2
    allocator_clip_high: float = 0.28
    allocator_dual_clip: float = 10.0
    joint_training: bool = field(default=False, metadata={"help": "also train the backbone (ResAdapt-RL)"})
    eval_generate: bool = field(
        default=True, metadata={"help": "validation also answers (greedy) the val rows"}
    )

    def __post_init__(self):
        tr = self.target_retention
        if tr is not None and (isinstance(tr, bool) or not isinstance(tr, (int, float)) or not 0 < tr <= 1):
            raise ValueError(f"CAPOTrainerConfig.target_retention must be in (0, 1] or None, got {tr!r}")
        if isinstance(self.capo, dict):
            self.capo = CAPOConfig(**self.capo)
        if not isinstance(self.capo, CAPOConfig):
            raise ValueError(f"CAPOTrainerConfig.capo must be a CAPOConfig or a mapping, got {self.capo!r}")
        for name in ("allocations_per_prompt", "rollouts_per_allocation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CAPOTrainerConfig.{name} must be a positive integer, got {v!r}")
        if self.allocations_per_prompt < 2:
            raise ValueError(
                "CAPOTrainerConfig.allocations_per_prompt must be >= 2 (CAPO compares allocations)"
            )
        if self.allocator_lr_scheduler_type not in ALLOCATOR_SCHEDULES:
            raise ValueError(
                f"CAPOTrainerConfig.allocator_lr_scheduler_type must be one of {ALLOCATOR_SCHEDULES}, "
                f"got {self.allocator_lr_scheduler_type!r}"
            )
        if self.allocator_lr_scheduler_type != "constant" and self.max_steps <= 0:
            raise ValueError(
                f"CAPOTrainerConfig.allocator_lr_scheduler_type {self.allocator_lr_scheduler_type!r} decays over "
                "max_steps: set max_steps"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"CAPOTrainerConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        self.num_generations = group = self.allocations_per_prompt * self.rollouts_per_allocation
        if self.per_device_train_batch_size % group:
            raise ValueError(
                f"CAPOTrainerConfig.per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of allocations_per_prompt x rollouts_per_allocation ({group}): every process holds "
                "whole prompt groups"
            )
        super().__post_init__()
        if (
            self.steps_per_generation != 1
            or self.gradient_accumulation_steps != 1
            or self.num_iterations != 1
        ):
            raise ValueError(
                "CAPOTrainer makes one update per generation batch: steps_per_generation, "
                "gradient_accumulation_steps and num_iterations must be 1"
            )
        if self.use_vllm:
            raise ValueError(
                "CAPOTrainerConfig.use_vllm: TRL's vLLM generation never sends the per-allocation video "
                "items; pass CAPOTrainer(rollout_engine=resadapt.vllm_backend.VLLMBackend(...)) instead"
            )

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"capo": self.capo.model_dump()}  # JSON-safe, as TrainingArguments expects


def answer_reward(completions, task, answer, options, answer_span, **_) -> list[float]:
    """Benchmark score of each completion: short answer / multiple choice accuracy, temporal IoU."""
    return [
        score(t, c, a, o, s)
        for c, t, a, o, s in zip(completions, task, answer, options, answer_span, strict=True)
    ]


@dataclass
class _Prompt:
    """One prompt of a generation batch with everything the Allocator needs, cached per sample id."""

    row: dict
    sample: LoadedSample
    features: FrameFeatures
    query: torch.Tensor
    query_mask: torch.Tensor


def _merge_visuals(visuals: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-row visual features into one model batch (rows in order)."""
    out: dict[str, torch.Tensor] = {}
    for key in _VISUAL_KEYS:
        parts = [v[key] for v in visuals if key in v]
        if parts:
            out[key] = torch.cat(parts)
    return out


def _split_visuals(batch, items_per_sample: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Per-sample slices of a processor batch; `items_per_sample[i]` = (#video items, #images) of sample i."""
    out = []
    v_row = v_item = i_row = i_item = 0
    for n_vid, n_img in items_per_sample:
        d: dict[str, torch.Tensor] = {}
        if n_vid:
            grid = batch["video_grid_thw"][v_item : v_item + n_vid]
            rows = int(grid.prod(-1).sum())
            d["pixel_values_videos"] = batch["pixel_values_videos"][v_row : v_row + rows]
            d["video_grid_thw"] = grid
            if "second_per_grid_ts" in batch:
                d["second_per_grid_ts"] = batch["second_per_grid_ts"][v_item : v_item + n_vid]
            v_row, v_item = v_row + rows, v_item + n_vid
        if n_img:
            grid = batch["image_grid_thw"][i_item : i_item + n_img]
            rows = int(grid.prod(-1).sum())
            d["pixel_values"] = batch["pixel_values"][i_row : i_row + rows]
            d["image_grid_thw"] = grid
            i_row, i_item = i_row + rows, i_item + n_img
        out.append(d)
    return out


def _pad_rows(rows: list[np.ndarray], width: int, value: float = 0.0) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.float32))
    return out


class CAPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts go through the Allocator and the visual budget operator.

    `model` is the backbone (Qwen2-VL / 2.5-VL / 3-VL), `allocator` a `resadapt.allocator.Allocator`,
    `train_dataset` rows of the benchmark schema (`resadapt.data.embedded.Sample`) whose media live under
    `media_root`. `allocator_tokenizer` tokenizes questions for the Allocator's query encoder (default: the
    backbone's tokenizer, which is right when the Allocator was built with `Allocator.from_backbone`).
    """

    _tag_names = ["trl", "grpo", "capo", "resadapt"]

    def __init__(
        self,
        model,
        allocator: Allocator,
        args: CAPOTrainerConfig,
        train_dataset,
        processing_class,
        media_root: str | Path,
        eval_dataset=None,
        allocator_tokenizer=None,
        callbacks=None,
        rollout_engine=None,
    ):
        if not isinstance(args, CAPOTrainerConfig):
            raise TypeError(f"args must be a CAPOTrainerConfig, got {type(args).__name__}")
        if rollout_engine is not None:
            if args.joint_training:
                raise ValueError(
                    "CAPOTrainer(rollout_engine=...) needs a frozen backbone (joint_training=False): the "
                    "engine serves fixed weights and would sample from a stale backbone after one update"
                )
            if args.repetition_penalty != 1.0 or args.min_p is not None:
                raise ValueError(
                    "CAPOTrainerConfig.repetition_penalty / min_p are not passed to the rollout engine: "
                    "leave them at 1.0 / None"
                )
        cfg = model.config
        # A sampled visual pad token would have no features in the loss forward: suppress both kinds.
        suppress = [t for t in (cfg.video_token_id, cfg.image_token_id) if t is not None]
        args.generation_kwargs = {**(args.generation_kwargs or {}), "suppress_tokens": suppress}
        if not args.joint_training:
            model.requires_grad_(False)
        super().__init__(
            model=model,
            reward_funcs=[answer_reward],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        if not args.joint_training:
            self._prepare_frozen_backbone()
        self.allocator = allocator.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:  # start every process from rank 0's weights, as DDP would
            for t in self.allocator.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        self.allocator_tokenizer = allocator_tokenizer or processing_class.tokenizer
        named = [(n, p) for n, p in self.allocator.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the Allocator has no trainable parameters")
        own_lr = {
            "relevance_head.": args.allocator_relevance_learning_rate,
            "relevance_metric.": args.allocator_relevance_metric_learning_rate,
        }
        groups = [{"params": [p for n, p in named if not n.startswith(tuple(own_lr))]}]
        for prefix, lr in own_lr.items():
            params = [p for n, p in named if n.startswith(prefix)]
            if params:
                groups.append({"params": params, "lr": lr or args.allocator_learning_rate})
        self.allocator_optimizer = torch.optim.AdamW(
            groups, lr=args.allocator_learning_rate, weight_decay=args.allocator_weight_decay
        )
        # its own schedule: the Trainer's lr_scheduler_type drives the backbone's optimizer only
        self.allocator_scheduler = get_scheduler(
            args.allocator_lr_scheduler_type,
            self.allocator_optimizer,
            num_warmup_steps=0,
            num_training_steps=max(args.max_steps, 1),
        )
        self.media_root = Path(media_root)
        self.geometry = VisionGeometry.from_processor(processing_class)
        s_min, s_max = float(allocator.config.s_min), float(allocator.config.s_max)
        self.capo_config = args.capo.with_scale_range(s_min, s_max)
        self.similarity_config = capo.TemporalSimilarityConfig(s_min=s_min, s_max=s_max)
        self._feature_cache: dict[str, tuple[FrameFeatures, torch.Tensor, torch.Tensor]] = {}
        self._samples: dict[str, LoadedSample] = {}
        self._target_costs: dict[tuple[int, int, int], float] = {}
        self._loss_visuals: list[dict] | None = None
        self.rollout_engine = rollout_engine
        self.seen_prompts: list[str] = []  # sample ids this process rolled out, in order

    def _prepare_frozen_backbone(self) -> None:
        """Let accelerate place the frozen backbone without a DDP wrapper.

        DDP refuses a module without trainable parameters (and accelerate's multi-CPU path wraps
        unconditionally); a frozen backbone needs no gradient sync, the Allocator's is done in `_allocator_step`.
        """
        prepare_model = self.accelerator.prepare_model
        backbone = self.model

        def prepare(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement, evaluation_mode or model is backbone)

        self.accelerator.prepare_model = prepare

    # ------------------------------------------------------------------------------------------------------
    # Prompts: decoded frames and frozen Allocator features, cached per sample.

    def _num_frames(self, row: dict) -> int:
        return int(self.args.num_frames or row["num_frames"] or 1)

    def sample(self, row: dict) -> LoadedSample:
        """A row decoded (cached: the fixed validation and report rows are decoded once)."""
        key = str(row["id"])
        if key not in self._samples:
            self._samples[key] = load_sample(row, self.media_root, self._num_frames(row))
        return self._samples[key]

    def prompt(self, row: dict, keep_frames: bool = False) -> _Prompt:
        """Decoded frames plus the frozen Allocator features of a row.

        Features are cached for every row (the loss forward needs them again); decoded frames only with
        `keep_frames` (the fixed validation rows), because training rows are many and frames are big.
        """
        key = str(row["id"])
        sample = (
            self.sample(row)
            if keep_frames
            else self._samples.get(key) or load_sample(row, self.media_root, self._num_frames(row))
        )
        if key not in self._feature_cache:
            features = self.allocator.encode_frames([sample.frames])
            tok = self.allocator_tokenizer(
                [row["question"]], add_special_tokens=False, return_tensors="pt", padding=True
            )
            device = self.accelerator.device
            query, query_mask = self.allocator.encode_query(
                tok["input_ids"].to(device), tok["attention_mask"].to(device)
            )
            self._feature_cache[key] = (features, query, query_mask)
        return _Prompt(row, sample, *self._feature_cache[key])

    def _cached_prompt(self, key: str) -> _Prompt:
        features, query, query_mask = self._feature_cache[key]
        return _Prompt({}, None, features, query, query_mask)  # type: ignore[arg-type]

    def allocator_batch(self, prompts: list[_Prompt], repeat: int = 1):
        """(frame features, query, query mask) of prompts, each repeated `repeat` times, as one batch."""
        feats = FrameFeatures.cat([p.features for p in prompts for _ in range(repeat)])
        q = torch.nn.utils.rnn.pad_sequence(
            [p.query[0] for p in prompts for _ in range(repeat)], batch_first=True
        )
        qm = torch.nn.utils.rnn.pad_sequence(
            [p.query_mask[0] for p in prompts for _ in range(repeat)], batch_first=True
        )
        return feats, q, qm

    # ------------------------------------------------------------------------------------------------------
    # Rollouts.

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        M, N = self.args.allocations_per_prompt, self.args.rollouts_per_allocation
        G = M * N
        if len(inputs) % G:
            raise ValueError(f"generation batch of {len(inputs)} rows is not whole groups of {G}")
        rows = inputs[::G]
        for i, r in enumerate(rows):
            group = {str(x["id"]) for x in inputs[i * G : (i + 1) * G]}
            if group != {str(r["id"])}:
                raise ValueError(f"rows of prompt group {i} are not one prompt: {sorted(group)}")
        t0 = time.perf_counter()
        prompts = [self.prompt(r) for r in rows]
        self.seen_prompts += [str(r["id"]) for r in rows]
        P = len(prompts)

        # M allocations per prompt, one shared by its N rollouts (design decision 3).
        self.allocator.eval()
        with torch.no_grad():
            feats, q, qm = self.allocator_batch(prompts, repeat=M)
            out = self.allocator(feats.tokens, feats.mask, q, qm)
            u, scales, logp = self.allocator.sample(out)
        frame_mask = out.frame_mask
        t_alloc = time.perf_counter() - t0

        visuals, questions, tokens, refs, chunk_rows = [], [], [], [], []
        for k in range(P * M):
            p = prompts[k // M]
            n = int(frame_mask[k].sum())
            s = self._operator_scales(p.sample, scales[k, :n].cpu().numpy())
            r = realise(p.sample, s, self.geometry)
            visual, tok, ref = r.visual, r.tokens, r.reference_tokens
            visuals.append(visual)
            questions.append(p.row["question"])
            tokens.append(tok)
            refs.append(ref)
            chunk_rows.append((len(visual.chunks), 1 if visual.image is not None else 0))
        batch = build_inputs(self.processing_class, visuals, questions).to(device)
        t_operator = time.perf_counter() - t0 - t_alloc

        if self.rollout_engine is None:
            with (
                unwrap_model_for_generation(
                    self.model_wrapped,
                    self.accelerator,
                    gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                    generation_kwargs=self.generation_kwargs,
                    gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                ) as unwrapped,
                torch.no_grad(),
            ):
                seq = unwrapped.generate(
                    **batch, generation_config=self.generation_config, num_return_sequences=N
                )
            completion_ids = seq[:, batch["input_ids"].shape[1] :]
        else:
            completion_ids = self._engine_rollouts(batch, visuals, questions, N)
        t_generate = time.perf_counter() - t0 - t_alloc - t_operator

        prompt_ids = batch["input_ids"].repeat_interleave(N, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(N, dim=0)
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=device))
        eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
        eos_idx[is_eos.any(1)] = is_eos.int().argmax(1)[is_eos.any(1)]
        positions = torch.arange(is_eos.size(1), device=device).expand_as(completion_ids)
        completion_mask = (positions <= eos_idx.unsqueeze(1)).long()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self._tokenizer.pad_token_id)
        keep = max(int(completion_mask.sum(1).max()), 1)
        completion_ids, completion_mask = completion_ids[:, :keep], completion_mask[:, :keep]
        completion_list = [c[m.bool()].tolist() for c, m in zip(completion_ids, completion_mask, strict=True)]
        completions = self.processing_class.batch_decode(completion_list, skip_special_tokens=True)

        # TRL gathers rewards over processes; every process holds whole groups, so take the local slice.
        rewards_all = self._calculate_rewards(
            inputs, [r["question"] for r in inputs], completions, completion_list
        )
        B = len(inputs)
        local = slice(self.accelerator.process_index * B, (self.accelerator.process_index + 1) * B)
        rewards = torch.nan_to_num(rewards_all[local, 0], nan=0.0)

        # Backbone: GRPO z-score over each prompt's M x N rollouts (used only with joint training).
        grouped = rewards.view(P, G)
        advantages = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        advantages = advantages.reshape(-1)

        # Allocator: one advantage per allocation from its mean accuracy and proxy cost.
        acc = grouped.view(P, M, N).mean(-1)
        saturation = torch.tensor(
            [self._saturation(prompts[k // M].sample) for k in range(P * M)], device=device
        ).unsqueeze(1)
        cost = capo.proxy_cost(scales, frame_mask, self.capo_config, saturation).view(P, M)
        target = None
        if self.args.target_retention is not None:
            target = torch.tensor([self._target_cost(p.sample) for p in prompts], device=device)
            self._metrics[mode]["alloc/target_cost"].append(float(target.mean()))
        alloc_adv, parts = self._allocation_advantage(acc, cost, target)
        if self._constrains_budget():
            det = self._deterministic_retention(prompts, out, M)
        else:
            det = torch.full((P,), float("nan"), device=device)

        # Per-row tensors: every rollout row carries its allocation; only the first row of an allocation
        # trains the Allocator (each allocation once, reference §3.5).
        row_alloc = torch.arange(P * M, device=device).repeat_interleave(N)
        first = torch.zeros(B, dtype=torch.bool, device=device)
        first[::N] = True
        visual_rows = _split_visuals(batch, chunk_rows)
        mm = batch["mm_token_type_ids"].repeat_interleave(N, dim=0)
        mm = torch.cat([mm, mm.new_zeros(completion_ids.shape)], dim=1)
        output = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "num_items_in_batch": self.accelerator.gather(completion_mask.sum()).sum(),
            "mm_token_type_ids": mm,
            "visuals": [visual_rows[k] for k in row_alloc.tolist()],
            "sample_id": [str(prompts[k // M].row["id"]) for k in row_alloc.tolist()],
            "alloc_first": first,
            "alloc_u": u[row_alloc],
            "alloc_logp": logp[row_alloc],
            "alloc_mask": frame_mask[row_alloc],
            "alloc_adv": alloc_adv.reshape(-1)[row_alloc],
            "alloc_det_retention": det.repeat_interleave(M * N),
        }

        # Metrics, averaged over processes by TRL's logger.
        retention = torch.tensor([t / r for t, r in zip(tokens, refs, strict=True)], device=device)
        masked = torch.where(frame_mask, scales, torch.zeros_like(scales))
        mean_scale = masked.sum(1) / frame_mask.sum(1).clamp(min=1)
        conc = (
            torch.where(frame_mask, out.alpha + out.beta, torch.zeros_like(out.alpha)).sum()
            / frame_mask.sum()
        )
        ev, other = self._evidence_scales([prompts[k // M].sample for k in range(P * M)], scales, frame_mask)
        g = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["reward"].append(g(rewards).mean().item())
        metrics["reward_std"].append(g(rewards).std().item())
        metrics["rewards/answer_reward/mean"].append(g(rewards).mean().item())
        metrics["alloc/accuracy"].append(g(acc.reshape(-1)).mean().item())
        metrics["alloc/mean_scale"].append(g(mean_scale).mean().item())
        metrics["alloc/retention"].append(g(retention).mean().item())
        metrics["alloc/cost"].append(g(cost.reshape(-1)).mean().item())
        metrics["alloc/advantage_mean"].append(g(alloc_adv.reshape(-1)).mean().item())
        metrics["alloc/advantage_std"].append(g(alloc_adv.reshape(-1)).std().item())
        metrics["alloc/advantage_min"].append(g(alloc_adv.reshape(-1)).min().item())
        metrics["alloc/advantage_max"].append(g(alloc_adv.reshape(-1)).max().item())
        metrics["alloc/frac_correct"].append(g(parts["correct"].float().reshape(-1)).mean().item())
        metrics["alloc/concentration"].append(g(conc.reshape(1)).mean().item())
        if not math.isnan(ev):
            metrics["alloc/evidence_scale"].append(ev)
            metrics["alloc/other_scale"].append(other)
        metrics["backbone/advantage_std"].append(g(advantages).std().item())
        metrics["time/allocator"].append(t_alloc)
        metrics["time/operator"].append(t_operator)
        metrics["time/generate"].append(t_generate)
        return output

    def _engine_sample(
        self, batch, visuals, questions, samplings: list[Sampling], max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """Completion token ids from the rollout engine, `samplings[k].n` per prompt k, prompt-major.

        The engine must answer the prompt the loss forward sees: its prompt token ids are checked against the
        processor's for every request.
        """
        results = self.rollout_engine.sample(
            visuals, questions, samplings, max_new_tokens=max_new_tokens or self.max_completion_length
        )
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        for k, r in enumerate(results):
            expected = ids[k][mask[k]].tolist()
            if r.prompt_token_ids != expected:
                raise RuntimeError(
                    f"the rollout engine's prompt {k} ({len(r.prompt_token_ids)} tokens) differs from the "
                    f"processor's ({len(expected)} tokens): it would answer another input than the loss sees"
                )
        return [c for r in results for c in r.completion_token_ids]

    def _engine_rollouts(self, batch, visuals, questions, n: int) -> torch.Tensor:
        """(P*M*n, L) completion ids sampled by the rollout engine, right-padded, allocation-major.

        Each request's seed is a function of (seed, step, process, allocation): a resumed run draws the same
        rollouts as an uninterrupted one, whatever the server did before.
        """
        a = self.args
        base = a.seed * 1_000_003 + self.state.global_step * 10_007 + self.accelerator.process_index * 1_009
        samplings = [
            Sampling(
                n=n,
                temperature=a.temperature,
                top_p=a.top_p,
                top_k=a.top_k or None,
                seed=(base + k) % 2**31,
                suppress_token_ids=tuple(self.generation_kwargs["suppress_tokens"]),
            )
            for k in range(len(visuals))
        ]
        rows = self._engine_sample(batch, visuals, questions, samplings)
        out = torch.full(
            (len(rows), max([1, *map(len, rows)])), self._tokenizer.pad_token_id, dtype=torch.long
        )
        for i, c in enumerate(rows):
            out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        return out.to(self.accelerator.device)

    def _operator_scales(self, sample: LoadedSample, scales: np.ndarray) -> np.ndarray:
        """What the budget operator gets: video scales clipped at token saturation (`clip_to_saturation`)."""
        s = np.asarray(scales, dtype=np.float64)
        if sample.is_image:
            return s
        h, w = sample.frames.shape[-3:-1]
        return clip_to_saturation(s, h, w, self.geometry, self.capo_config.s_max)

    def _saturation(self, sample: LoadedSample) -> float:
        h, w = sample.frames.shape[-3:-1]
        return token_saturation_scale(int(h), int(w), self.geometry, self.capo_config.s_max)

    def _target_cost(self, sample: LoadedSample) -> float:
        """c* of `target_retention` for this sample's frame size and count (cached per shape)."""
        h, w = sample.size
        n = 1 if sample.is_image else len(sample.frames)
        key = (h, w, n)
        if key not in self._target_costs:
            self._target_costs[key] = capo.target_cost_for_retention(
                self.args.target_retention, h, w, n, self.geometry, self.capo_config
            )
        return self._target_costs[key]

    def _constrains_budget(self) -> bool:
        return (
            self.args.objective == "capo"
            and self.capo_config.budget_coef > 0
            and self.args.target_retention is not None
        )

    def _deterministic_retention(self, prompts: list[_Prompt], out, M: int) -> torch.Tensor:
        """Measured retention (P,) of each prompt's Beta-mean allocation, the value the budget constraint
        pulls onto the target: the deterministic Allocator is the one reported."""
        means = self.allocator.mean_scales(out).detach().cpu().numpy()
        mask = out.frame_mask.cpu().numpy()
        values = []
        for i, p in enumerate(prompts):
            k = i * M  # the M copies of a prompt share its Beta parameters
            scales = self._operator_scales(p.sample, means[k, : int(mask[k].sum())])
            values.append(allocation_retention(scales, *p.sample.size, self.geometry, p.sample.is_image))
        return torch.tensor(values, dtype=torch.float32, device=self.accelerator.device)

    def _allocation_advantage(self, acc: torch.Tensor, cost: torch.Tensor, target=None):
        if self.args.objective == "capo":
            return capo.capo_advantage(acc, cost, self.capo_config, target)
        if self.args.objective == "no_cost":
            adv = capo.no_cost_advantage(acc)
        else:
            adv = capo.lagrangian_advantage(acc, cost, self.args.lagrangian_lambda)
        return adv, {"correct": acc > self.capo_config.correct_threshold}

    def _evidence_scales(self, samples: list[LoadedSample], scales: torch.Tensor, mask: torch.Tensor):
        """Mean scale on evidence frames and on the other frames (video samples with evidence only)."""
        ev, other = [], []
        for k, s in enumerate(samples):
            if s.is_image or not s.evidence_mask.any():
                continue
            n = int(mask[k].sum())
            sc = scales[k, :n].cpu().numpy()
            ev.extend(sc[s.evidence_mask[:n]].tolist())
            other.extend(sc[~s.evidence_mask[:n]].tolist())
        if not ev or not other:
            return float("nan"), float("nan")
        return float(np.mean(ev)), float(np.mean(other))

    # ------------------------------------------------------------------------------------------------------
    # Losses.

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        visuals: list[dict] | None = None,
        mm_token_type_ids=None,
        **image_kwargs,
    ):
        """Per-token log-probs with each row's own visual features (TRL's version drops video ones)."""
        visuals = visuals if visuals is not None else self._loss_visuals
        if visuals is None:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                mm_token_type_ids=mm_token_type_ids,
                **image_kwargs,
            )
        if len(visuals) != input_ids.size(0):
            raise ValueError(f"{len(visuals)} visual rows for a batch of {input_ids.size(0)}")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids = input_ids[start:end]
            mask = attention_mask[start:end]
            model_inputs = {"input_ids": ids, "attention_mask": mask, **_merge_visuals(visuals[start:end])}
            if mm_token_type_ids is not None:
                model_inputs["mm_token_type_ids"] = mm_token_type_ids[start:end]
            if compute_aux_loss:
                model_inputs["output_router_logits"] = True
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                outputs = model(**model_inputs, labels=labels, fused_lm_head=True)
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                aux.append(outputs.aux_loss)
        return (
            torch.cat(logps),
            torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux).mean() if compute_aux_loss else None,
        )

    def allocator_loss(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-frame clipped PPO on the latent u + concentration + temporal-similarity regularizers."""
        first = inputs["alloc_first"]
        idx = first.nonzero().flatten().tolist()
        prompts = [self._cached_prompt(inputs["sample_id"][i]) for i in idx]
        feats, q, qm = self.allocator_batch(prompts)
        self.allocator.train()
        out = self.allocator(feats.tokens, feats.mask, q, qm)
        T = out.alpha.shape[1]
        u = inputs["alloc_u"][first][:, :T]
        logp_old = inputs["alloc_logp"][first][:, :T]
        mask = inputs["alloc_mask"][first][:, :T] & out.frame_mask
        logp_new = self.allocator.log_prob(out, u)
        a = self.args
        adv = inputs["alloc_adv"][first]
        ppo, m = capo.ppo_frame_loss(
            logp_new,
            logp_old,
            adv,
            mask,
            a.allocator_clip_low,
            a.allocator_clip_high,
            a.allocator_dual_clip,
        )
        c = self.capo_config
        conc = capo.concentration_loss(*self.allocator.spread_parameters(out), mask, c.concentration_cap)
        sim = capo.temporal_similarity_loss(
            out.frame_features, out.alpha, out.beta, mask, self.similarity_config
        )
        loss = ppo + c.concentration_coef * conc + c.similarity_coef * sim
        metrics = {"alloc/ppo_loss": ppo.item(), "alloc/sim_loss": sim.item(), "alloc/conc_loss": conc.item()}
        if self._constrains_budget():
            det = inputs["alloc_det_retention"][first]
            budget, r_det = capo.budget_constraint(
                self.allocator.budget_mean_scales(out),
                out.frame_mask,
                det,
                a.target_retention,
                c.budget_coef,
                c.budget_scope,
                batch=self.accelerator.gather(det) if self.accelerator.num_processes > 1 else None,
            )
            loss = loss + budget
            metrics |= {"alloc/budget_loss": budget.item(), "alloc/deterministic_retention": r_det.item()}
        metrics |= {f"alloc/{k}": v.item() for k, v in m.items()}
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("CAPOTrainer does not return outputs")
        loss, metrics = self.allocator_loss(inputs)
        mode = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self._metrics[mode][k].append(v)
        if self.args.joint_training:
            self._loss_visuals = inputs["visuals"]
            try:
                loss = loss + super()._compute_loss(model, inputs)
            finally:
                self._loss_visuals = None
        return loss

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._allocator_step()
        return loss

    def _allocator_step(self) -> None:
        params = [p for p in self.allocator.parameters() if p.requires_grad]
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.allocator_max_grad_norm)
        self._metrics["train"]["alloc/grad_norm"].append(float(norm))
        self._metrics["train"]["alloc/lr"].append(self.allocator_scheduler.get_last_lr()[0])
        self.allocator_optimizer.step()
        self.allocator_optimizer.zero_grad(set_to_none=True)
        self.allocator_scheduler.step()

    # ------------------------------------------------------------------------------------------------------
    # Validation: the deterministic Allocator on the eval rows (logged, so it lands in the checkpoints' state).

    @torch.no_grad()
    def validation_allocations(self, rows: list[dict]) -> list[dict]:
        """Deterministic (Beta-mean) allocation of each row: scales, measured retention, evidence gap."""
        self.allocator.eval()
        prompts = [self.prompt(r, keep_frames=True) for r in rows]
        feats, q, qm = self.allocator_batch(prompts)
        out = self.allocator(feats.tokens, feats.mask, q, qm)
        scales = self.allocator.mean_scales(out)
        result = []
        for k, p in enumerate(prompts):
            n = int(out.frame_mask[k].sum())
            s = self._operator_scales(p.sample, scales[k, :n].cpu().numpy())
            r = realise(p.sample, s, self.geometry)
            visual, tok, ref = r.visual, r.tokens, r.reference_tokens
            ev = p.sample.evidence_mask[:n] if not p.sample.is_image else np.array([True])
            result.append(
                {
                    "row": p.row,
                    "scales": s,
                    "visual": visual,
                    "tokens": tok,
                    "retention": tok / ref,
                    "evidence": ev,
                }
            )
        return result

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("CAPOTrainer.evaluate needs an eval_dataset")
        rows = [dict(r) for r in dataset]
        allocs = self.validation_allocations(rows)
        ev = [
            s
            for a in allocs
            for s, e in zip(a["scales"], a["evidence"], strict=True)
            if e and len(a["scales"]) > 1
        ]
        other = [
            s
            for a in allocs
            for s, e in zip(a["scales"], a["evidence"], strict=True)
            if not e and len(a["scales"]) > 1
        ]
        metrics = {
            f"{metric_key_prefix}_mean_scale": float(np.mean([a["scales"].mean() for a in allocs])),
            f"{metric_key_prefix}_retention": float(np.mean([a["retention"] for a in allocs])),
        }
        if ev and other:
            metrics[f"{metric_key_prefix}_evidence_gap"] = float(np.mean(ev) - np.mean(other))
        tasks = [a["row"]["task"] for a in allocs]
        scores = self.greedy_scores(allocs) if self.args.eval_generate else None
        if scores is not None:
            metrics[f"{metric_key_prefix}_accuracy"] = float(np.mean(scores))
        if len(set(tasks)) > 1:  # per task too: one family may spend what another saves
            for task in sorted(set(tasks)):
                at = [i for i, t in enumerate(tasks) if t == task]
                metrics[f"{metric_key_prefix}_{task}_retention"] = float(
                    np.mean([allocs[i]["retention"] for i in at])
                )
                if scores is not None:
                    metrics[f"{metric_key_prefix}_{task}_accuracy"] = float(np.mean([scores[i] for i in at]))
        self.log(metrics)
        return metrics

    @torch.no_grad()
    def greedy_scores(
        self, allocs: list[dict], batch_size: int = 16, max_new_tokens: int | None = None
    ) -> list[float]:
        """Greedy answer scores of {"row", "visual"} items with the (unwrapped) backbone or the rollout engine,
        answers of up to `max_new_tokens` (default the rollouts' `max_completion_length`; a test report passes
        the evaluation's, so an answer that runs on past its first tokens is scored whole)."""
        max_new_tokens = max_new_tokens or self.max_completion_length
        scores = []
        model = self.accelerator.unwrap_model(self.model)
        tok = self._tokenizer
        suppress = self.generation_kwargs["suppress_tokens"]
        for i in range(0, len(allocs), batch_size):
            part = allocs[i : i + batch_size]
            visuals = [a["visual"] for a in part]
            questions = [a["row"]["question"] for a in part]
            batch = build_inputs(self.processing_class, visuals, questions).to(self.accelerator.device)
            if self.rollout_engine is None:
                seq = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    suppress_tokens=suppress,
                )
                completions = seq[:, batch["input_ids"].shape[1] :]
            else:
                greedy = Sampling(suppress_token_ids=tuple(suppress))
                completions = self._engine_sample(
                    batch, visuals, questions, [greedy] * len(part), max_new_tokens
                )
            texts = tok.batch_decode(completions, skip_special_tokens=True)
            for a, t in zip(part, texts, strict=True):
                r = a["row"]
                scores.append(score(r["task"], t, r["answer"], r["options"], r["answer_span"]))
        return scores

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints hold both models and both optimizers.

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            self.save_allocator(folder / "allocator")
        super()._save_checkpoint(model, trial)

    def save_allocator(self, path: str | Path) -> Path:
        """The Allocator (save_pretrained), its tokenizer and its optimizer state, in one folder."""
        path = Path(path)
        self.allocator.save_pretrained(path, safe_serialization=True)
        self.allocator_tokenizer.save_pretrained(path)
        torch.save(self.allocator_optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.allocator_scheduler.state_dict(), path / "scheduler.pt")
        return path

    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """The Allocator and its optimizer (with joint training, the backbone weights too) as `checkpoint`
        holds them: how a finished run is reloaded, and how the train stage keeps an earlier checkpoint."""
        self._load_from_checkpoint(str(checkpoint))
        self._load_allocator(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.args.joint_training:
            return  # a frozen backbone is the stage input, identical in every checkpoint
        # The Trainer's own loader misses Qwen-VL checkpoints saved in the original key layout (visual.*,
        # model.*), silently keeping the current weights; from_pretrained applies the key mapping.
        loaded = type(self.accelerator.unwrap_model(self.model)).from_pretrained(resume_from_checkpoint)
        self.accelerator.unwrap_model(self.model).load_state_dict(loaded.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_allocator(checkpoint)

    def _load_allocator(self, checkpoint: str | Path) -> None:
        path = Path(checkpoint) / "allocator"
        weights = path / "model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"checkpoint {checkpoint} has no allocator ({weights} is missing)")
        state = load_file(str(weights), device=str(self.accelerator.device))
        self.allocator.load_state_dict(state)
        self.allocator_optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=self.accelerator.device, weights_only=True)
        )
        self.allocator_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
