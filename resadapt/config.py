"""Typed, validated configuration loaded from params.yaml.

Every stage loads the whole file through `load_params` before it does any work, so a bad value stops the
pipeline at once with a message naming the key and what is allowed. Unknown keys are errors too: a typo
must never be silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Task = Literal["detail_qa", "multi_frame", "grounding", "image_qa", "long_video", "coarse_qa"]
Method = Literal[  # the names of `resadapt.baselines.METHODS` (tests/test_evaluate.py keeps them equal)
    "vanilla",
    "fixed_scale",
    "random_chunk_drop",
    "random_token_drop",
    "tome",
    "visionzip",
    "slow_fast",
    "frame_selection",
    "oracle",
    "prior_only",
    "prior_only_hard",
    "resadapt",
    "resadapt_hard",
]
Architecture = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TASKS: tuple[str, ...] = get_args(Task)
METHODS: tuple[str, ...] = get_args(Method)
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
Budget = Annotated[float, Field(gt=0.0, le=1.0)]
Backend = Literal["transformers", "vllm"]  # generation engine: transformers in-process, or a vLLM server
PositiveInt = Annotated[int, Field(ge=1)]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and what is allowed."""


def positive_number(name: str, value: Any) -> float:
    """`value` as a positive finite float, or a ValueError naming `name` (for checks outside params)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSizes(_Section):
    """How many items of each kind a split holds."""

    card_videos: PositiveInt
    compare_videos: PositiveInt
    grounding_videos: PositiveInt
    images: PositiveInt
    long_videos: PositiveInt
    coarse_questions: Annotated[int, Field(ge=0)] = 0  # the first N card videos also get a coarse_qa question

    @model_validator(mode="after")
    def _coarse_on_card_videos(self) -> SplitSizes:
        if self.coarse_questions > self.card_videos:
            raise ValueError(
                f"coarse_questions ({self.coarse_questions}) are asked about card videos: at most card_videos "
                f"({self.card_videos})"
            )
        return self


class DataParams(_Section):
    root: str = "data/embedded"
    frame_size: Annotated[int, Field(ge=56, le=1792)] = 224
    fps: Annotated[float, Field(gt=0.0, le=60.0)] = 2.0
    num_frames: PositiveInt = 16
    long_num_frames: PositiveInt = 64
    long_card_frames: PositiveInt = 4
    cards_per_video: Annotated[int, Field(ge=2, le=6)] = 3
    glyph_sizes: Annotated[list[Annotated[int, Field(ge=1, le=4)]], Field(min_length=1)] = [2, 3, 4]
    splits: dict[Literal["train", "val", "test"], SplitSizes]

    @field_validator("frame_size")
    @classmethod
    def _multiple_of_cell(cls, v: int) -> int:
        if v % 28:
            raise ValueError("must be a multiple of 28 (one visual token)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataParams:
        if self.num_frames % 2:
            raise ValueError(f"data.num_frames must be even (temporal patch size 2), got {self.num_frames}")
        if self.long_num_frames < self.num_frames:
            raise ValueError(
                f"data.long_num_frames ({self.long_num_frames}) must be >= data.num_frames ({self.num_frames})"
            )
        if self.long_card_frames % 2 or self.long_num_frames % self.long_card_frames:
            raise ValueError(
                f"data.long_card_frames ({self.long_card_frames}) must be even and divide "
                f"data.long_num_frames ({self.long_num_frames})"
            )
        if self.num_frames // 2 < self.cards_per_video:
            raise ValueError(
                f"data.cards_per_video ({self.cards_per_video}) needs at least as many chunks; "
                f"data.num_frames={self.num_frames} gives {self.num_frames // 2}"
            )
        if self.cards_per_video > 5 and any(s.coarse_questions for s in self.splits.values()):
            raise ValueError(
                f"data.cards_per_video ({self.cards_per_video}) leaves no colour unshown for coarse_qa to name "
                "beside a shown one (6 colours); use at most 5, or coarse_questions: 0"
            )
        missing = {"train", "val", "test"} - set(self.splits)
        if missing:
            raise ValueError(f"data.splits is missing {sorted(missing)}")
        return self


class BudgetParams(_Section):
    """The visual budget operator's range and the processor's pixel clamps."""

    s_min: Annotated[float, Field(gt=0.0, le=4.0)] = 0.125
    s_max: Annotated[float, Field(gt=0.0, le=4.0)] = 1.0
    min_pixels: PositiveInt = 28 * 28
    max_pixels: PositiveInt = 224 * 224
    temporal_patch_size: PositiveInt = 2

    @model_validator(mode="after")
    def _ordered(self) -> BudgetParams:
        if self.s_min >= self.s_max:
            raise ValueError(f"budget.s_min ({self.s_min}) must be < budget.s_max ({self.s_max})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"budget.min_pixels ({self.min_pixels}) must be <= budget.max_pixels ({self.max_pixels})"
            )
        return self


class TinyParams(_Section):
    architecture: Architecture = "qwen2_5_vl"
    vocab_size: Annotated[int, Field(ge=300)] = 768
    hidden_size: PositiveInt = 128
    intermediate_size: PositiveInt = 384
    num_hidden_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt = 2
    vision_hidden_size: PositiveInt = 64
    vision_intermediate_size: PositiveInt = 192
    vision_depth: PositiveInt = 2
    vision_num_heads: PositiveInt = 2


class SFTParams(_Section):
    """The tiny backbone's recipe (resadapt/sft.py `train_backbone`): steps per phase, so a run is the same
    on the same machine (another CPU's float kernels round differently, and the model drifts: README); the
    learning-rate schedules follow step / steps. `time_limit_minutes` is an opt-in
    wall-clock cap per phase (a phase it stops is no longer reproducible elsewhere; the log says so)."""

    dense_steps: Annotated[int, Field(ge=0)] = 2000
    crop_steps: Annotated[int, Field(ge=0)] = 500
    sft_steps: Annotated[int, Field(ge=0)] = 523
    dense_batch: PositiveInt = 16
    crop_batch: PositiveInt = 16
    sft_batch: PositiveInt = 4
    dense_lr: Annotated[float, Field(gt=0.0)] = 3e-3
    # dense phase: chunks at full resolution or uniform in [dense_scale_floor, 1], cropped after the resize
    # to dense_window tokens a side around a card (null: whole frames)
    dense_scale_floor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.45
    dense_window: PositiveInt | None = 2
    dense_views: PositiveInt = 2  # views of each decoded video per dense step, each at its own scales
    sft_lr: Annotated[float, Field(gt=0.0)] = 2e-3
    dense_weight: Annotated[float, Field(ge=0.0)] = 0.2
    p_full: Annotated[float, Field(ge=0.0, le=1.0)] = 0.85
    # share of videos shown at one uniform scale (teaches reading the large glyphs there): SFT, crop phase
    p_uniform: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    crop_p_uniform: Annotated[float, Field(ge=0.0, le=1.0)] = 0.15
    # SFT phase: share of downscaled evidence drawn from the asked glyph's readable range (`chunk_scales_for`)
    readable_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.75
    # SFT phase: dense token loss also on the language model's hidden state after `lm_dense_layer` layers
    lm_dense_weight: Annotated[float, Field(ge=0.0)] = 0.5
    lm_dense_layer: PositiveInt = 1
    vision_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    clip: Annotated[float, Field(gt=0.0)] = 1.0
    time_limit_minutes: Annotated[float, Field(gt=0.0)] | None = None  # opt-in wall-clock cap per phase


class CalibrationParams(_Section):
    scales: list[Annotated[float, Field(gt=0.0, le=1.0)]] = [0.25, 0.35, 0.5, 0.75]
    max_samples_per_task: PositiveInt = 150
    tasks: list[Task] = list(TASKS)
    workers: PositiveInt = 2  # processes sharing the conditions (one thread each; 1: in the stage's process)


class GenerationParams(_Section):
    # the backbone stage calibrates with transformers; the vLLM switch is evaluate.backend (switching it must
    # not re-run the backbone stage, which declares this section)
    backend: Literal["transformers"] = "transformers"
    max_new_tokens: PositiveInt = 12
    batch_size: PositiveInt = 16


class BackboneParams(_Section):
    source: Literal["tiny", "path"] = "tiny"
    path: str = "models/backbone"  # the stage's output folder (tiny model, or a pointer to `checkpoint`)
    checkpoint: str | None = None  # source: path -> a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder
    tiny: TinyParams = TinyParams()
    sft: SFTParams = SFTParams()
    calibration: CalibrationParams = CalibrationParams()
    generation: GenerationParams = GenerationParams()

    @model_validator(mode="after")
    def _lm_layer_exists(self) -> BackboneParams:
        if self.sft.lm_dense_layer > self.tiny.num_hidden_layers:
            raise ValueError(
                f"backbone.sft.lm_dense_layer ({self.sft.lm_dense_layer}) exceeds "
                f"backbone.tiny.num_hidden_layers ({self.tiny.num_hidden_layers})"
            )
        return self


Objective = Literal["capo", "no_cost", "lagrangian"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
# the Allocator's learning rate over max_steps (transformers' schedules of these names, no warmup)
Schedule = Literal["constant", "linear", "cosine"]
ALLOCATOR_SCHEDULES: tuple[str, ...] = get_args(Schedule)


class AllocatorParams(_Section):
    """The Allocator (resadapt/allocator.py): frozen coarse encoder, decoder sizes, scale range."""

    encoder: Literal["backbone", "smolvlm"] = "backbone"  # backbone: its vision tower; smolvlm: encoder_path
    encoder_path: str | None = None  # smolvlm: a local SmolVLM2 checkpoint folder
    coarse_size: Annotated[int, Field(ge=28)] | None = 112  # px side frames get for the coarse encoder
    dim: PositiveInt = 128
    depth: PositiveInt = 2
    num_heads: PositiveInt = 4
    s_min: Annotated[float, Field(gt=0.0, le=4.0)] = 0.125
    s_max: Annotated[float, Field(gt=0.0, le=4.0)] = 1.25
    beta_max: Annotated[float, Field(gt=1.0)] = 20.0
    relevance_init: float = 1.0  # initial trust in the parameter-free relevance prior (0: none)
    path: str = "models/allocator"  # the train stage's output: one folder per seed of `train.seeds`

    def seed_path(self, seed: int) -> Path:
        """The folder of the Allocator trained with `seed` (a `save_pretrained` folder)."""
        return Path(self.path) / f"seed_{int(seed)}"

    def model_kwargs(self) -> dict:
        """The `AllocatorConfig` keyword arguments these params set (the encoder comes from elsewhere)."""
        keys = ("coarse_size", "dim", "depth", "num_heads", "s_min", "s_max", "beta_max", "relevance_init")
        return {k: getattr(self, k) for k in keys}

    @model_validator(mode="after")
    def _ordered(self) -> AllocatorParams:
        if self.s_min >= self.s_max:
            raise ValueError(f"allocator.s_min ({self.s_min}) must be < allocator.s_max ({self.s_max})")
        if self.encoder == "smolvlm" and not self.encoder_path:
            raise ValueError(
                "allocator.encoder = 'smolvlm' needs allocator.encoder_path (a local SmolVLM2 folder)"
            )
        return self


class CAPOConfig(_Section):
    """Every CAPO coefficient, defaults the authors' (`capo_acc`, reference-implementation.md §3.3-4.2).

    The one typed config of the method: `params.yaml`'s `train.capo` validates into it, it travels through
    `CAPOTrainerConfig.capo` and `resadapt.capo` reads it. `target_cost` is c* (normalised proxy cost the
    pivot is pulled toward), `encouragement` lambda_enc, `gas` the linear global cost pressure;
    `apply_floor=False` is the authors' `noclamp` ablation. `s_min`/`s_max` normalise the cost: the trainer
    sets them to the Allocator's range. The regularizers: `concentration_coef` x (mean alpha + beta, the
    authors' code, or with `concentration_cap` the paper text's soft cap mean relu(alpha + beta - cap)) and
    `similarity_coef` x the temporal-similarity loss.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    alpha_mix: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # c*, normalised cost; in params derived from train.target_retention (not dumped, so params round-trip)
    target_cost: Annotated[float, Field(ge=0.0, le=1.0, exclude=True)] = 0.4
    tau: Annotated[float, Field(gt=0.0)] = 0.15
    encouragement: Annotated[float, Field(ge=0.0)] = 0.25
    right_scale: Annotated[float, Field(ge=0.0)] = 0.7
    wrong_scale: Annotated[float, Field(ge=0.0)] = 1.3
    acc_pow: Annotated[float, Field(ge=0.0)] = 0.5
    acc_floor: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    wrong_pow: Annotated[float, Field(ge=0.0)] = 1.0
    gas: Annotated[float, Field(ge=0.0)] = 0.05
    correct_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.35
    correct_floor: Annotated[float, Field(ge=0.0)] = 0.001
    apply_floor: bool = True
    # set by the trainer from the Allocator (never in params; not dumped, so params round-trip)
    s_min: Annotated[float, Field(gt=0.0, exclude=True)] = 0.2
    s_max: Annotated[float, Field(gt=0.0, exclude=True)] = 2.0
    # ours (0: the authors' CAPO): weight rho of the budget constraint rho * (R_det - R*)^2 on the retention
    # R_det of the deterministic (Beta-mean) allocations of each step's prompts (capo.budget_constraint)
    budget_coef: Annotated[float, Field(ge=0.0)] = 0.0
    # what the constraint pulls onto R*: the batch's mean retention ("batch", one question may spend what
    # another saves) or each prompt's ("prompt": every task family lands on the budget by itself)
    budget_scope: Literal["batch", "prompt"] = "batch"
    concentration_coef: Annotated[float, Field(ge=0.0)] = 5e-4
    concentration_cap: Annotated[float, Field(gt=2.0)] | None = None  # alpha, beta >= 1: a cap must exceed 2
    similarity_coef: Annotated[float, Field(ge=0.0)] = 1e-3

    @model_validator(mode="after")
    def _range(self) -> CAPOConfig:
        if self.s_max <= self.s_min:
            raise ValueError(f"CAPOConfig.s_max ({self.s_max}) must be > CAPOConfig.s_min ({self.s_min})")
        return self

    def with_scale_range(self, s_min: float, s_max: float) -> CAPOConfig:
        """The same coefficients with the cost normalised over [s_min, s_max] (validated)."""
        values = {name: getattr(self, name) for name in type(self).model_fields}  # excluded fields too
        return CAPOConfig(**(values | {"s_min": float(s_min), "s_max": float(s_max)}))


