"""What ResAdapt costs with the real architectures: FLOPs per component and training memory per GPU.

Why this module: the paper's latency table (results-and-peers.md §1.7) is the only statement of what the
Allocator costs next to the backbone, and it states neither the frame size nor how FLOPs were counted. Here
they are counted from the architectures themselves. The published config.json of each model
(`resadapt/arch_configs/`, source URL in each file's `_source`) builds the transformers modules on the meta
device (shapes only: no weights, no memory, nothing downloaded), and PyTorch's own
`torch.utils.flop_counter.FlopCounterMode` counts every matmul and convolution of a forward pass.

Conventions (docs/paper_scale.md says why):
- 2 FLOPs per multiply-add, as FlopCounterMode counts.
- `dense`: products with a weight (aten.mm / addmm / convolution), linear in the tokens. `attention`:
  products of two activations (aten.bmm, SDPA: QK^T and AV), quadratic in the sequence, counted without
  causal masking. The paper's Vanilla figures grow exactly linearly in frames, so they are dense-only; the
  tables report attention separately and never add it into the totals.
- A video is split into chunks of `temporal_patch_size` frames, each chunk its own video item (as
  `resadapt.budget` and the reference do). ResAdapt at retention R is modelled by the uniform scale whose
  measured retention is <= R (`budget.uniform_scale_for_retention`); dense FLOPs depend only on the token
  total, so a non-uniform allocation of the same tokens costs the same.

On the meta device tensors have no values. Two things make the stock forwards run there (`_MetaMode`):
small index tensors that transformers computes from `grid_thw` on the CPU are moved to meta when they meet a
meta tensor, and `bool()` of a meta tensor answers True. The only value-dependent branches these forwards
take are "is this mask all ones (no padding)?" checks, which is true for the inputs counted here.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ARCH_CONFIGS",
    "BACKBONES",
    "PAPER_VANILLA_TFLOPS",
    "PAPER_SCALE_TFLOPS",
    "Flops",
    "count_flops",
    "load_arch_config",
    "backbone_geometry",
    "chunk_size",
    "BackboneCost",
    "AllocatorCost",
    "paper_allocator_config",
    "CostRow",
    "cost_table",
    "format_table",
    "table_metrics",
    "plot_cost",
    "MemoryEstimate",
    "training_memory",
    "format_memory",
]

ARCH_DIR = Path(__file__).resolve().parent / "arch_configs"
ARCH_CONFIGS = {
    "qwen2_5_vl_7b": "qwen2_5_vl_7b.json",
    "qwen3_vl_8b": "qwen3_vl_8b.json",
    "smolvlm2_256m_video": "smolvlm2_256m_video.json",
}
BACKBONES = ("qwen2_5_vl_7b", "qwen3_vl_8b")
# results-and-peers.md §1.7 (Qwen2.5-VL-7B): Vanilla "Inference TFLOPs" and the Allocator's "Scale TFLOPs".
PAPER_VANILLA_TFLOPS = {16: 111.4, 32: 222.5, 64: 444.6, 128: 888.9}
PAPER_SCALE_TFLOPS = {16: 1.5, 32: 2.9, 64: 5.8, 128: 11.6}

# Defaults that reproduce the paper's Vanilla figures (docs/paper_scale.md): a 4:3 source at the reference's
# per-frame pixel cap, 768 tokens per 2-frame chunk.
DEFAULT_FRAME_SIZE = (768, 1024)
DEFAULT_PROMPT_TOKENS = 64
DEFAULT_QUERY_TOKENS = 64
CHUNK_TOKEN_CAP = 768  # reference: VIDEO_MAX_TOKEN_NUM, max_pixels = 768 * factor^2 per frame

_DENSE_OPS = ("aten.mm", "aten.addmm", "aten.convolution", "aten._convolution")
_BYTES = {"fp32": 4, "bf16": 2}


# ---------------------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class Flops:
    """FLOPs of one forward: `dense` (weight products) and `attention` (activation products)."""

    dense: float = 0.0
    attention: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.dense + other.dense, self.attention + other.attention)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.dense * k, self.attention * k)

    __rmul__ = __mul__

    @property
    def total(self) -> float:
        return self.dense + self.attention


class _MetaMode(TorchFunctionMode):
    """Lets stock transformers forwards run on meta tensors (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and args[0].device.type == "meta":
            return True
        flat, spec = tree_flatten((args, kwargs))
        if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in flat):
            flat = [
                a.to("meta") if isinstance(a, torch.Tensor) and a.device.type != "meta" and a.dim() > 0 else a
                for a in flat
            ]
            args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)


def count_flops(fn: Callable[[], Any]) -> Flops:
    """FLOPs of `fn()` as FlopCounterMode counts them, split into dense and attention (module docstring)."""
    with torch.no_grad(), _MetaMode(), FlopCounterMode(display=False) as counter:
        fn()
    dense = attention = 0.0
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        if str(op).split(".default")[0] in _DENSE_OPS:
            dense += n
        else:
            attention += n
    return Flops(float(dense), float(attention))


def load_arch_config(name: str):
    """The transformers config of a published architecture in `arch_configs/` (the `_source` key dropped)."""
    from transformers import AutoConfig

    if name not in ARCH_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCH_CONFIGS)}")
    data = json.loads((ARCH_DIR / ARCH_CONFIGS[name]).read_text())
    data.pop("_source", None)
    return AutoConfig.for_model(**data)


def _meta(tensor_shape: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*tensor_shape, device="meta", dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Backbone


def backbone_geometry(config: Any):
    """The `budget.VisionGeometry` of a Qwen-VL config with the reference's video cap: at most
    `CHUNK_TOKEN_CAP` merged tokens per frame size (max_pixels = 768 x factor^2)."""
    from resadapt.budget import VisionGeometry

    vc = config.vision_config
    patch, merge = int(vc.patch_size), int(vc.spatial_merge_size)
    factor = patch * merge
    return VisionGeometry(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=int(vc.temporal_patch_size),
        max_pixels=CHUNK_TOKEN_CAP * factor * factor,
    )


def chunk_size(geometry: Any, frame_size: tuple[int, int], retention: float = 1.0) -> tuple[int, int]:
    """Pixel size of one chunk of a `frame_size` source at target retention: the largest uniform scale whose
    measured retention is <= R (`budget.uniform_scale_for_retention`), then Qwen's resize."""
    from resadapt.budget import scaled_size, uniform_scale_for_retention

    h, w = frame_size
    r = _check_retentions([retention])[0]
    scale = 1.0 if r >= 1.0 else uniform_scale_for_retention(r, h, w, geometry.temporal_patch_size, geometry)
    return scaled_size(h, w, scale, geometry)


class BackboneCost:
    """FLOPs of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbone built on the meta device from `config`.

    `config` is an architecture name (`BACKBONES`) or a transformers config object (tests use tiny ones).
    Counts are cached per input shape: the vision tower per chunk size, the LLM per sequence length.
    """

    def __init__(self, config: Any) -> None:
        from transformers import AutoModelForImageTextToText

        if isinstance(config, str):
            if config not in BACKBONES:
                raise ValueError(f"unknown backbone {config!r}; known: {', '.join(BACKBONES)}")
            self.name = config
            config = load_arch_config(config)
        else:
            self.name = getattr(config, "model_type", "custom")
        if config.model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            raise ValueError(f"backbone config model_type {config.model_type!r} is not a Qwen-VL model")
        self.config = config
        with torch.device("meta"):
            self.model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        self.geometry = backbone_geometry(config)
        self.patch_size = self.geometry.patch_size
        self.temporal_patch_size = self.geometry.temporal_patch_size

    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    def parameters(self) -> dict[str, int]:
        """Parameter counts: vision tower (with merger), language model, lm_head."""
        inner = self.model.model
        return {
            "vision": sum(p.numel() for p in inner.visual.parameters()),
            "language_model": sum(p.numel() for p in inner.language_model.parameters()),
            "lm_head": sum(p.numel() for p in self.model.lm_head.parameters()),
        }

    def chunk_size(self, frame_size: tuple[int, int], retention: float = 1.0) -> tuple[int, int]:
        return chunk_size(self.geometry, frame_size, retention)

    def chunk_tokens(self, size: tuple[int, int]) -> int:
        f = self.geometry.factor
        return (size[0] // f) * (size[1] // f)

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one instance per backbone; the cache is the point)
    def vision_chunk(self, height: int, width: int) -> Flops:
        """The vision tower (patch embed, blocks, merger) on one chunk of `temporal_patch_size` frames."""
        p, tp = self.patch_size, self.temporal_patch_size
        if height % p or width % p:
            raise ValueError(f"chunk size {height}x{width} is not a multiple of the patch size {p}")
        gh, gw = height // p, width // p
        pixels = _meta((gh * gw, 3 * tp * p * p))
        grid = torch.tensor([[1, gh, gw]])
        return count_flops(lambda: self.model.model.visual(pixels, grid_thw=grid))

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def prefill(self, num_tokens: int) -> Flops:
        """The LLM over `num_tokens` (visual + text) and the lm_head on the last position only (as
        `generate` computes the first token)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        d = self.text_config.hidden_size
        embeds = _meta((1, num_tokens, d))
        positions = _meta((3, 1, num_tokens), torch.long)
        lm, head = self.model.model.language_model, self.model.lm_head

        def run() -> None:
            out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False)
            head(out.last_hidden_state[:, -1:])

        return count_flops(run)

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def decode_token(self, context: int) -> Flops:
        """One generated token with a KV cache of `context` tokens (LLM + lm_head)."""
        from transformers import DynamicCache

        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        tc = self.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        cache = DynamicCache(config=self.config)
        for layer in range(tc.num_hidden_layers):
            kv = _meta((1, tc.num_key_value_heads, context, head_dim))
            cache.update(kv, kv, layer)
        embeds = _meta((1, 1, tc.hidden_size))
        positions = _meta((3, 1, 1), torch.long)
        lm, head = self.model.model.language_model, self.model.lm_head

        def run() -> None:
            out = lm(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True)
            head(out.last_hidden_state)

        return count_flops(run)


# ---------------------------------------------------------------------------------------------------------
# Allocator


def paper_allocator_config(encoder: str = "smolvlm2_256m_video", **overrides: Any):
    """The paper profile's AllocatorConfig (params-paper.yaml: SmolVLM2 at its native 512 px, dim 1024,
    depth 2, 16 heads; the SmolLM2 text model encodes the query) over a published encoder config."""
    from resadapt.allocator import AllocatorConfig

    source = load_arch_config(encoder)
    kwargs = dict(coarse_size=None, query_source="hidden_states", dim=1024, depth=2, num_heads=16)
    kwargs.update(overrides)
    return AllocatorConfig(encoder_type="smolvlm", encoder_config=source.to_dict(), **kwargs)


class AllocatorCost:
    """FLOPs of `resadapt.allocator.Allocator` built on the meta device: frozen coarse encoder per frame,
    query encoder, trainable decoder and head. `config` is an AllocatorConfig (tiny or paper profile)."""

    def __init__(self, config: Any) -> None:
        from resadapt.allocator import Allocator

        self.config = config
        with torch.device("meta"):
            self.model = Allocator(config)

    def parameters(self) -> dict[str, int]:
        """Frozen (encoders) and trainable parameter counts."""
        frozen = sum(p.numel() for m in self.model.frozen_modules() for p in m.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"frozen": frozen, "trainable": trainable}

    @functools.cached_property
    def encoder_frame(self) -> Flops:
        """The frozen coarse encoder on one frame at `coarse_size` (SmolVLM: tower + connector)."""
        a, s = self.model, self.config.coarse_size
        if self.config.encoder_type == "smolvlm":
            pixels = _meta((1, 3, s, s), torch.float32)
            return count_flops(lambda: a.connector(a.vision(pixel_values=pixels).last_hidden_state))
        p, tp = a.patch_size, a.temporal_patch_size
        grid = torch.tensor([[1, s // p, s // p]])
        patches = _meta(((s // p) ** 2, 3 * tp * p * p), torch.float32)
        return count_flops(lambda: a.vision(patches, grid_thw=grid))

    @functools.lru_cache(maxsize=16)  # noqa: B019
    def query(self, query_tokens: int) -> Flops:
        ids = torch.zeros(1, query_tokens, dtype=torch.long, device="meta")
        return count_flops(lambda: self.model.encode_query(ids))

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def decoder(self, frames: int, query_tokens: int) -> Flops:
        a = self.model
        tokens = _meta((1, frames, a.tokens_per_frame, a.encoder_dim), torch.float32)
        mask = torch.ones(1, frames, dtype=torch.bool, device="meta")
        q = _meta((1, query_tokens, a.query_dim), torch.float32)
        q_mask = torch.ones(1, query_tokens, dtype=torch.bool, device="meta")
        return count_flops(lambda: a(tokens, mask, q, q_mask))

    def total(self, frames: int, query_tokens: int) -> Flops:
        return frames * self.encoder_frame + self.query(query_tokens) + self.decoder(frames, query_tokens)


# ---------------------------------------------------------------------------------------------------------
# The latency table's columns


@dataclass(frozen=True)
class CostRow:
    """One row of the paper's latency table, in TFLOPs (dense unless named `attention`)."""

    method: str
    frames: int
    retention_target: float
    retention: float
    chunk_height: int
    chunk_width: int
    visual_tokens: int
    alloc_tflops: float
    vision_tflops: float
    prefill_tflops: float
    inf_tflops: float
    total_tflops: float
    attention_tflops: float
    decode_gflops_per_token: float
    inf_reduction: float
    total_reduction: float