class RLParams(_Section):
    """One CAPO training run (resadapt/trainer.py); shared by the train and ablation stages."""

    tasks: list[Task] = ["detail_qa", "multi_frame"]
    max_steps: PositiveInt = 200
    prompts_per_step: PositiveInt = 2
    allocations_per_prompt: Annotated[int, Field(ge=2)] = 8
    rollouts_per_allocation: PositiveInt = 2
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    max_completion_length: PositiveInt = 4
    learning_rate: Annotated[float, Field(gt=0.0)] = 3e-3  # the Allocator's
    relevance_learning_rate: Annotated[float, Field(gt=0.0)] = 3e-2  # its two relevance-prior weights
    relevance_metric_learning_rate: Annotated[float, Field(gt=0.0)] = 3e-4  # the prior's bilinear form
    lr_scheduler: Schedule = "constant"  # all three learning rates, decayed over max_steps or not
    objective: Objective = "capo"
    lagrangian_lambda: Annotated[float, Field(ge=0.0)] = 1.0
    # CAPO's budget in the unit of every table (token retention); c* is derived per prompt from it
    # (capo.target_cost_for_retention), so train.capo.target_cost is not set in params
    target_retention: Budget = 0.15
    capo: CAPOConfig = CAPOConfig()
    joint_training: bool = False
    backbone_learning_rate: Annotated[float, Field(gt=0.0)] = 1e-6
    eval_steps: PositiveInt = 25
    save_steps: PositiveInt = 50
    val_samples: PositiveInt = 60
    # engine of rollouts and validation answers (vllm: frozen backbone only)
    backend: Backend = "transformers"

    @model_validator(mode="after")
    def _engine(self) -> RLParams:
        if {"s_min", "s_max"} & self.capo.model_fields_set:
            raise ValueError("train.capo.s_min / s_max are not set here: CAPO uses allocator.s_min / s_max")
        if "target_cost" in self.capo.model_fields_set:
            raise ValueError(
                "train.capo.target_cost is derived from train.target_retention (token retention): set that instead"
            )
        if self.backend == "vllm" and self.joint_training:
            raise ValueError(
                "train.backend 'vllm' needs train.joint_training false: the server holds fixed weights "
                "(joint training generates with the backbone being trained)"
            )
        return self