def _check_retentions(retentions: Sequence[float]) -> list[float]:
    out = []
    for r in retentions:
        r = float(r)
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise ValueError(f"retention must be in (0, 1], got {r}")
        out.append(r)
    return out


def _check_frames(frames: Sequence[int], temporal_patch_size: int) -> list[int]:
    out = []
    for f in frames:
        if isinstance(f, bool) or int(f) != f or f < 1:
            raise ValueError(f"frames must be positive integers, got {f!r}")
        if int(f) % temporal_patch_size:
            raise ValueError(
                f"frames ({f}) must be a multiple of temporal_patch_size ({temporal_patch_size})"
            )
        out.append(int(f))
    return out


def cost_table(
    backbone: BackboneCost | str,
    frames: Sequence[int],
    retentions: Sequence[float],
    allocator: AllocatorCost | None = None,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    query_tokens: int = DEFAULT_QUERY_TOKENS,
    gen_tokens: int = 0,
) -> list[CostRow]:
    """Vanilla (R = 1, no Allocator; always included) and ResAdapt at every R < 1, for every frame count.

    Inference = vision tower + LLM prefill (+ `gen_tokens` decode steps); Total = Allocator + Inference;
    reductions are relative to Vanilla at the same frame count.
    """
    bb = backbone if isinstance(backbone, BackboneCost) else BackboneCost(backbone)
    if allocator is None:
        allocator = AllocatorCost(paper_allocator_config())
    frames = _check_frames(frames, bb.temporal_patch_size)
    rets = _check_retentions(retentions)
    for name, v in (("prompt_tokens", prompt_tokens), ("query_tokens", query_tokens)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if int(gen_tokens) < 0:
        raise ValueError(f"gen_tokens must be >= 0, got {gen_tokens}")
    if min(frame_size) < 1:
        raise ValueError(f"frame_size must be positive, got {frame_size}")
    rows = []
    for f in frames:
        chunks = f // bb.temporal_patch_size
        base_size = bb.chunk_size(frame_size)
        ref_tokens = chunks * bb.chunk_tokens(base_size)
        vanilla: CostRow | None = None
        for r in [1.0] + [r for r in rets if r < 1.0]:
            size = bb.chunk_size(frame_size, r)
            visual = chunks * bb.chunk_tokens(size)
            vision = chunks * bb.vision_chunk(*size)
            n = visual + int(prompt_tokens)
            prefill = bb.prefill(n)
            decode = bb.decode_token(n)
            gen = Flops()
            for i in range(int(gen_tokens)):
                gen = gen + bb.decode_token(n + i)
            alloc = Flops() if r == 1.0 else allocator.total(f, int(query_tokens))
            inf = vision + prefill + gen
            total = alloc + inf
            row = CostRow(
                method="vanilla" if r == 1.0 else "resadapt",
                frames=f,
                retention_target=r,
                retention=visual / ref_tokens,
                chunk_height=size[0],
                chunk_width=size[1],
                visual_tokens=visual,
                alloc_tflops=alloc.dense / 1e12,
                vision_tflops=vision.dense / 1e12,
                prefill_tflops=prefill.dense / 1e12,
                inf_tflops=inf.dense / 1e12,
                total_tflops=total.dense / 1e12,
                attention_tflops=total.attention / 1e12,
                decode_gflops_per_token=decode.dense / 1e9,
                inf_reduction=0.0 if vanilla is None else 1 - inf.dense / 1e12 / vanilla.inf_tflops,
                total_reduction=0.0 if vanilla is None else 1 - total.dense / 1e12 / vanilla.total_tflops,
            )
            vanilla = vanilla or row
            rows.append(row)
    return rows


def format_table(rows: Sequence[CostRow], backbone: str = "") -> str:
    """The paper's latency-table columns (TFLOPs), with its Vanilla / Scale figures where they exist."""
    paper = backbone == "qwen2_5_vl_7b"
    head = (
        f"{'method':9} {'F':>4} {'R tgt':>6} {'R':>6} {'chunk':>9} {'tokens':>7} {'Alloc':>7} {'Vision':>8} "
        f"{'Prefill':>8} {'Inf':>8} {'dInf':>7} {'Total':>8} {'dTotal':>7} {'attn*':>8} {'dec GF/tok':>10}"
    )
    if paper:
        head += f" {'paper Inf':>9} {'paper Scale':>11}"
    lines = [head]
    for r in rows:
        line = (
            f"{r.method:9} {r.frames:4d} {r.retention_target:6.3f} {r.retention:6.3f} "
            f"{f'{r.chunk_height}x{r.chunk_width}':>9} {r.visual_tokens:7d} {r.alloc_tflops:7.2f} "
            f"{r.vision_tflops:8.2f} {r.prefill_tflops:8.2f} {r.inf_tflops:8.2f} {-100 * r.inf_reduction:6.1f}% "
            f"{r.total_tflops:8.2f} {-100 * r.total_reduction:6.1f}% {r.attention_tflops:8.2f} "
            f"{r.decode_gflops_per_token:10.2f}"
        )
        if paper:
            inf = PAPER_VANILLA_TFLOPS.get(r.frames) if r.method == "vanilla" else None
            scale = PAPER_SCALE_TFLOPS.get(r.frames) if r.method != "vanilla" else None
            line += f" {inf if inf is not None else '':>9} {scale if scale is not None else '':>11}"
        lines.append(line)
    lines.append(
        "dense TFLOPs (2 per multiply-add); attn* = attention-score FLOPs (QK^T, AV; no causal mask), "
        "not in the other columns"
    )
    return "\n".join(lines)


def table_metrics(rows: Sequence[CostRow], settings: dict[str, Any]) -> dict[str, Any]:
    """A metrics JSON: the settings and one entry per row, keyed `method/F<frames>/R<target>`."""
    out: dict[str, Any] = {"settings": settings}
    for r in rows:
        out[f"{r.method}/F{r.frames}/R{r.retention_target:g}"] = asdict(r)
    return out


def plot_cost(rows: Sequence[CostRow], ax=None, title: str | None = None):
    """Total TFLOPs against frames: Vanilla and ResAdapt at each R (Allocator included). Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 4))
    else:
        fig = ax.figure
    series: dict[tuple[str, float], list[CostRow]] = {}
    for r in rows:
        series.setdefault((r.method, r.retention_target), []).append(r)
    for (method, target), pts in sorted(series.items(), key=lambda kv: -kv[0][1]):
        pts = sorted(pts, key=lambda p: p.frames)
        label = "Vanilla" if method == "vanilla" else f"ResAdapt R={target:g}"
        style = "-" if method == "vanilla" else "--"
        ax.plot([p.frames for p in pts], [p.total_tflops for p in pts], style, marker="o", label=label)
        if method != "vanilla":
            ax.plot([p.frames for p in pts], [p.alloc_tflops for p in pts], ":", color="grey", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("total TFLOPs (dense)")
    ax.set_title(title or "Cost against frames (dotted: Allocator alone)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Training memory per GPU


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per GPU by item, for one training profile. An estimate from parameter counts (not measured)."""

    profile: str
    gpus: int
    items: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.items.values())