class TrainParams(RLParams):
    # one Allocator per seed (its init, sampling and data order); the evaluation uses every one
    seeds: Annotated[list[int], Field(min_length=1)] = [0, 1, 2]
    workers: PositiveInt = 2  # processes training seeds (and ablation runs) in parallel, one thread each
    checkpoints: str = "checkpoints/train"  # resumable run state (not a DVC output: it must survive a kill)
    operating_retention: Budget = 0.15  # hard-budget operating point reported next to the deterministic one
    test_samples: PositiveInt = 150
    # which checkpoint a seed keeps: its last, or the latest whose val retention is within
    # checkpoint_tolerance of target_retention (else the closest); see stages.train.select_checkpoint
    checkpoint_selection: Literal["last", "val"] = "last"
    checkpoint_tolerance: Annotated[float, Field(ge=0.0)] = 0.03

    @model_validator(mode="after")
    def _distinct_seeds(self) -> TrainParams:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"train.seeds must be distinct, got {self.seeds}")
        if self.checkpoint_selection == "val" and self.eval_steps % self.save_steps:
            raise ValueError(
                f"train.checkpoint_selection 'val' keeps a validated checkpoint: train.eval_steps "
                f"({self.eval_steps}) must be a multiple of train.save_steps ({self.save_steps})"
            )
        return self


class AblationParams(_Section):
    objectives: list[Objective] = ["no_cost", "lagrangian", "capo"]
    max_steps: PositiveInt = 60
    eval_steps: PositiveInt = 10
    lagrangian_lambda: Annotated[float, Field(ge=0.0)] = 1.0
    test_samples: PositiveInt = 60
    checkpoints: str = "checkpoints/ablation"


BenchmarkName = Literal[
    "videomme",
    "longvideobench",
    "mlvu",
    "mvbench",
    "videommmu",
    "lvbench",
    "charades_sta",
    "activitynet_captions",
    "nextgqa",
    "chartqa",
]
BENCHMARKS: tuple[str, ...] = get_args(BenchmarkName)


class BenchmarkRef(_Section):
    """A real benchmark read from a local copy in its official layout (resadapt/data/benchmarks.py)."""

    name: BenchmarkName
    root: str  # the folder holding the official annotation files and media
    split: str | None = None  # the loader's default split when unset
    limit: PositiveInt | None = None  # first rows only (overrides samples_per_task for this benchmark)


class VLLMParams(_Section):
    """The vLLM server a stage starts when its backend is vllm (`train.backend`, `evaluate.backend`;
    resadapt/vllm_backend.py)."""

    venv: str | None = None  # its separate environment (null: $RESADAPT_VLLM_VENV, else .venvs/vllm)
    run_dir: str = "outputs/vllm"  # server log, pid file and the vLLM view of the model
    startup_timeout_s: Annotated[float, Field(gt=0.0)] = 300.0
    kv_cache_gib: PositiveInt = 1
    threads: PositiveInt = 1  # OpenMP threads of the server (CPU)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"