_GIB = 1024**3


def training_memory(
    backbone: BackboneCost,
    allocator: AllocatorCost,
    frames: int = 32,
    gpus: int = 8,
    rows_per_gpu: int = 8,
    prompt_tokens: int = 1024,
    completion_tokens: int = 1024,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    query_tokens: int = DEFAULT_QUERY_TOKENS,
) -> list[MemoryEstimate]:
    """Per-GPU memory of the two launch profiles (configs/accelerate/), from parameter counts.

    - `frozen` (plug-and-play ResAdapt, frozen_8gpu.yaml): every training process holds the backbone in bf16
      (frozen: no grads, no optimizer; it runs the log-prob forwards under no_grad), the Allocator's frozen
      encoders in fp32 and its trainable decoder with fp32 grads and AdamW moments; rollouts run on a
      separate vLLM server (its own GPUs: `vllm_server`).
    - `joint` (ResAdapt-RL, joint_fsdp_8gpu.yaml): FSDP full-shard of the backbone over `gpus`: fp32 master
      weights, fp32 grads and AdamW moments (16 bytes/param) sharded; bf16 compute copies of one layer at
      a time (two with prefetch); activations with gradient checkpointing: one bf16 hidden state per layer
      and token saved, plus one layer's full working set and the completion logits in fp32.
    Activation terms assume `rows_per_gpu` sequences of `frames` frames at the reference pixel cap plus
    `prompt_tokens` + `completion_tokens` text tokens.
    """
    for name, v in (("frames", frames), ("gpus", gpus), ("rows_per_gpu", rows_per_gpu)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    bp = backbone.parameters()
    n_backbone = sum(bp.values())
    ap = allocator.parameters()
    tc = backbone.text_config
    d, layers, vocab = tc.hidden_size, tc.num_hidden_layers, tc.vocab_size
    chunks = frames // backbone.temporal_patch_size
    visual = chunks * backbone.chunk_tokens(backbone.chunk_size(frame_size))
    seq = visual + prompt_tokens + completion_tokens
    a_cfg = allocator.config
    a_tokens = frames * allocator.model.tokens_per_frame
    # Allocator decoder activations kept for backward (fp32): ~ (10 + 2 ff_mult) x dim values per token
    # and layer (q, k, v, attention out, norms, residuals, FFN hidden and its GELU).
    alloc_act = rows_per_gpu * a_tokens * a_cfg.depth * (10 + 2 * a_cfg.ff_mult) * a_cfg.dim * 4
    # backbone log-prob forward without grad: a few hidden-size buffers of the sequence and fp32 logits of
    # the completion
    nograd_act = rows_per_gpu * (4 * seq * d * 2 + completion_tokens * vocab * 4)
    alloc_state = ap["frozen"] * 4 + ap["trainable"] * (4 + 4 + 8)
    frozen = {
        "backbone weights (bf16)": n_backbone * 2 / _GIB,
        "allocator encoders (fp32, frozen)": ap["frozen"] * 4 / _GIB,
        "allocator decoder + grads + AdamW (fp32)": ap["trainable"] * 16 / _GIB,
        "allocator activations": alloc_act / _GIB,
        "backbone log-prob forward (no grad)": nograd_act / _GIB,
    }
    # biggest unsharded layer in bf16, twice (current + prefetched)
    layer_params = (n_backbone - bp["lm_head"] - vocab * d) / max(layers, 1)
    vision_cfg = backbone.config.vision_config
    patches = visual * backbone.geometry.merge_size**2
    vision_ckpt = patches * vision_cfg.hidden_size * 2 * getattr(vision_cfg, "depth", 1)
    llm_ckpt = seq * d * 2 * layers
    one_layer = seq * d * 34 * 2  # a transformer layer's working set in bf16 (Korthikanti et al.: ~34 s h)
    logits = completion_tokens * vocab * 4 * 2  # fp32 logits and their grad
    joint = {
        "sharded fp32 weights + grads + AdamW": n_backbone * 16 / gpus / _GIB,
        "unsharded bf16 layers in flight (2)": 2 * layer_params * 2 / _GIB,
        "embeddings + lm_head gathered (bf16)": (vocab * d + bp["lm_head"]) * 2 / _GIB,
        "activations (checkpointed, per row x rows)": rows_per_gpu * (vision_ckpt + llm_ckpt + logits) / _GIB,
        "one layer recomputed": one_layer / _GIB,
        "allocator (state + activations)": (alloc_state + alloc_act) / _GIB,
    }
    kv_per_token = 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * layers * 2
    server = {
        "backbone weights (bf16)": n_backbone * 2 / _GIB,
        f"KV cache for {rows_per_gpu} sequences": rows_per_gpu * seq * kv_per_token / _GIB,
    }
    return [
        MemoryEstimate("frozen (per training GPU)", gpus, frozen),
        MemoryEstimate("frozen: vLLM rollout server (per GPU, TP=1)", 1, server),
        MemoryEstimate("joint FSDP (per GPU)", gpus, joint),
    ]


def format_memory(estimates: Sequence[MemoryEstimate]) -> str:
    lines = []
    for e in estimates:
        lines.append(f"{e.profile}: {e.total:.1f} GiB")
        lines += [f"  {k:45} {v:8.2f} GiB" for k, v in e.items.items()]
    return "\n".join(lines)