class EvaluateParams(_Section):
    """Stage evaluate (resadapt/evaluate.py): the main grid and the frames-scaling grid.

    Sources are the embedded benchmark's `tasks` (test split) and the real `benchmarks`; both grids name a
    source by its task or benchmark name.
    """

    methods: list[Method] = list(get_args(Method))
    budgets: list[Budget] = [0.10, 0.15, 0.25]  # target retentions of the budgeted methods
    tasks: list[Task] = list(TASKS)
    benchmarks: list[BenchmarkRef] = []
    samples_per_task: PositiveInt = 60
    num_frames: list[PositiveInt] | None = None  # frame counts of the main grid (None: data.num_frames)
    frames: list[PositiveInt] = [8, 16, 32, 64]  # frame counts of the frames-scaling grid
    frames_task: str = "long_video"  # an embedded task or a configured benchmark's name
    frames_methods: list[Method] = ["vanilla", "fixed_scale", "oracle", "frame_selection", "resadapt_hard"]
    frames_reference: PositiveInt = 8  # equal token budget: what Vanilla feeds with this many frames
    overhead_frames: PositiveInt = 32  # frame count of the Allocator-overhead ratio
    results: str = "results/evaluate"  # stage output: the per-sample JSONL log
    backend: Backend = "transformers"  # generation engine of the input-side methods
    workers: PositiveInt = 2  # evaluation processes (one thread each)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateParams:
        for key in ("methods", "frames_methods", "budgets", "frames"):
            values = getattr(self, key)
            if not values:
                raise ValueError(f"evaluate.{key} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"evaluate.{key} has duplicates: {values}")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(
                f"evaluate.tasks / evaluate.benchmarks name a source twice: {self.tasks + names}"
            )
        if not self.tasks and not self.benchmarks:
            raise ValueError("evaluate.tasks and evaluate.benchmarks are both empty: nothing to evaluate")
        if self.frames_task not in (*TASKS, *names):
            raise ValueError(
                f"evaluate.frames_task {self.frames_task!r} is neither an embedded task {list(TASKS)} "
                f"nor a configured benchmark {names}"
            )
        for key in ("frames_reference", "overhead_frames"):
            if getattr(self, key) not in self.frames:
                raise ValueError(
                    f"evaluate.{key} ({getattr(self, key)}) must be one of evaluate.frames {self.frames}"
                )
        if "vanilla" not in self.frames_methods:
            raise ValueError(
                "evaluate.frames_methods must include 'vanilla' (the equal-token-budget reference)"
            )
        return self

    def main_frames(self, default: int) -> list[int]:
        return list(self.num_frames) if self.num_frames else [default]


class Params(_Section):
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataParams
    budget: BudgetParams = BudgetParams()
    backbone: BackboneParams = BackboneParams()
    allocator: AllocatorParams = AllocatorParams()
    train: TrainParams = TrainParams()
    ablation: AblationParams = AblationParams()
    evaluate: EvaluateParams = EvaluateParams()
    vllm: VLLMParams = VLLMParams()

    @model_validator(mode="after")
    def _cross(self) -> Params:
        fs = self.data.frame_size
        if fs * fs > self.budget.max_pixels:
            raise ValueError(
                f"data.frame_size {fs} gives {fs * fs} pixels, above budget.max_pixels ({self.budget.max_pixels}): "
                "full resolution would already be downscaled"
            )
        ev = self.evaluate
        available = self.data.long_num_frames if ev.frames_task == "long_video" else self.data.num_frames
        if ev.frames_task in TASKS and max(ev.frames) > available:
            raise ValueError(
                f"evaluate.frames {ev.frames} asks for more frames than the {ev.frames_task} videos have "
                f"({available}; data.{'long_num_frames' if ev.frames_task == 'long_video' else 'num_frames'})"
            )
        return self


def _field_range(loc: tuple) -> str | None:
    """The allowed interval of the numeric field at `loc`, written like (0, 1]."""
    model: type[BaseModel] | None = Params
    info = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if isinstance(part, int) or part in ("train", "val", "test"):
                continue
            return None
        info = model.model_fields[part]
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None and args:
            # list[Annotated[float, Field(...)]] keeps its bounds on the item type
            inner = [a for a in args if hasattr(a, "__metadata__")]
            if inner:
                info = inner[0]
    metadata = getattr(info, "metadata", None) or getattr(info, "__metadata__", ())
    lo = hi = None
    lo_open = hi_open = True
    for m in metadata:
        for c in getattr(m, "metadata", [m]):
            if getattr(c, "gt", None) is not None:
                lo, lo_open = c.gt, True
            if getattr(c, "ge", None) is not None:
                lo, lo_open = c.ge, False
            if getattr(c, "lt", None) is not None:
                hi, hi_open = c.lt, True
            if getattr(c, "le", None) is not None:
                hi, hi_open = c.le, False
    if lo is None and hi is None:
        return None
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        bounds = _field_range(e["loc"])
        if bounds and e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg = f"must be in {bounds}"
        got = e.get("input")
        shown = (
            "" if isinstance(got, dict) or e["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        )
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_params(data: dict, source: str = "params") -> Params:
    """Validate a params mapping; raise ConfigError listing every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_params(path: str | Path = "params.yaml", require_paths: bool = True) -> Params:
    """Load and validate params.yaml; with `require_paths`, input paths the config names must exist."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    params = parse_params(data, str(path))
    if require_paths and params.backbone.source == "path":
        ckpt = params.backbone.checkpoint
        if ckpt is None or not (Path(ckpt) / "config.json").exists():
            raise ConfigError(
                f"{path}: backbone.checkpoint = {ckpt!r}: no checkpoint there (config.json missing); "
                "with backbone.source = 'path' it must name a Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder"
            )
    if require_paths and params.allocator.encoder == "smolvlm":
        enc = Path(params.allocator.encoder_path)
        if not (enc / "config.json").exists():
            raise ConfigError(
                f"{path}: allocator.encoder_path = {str(enc)!r}: no checkpoint there (config.json missing); "
                "with allocator.encoder = 'smolvlm' it must name a local SmolVLM2 folder"
            )
    return params


# ---------------------------------------------------------------------------------------------------------
# Profiles: an override file (params-smoke.yaml, params-paper.yaml) deep-merged over params.yaml.


class ParamsMergeError(ValueError):
    """An override names a key that params.yaml does not have, or changes a mapping into a value."""


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any], _path: str = "") -> dict[str, Any]:
    """Return a copy of `base` with `overrides` merged in, recursively.

    Mappings are merged key by key; any other value (scalars, lists) is replaced whole. Every key of
    `overrides` must already exist in `base`, so a typo in an override file fails instead of being ignored.
    """
    merged = dict(base)
    for key, value in overrides.items():
        where = f"{_path}.{key}" if _path else str(key)
        if key not in base:
            raise ParamsMergeError(f"override key {where!r} does not exist in params.yaml")
        old = base[key]
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(old, value, where)
        elif isinstance(old, Mapping) or isinstance(value, Mapping):
            raise ParamsMergeError(
                f"override key {where!r}: cannot replace a {type(old).__name__} with a {type(value).__name__}"
            )
        else:
            merged[key] = value
    return merged


def _yaml_mapping(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return dict(data)


def merged_params_data(base: str | Path, overrides: str | Path) -> dict:
    """The mapping of `base` with the override file merged in (errors name the override file)."""
    try:
        return deep_merge(_yaml_mapping(Path(base)), _yaml_mapping(Path(overrides)))
    except ParamsMergeError as err:
        raise ConfigError(f"{overrides}: {err}") from None


def merge_params_files(base: str | Path, overrides: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write `base` merged with `overrides` to `out`; an existing `out` other than `base` needs `force`."""
    out = Path(out)
    data = merged_params_data(base, overrides)
    if out.exists() and not force and out.resolve() != Path(base).resolve():
        raise ConfigError(f"{out} already exists; pass force to overwrite it")
    out.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return out
