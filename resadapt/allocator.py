"""The Allocator: a small policy that predicts a per-frame resize scale from coarse frames and the question.

It reads coarse features of every frame (a frozen vision encoder at low resolution) and the question (frozen
token embeddings or a frozen text model), mixes them in a light trainable decoder (temporal self-attention
across frames, gated cross-attention to the question, FFN), pools each frame with a text-aware gate and
puts a Beta policy on a latent u in (0, 1) per frame: s = s_min + u (s_max - s_min). Only the decoder and
the head are trained; the frozen encoders are stored in the checkpoint too, so a saved Allocator loads with
`AutoModel.from_pretrained(path)` and nothing else (no hub name, no `trust_remote_code`).

Two encoder profiles share every line below the encoder:
- `qwen_vision` (default, tiny profile): the vision tower of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbone
  itself, each frame encoded as its own image at `coarse_size` (merged tokens, fed exactly like the
  backbone's image path), and the backbone's input embeddings as the query.
- `smolvlm` (paper profile, reference-implementation.md §1.1): SmolVLM2's SigLIP tower + pixel-shuffle
  connector at its `image_size`, and the SmolLM2 text model's last hidden state as the query.

Differences from the authors' v2 scorer (reference §1.2-1.5), all deliberate: no spatial self-attention
(the coarse tokens are few; temporal mixing and the question are what decides where to look), the
cross-attention is gated (paper's description; the authors' v3 uses sigmoid(g) with g = 0.25, as here), the
five hand-made "info" features are dropped. The Beta parameters follow the authors' v3 head (reference §1.7,
item 6), not v2's independent (alpha, beta) per frame: the Beta mean is sigmoid(budget + split), one budget
logit per video plus a zero-sum split over its frames, and a per-frame concentration
(`Allocator.beta_parameters`), alpha, beta in [1, beta_max]. A budget signal then moves how much a video gets
without flattening where it goes (with v2's head, a budget constraint shrank every frame alike and the
deterministic Allocator fell to 0.03-0.07 val accuracy at its target; README, "Choosing hyperparameters").
The initialisation differs from the reference's too (which zeroes the head's last layer with bias -10/k: an
exactly uniform policy whose softplus slope, 4.5e-5, barely moves). `beta_init_logit` sets the initial free
concentration c = 2 softplus(beta_init_logit): 0 (default) starts at alpha = beta = 1 + ln 2 (a broad,
symmetric Beta); -10 reproduces the reference's Beta(1, 1).

Beyond the reference: a relevance prior, the question-to-frame match score of `relevance` through a bilinear
form `relevance_metric` that starts at the identity (the parameter-free score) and is learned, added to the
head's output with a learned trust (`relevance_head`). CAPO moves these few, well-placed weights within a
short run; the decoder alone did not learn to rank frames in 150-300 steps here. The decoder reads the frozen
tokens standardised per video (`standardise_frames`).

What an allocation costs in tokens, and the hard budget that rescales it to a target retention, live with
the rest of the token arithmetic in `resadapt.budget`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from resadapt.capo import beta_log_prob
from resadapt.config import positive_number

__all__ = [
    "AllocatorConfig",
    "Allocator",
    "AllocatorOutput",
    "FrameFeatures",
    "query_tokenizer",
]

ENCODER_TYPES = ("qwen_vision", "smolvlm")
QUERY_SOURCES = ("embeddings", "hidden_states")
# model_type of the backbone -> (module under transformers.models, vision tower class)
QWEN_VISION_TOWERS = {
    "qwen2_vl": ("qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl": ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
}
# Normalisation of each source's own image processor: Qwen2/2.5-VL use CLIP's, Qwen3-VL and SmolVLM 0.5/0.5.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]
_DEFAULT_NORM = {
    "qwen2_vl": (_CLIP_MEAN, _CLIP_STD),
    "qwen2_5_vl": (_CLIP_MEAN, _CLIP_STD),
    "qwen3_vl": (_HALF, _HALF),
    "smolvlm": (_HALF, _HALF),
}
# |logit| of the Beta mean beyond which alpha or beta exceeds e^10 (far past any beta_max clamp)
_MAX_LOGIT = 10.0
BUDGET_GRAD_FLOOR = 0.01  # least d(mean)/d(budget logit) the budget constraint sees (`budget_mean_scales`)
# Same clamp of the latent as capo.beta_log_prob: log-probs stay finite at sampled extremes.
_U_EPS = 1e-6
# Frames sent through the frozen vision encoder in one call (bounds memory for long videos).
_ENCODE_BATCH_FRAMES = 64


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")
    return int(value)


class AllocatorConfig(PretrainedConfig):
    """Configuration of the Allocator: which frozen encoder, decoder sizes and the Beta policy's range.

    `encoder_config` is the full config dict of the frozen source model (a Qwen-VL backbone's
    `config.to_dict()` or a SmolVLM config dict), so the frozen modules are rebuilt from this config alone
    and their weights come from the checkpoint. `coarse_size` is rounded to the encoder's token grid
    (patch x merge: 28 for Qwen2.5-VL); `None` means the encoder's native size (SmolVLM: `image_size`).
    """

    model_type = "resadapt_allocator"

    encoder_type: str = "qwen_vision"
    encoder_config: dict | None = None
    coarse_size: int | None = 112
    query_source: str = "embeddings"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    ff_mult: int = 2
    pool_hidden: int = 128
    head_hidden: int = 128
    gate_init: float = 0.25
    s_min: float = 0.125
    s_max: float = 1.25
    beta_param_scale: float = 0.5
    beta_max: float = 20.0
    beta_init_logit: float = 0.0
    init_mean_scale: float | None = None
    relevance_prior: bool = True
    relevance_init: float = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        owner = "AllocatorConfig"
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(
                f"{owner}.encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}"
            )
        if self.query_source not in QUERY_SOURCES:
            raise ValueError(
                f"{owner}.query_source must be one of {QUERY_SOURCES}, got {self.query_source!r}"
            )
        if isinstance(self.encoder_config, PretrainedConfig):
            self.encoder_config = self.encoder_config.to_dict()
        if self.encoder_config is not None and not isinstance(self.encoder_config, dict):
            raise ValueError(
                f"{owner}.encoder_config must be a config dict, got {type(self.encoder_config).__name__}"
            )
        for name in ("dim", "depth", "num_heads", "ff_mult", "pool_hidden", "head_hidden"):
            setattr(self, name, _positive_int(owner, name, getattr(self, name)))
        if self.dim % self.num_heads:
            raise ValueError(f"{owner}.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        self.gate_init = float(self.gate_init)
        if not math.isfinite(self.gate_init):
            raise ValueError(f"{owner}.gate_init must be finite, got {self.gate_init!r}")
        self.s_min = positive_number(f"{owner}.s_min", self.s_min)
        self.s_max = positive_number(f"{owner}.s_max", self.s_max)
        if self.s_min >= self.s_max:
            raise ValueError(f"{owner}.s_min ({self.s_min}) must be below s_max ({self.s_max})")
        self.beta_param_scale = positive_number(f"{owner}.beta_param_scale", self.beta_param_scale)
        self.beta_max = positive_number(f"{owner}.beta_max", self.beta_max)
        if self.init_mean_scale is not None:
            m = float(self.init_mean_scale)
            if not self.s_min < m < self.s_max:
                raise ValueError(
                    f"{owner}.init_mean_scale must be strictly between s_min ({self.s_min}) and s_max "
                    f"({self.s_max}), got {m}"
                )
            self.init_mean_scale = m
        if not isinstance(self.relevance_prior, bool):
            raise ValueError(f"{owner}.relevance_prior must be a bool, got {self.relevance_prior!r}")
        self.beta_init_logit = float(self.beta_init_logit)
        if not math.isfinite(self.beta_init_logit):
            raise ValueError(f"{owner}.beta_init_logit must be finite, got {self.beta_init_logit!r}")
        if self.beta_max <= 1.0:
            raise ValueError(f"{owner}.beta_max must exceed 1 (alpha, beta >= 1), got {self.beta_max}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                value = [float(v) for v in value]
                if len(value) != 3 or (name == "image_std" and min(value) <= 0):
                    raise ValueError(f"{owner}.{name} must be 3 numbers (std > 0), got {value!r}")
                setattr(self, name, value)
        if self.coarse_size is not None:
            self.coarse_size = _positive_int(owner, "coarse_size", self.coarse_size)
        if self.encoder_config is not None:
            self._resolve_encoder_defaults()
        elif self.coarse_size is None:
            raise ValueError(
                f"{owner}.coarse_size=None needs encoder_config to read the encoder's image size"
            )

    def _resolve_encoder_defaults(self) -> None:
        """Round coarse_size to the encoder's grid and fill the source processor's normalisation."""
        enc = self.encoder_config
        owner = "AllocatorConfig"
        model_type = enc.get("model_type")
        vision = enc.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError(f"{owner}.encoder_config has no vision_config dict (model_type {model_type!r})")
        if self.encoder_type == "qwen_vision":
            if model_type not in QWEN_VISION_TOWERS:
                raise ValueError(
                    f"{owner}.encoder_config model_type {model_type!r} is not a Qwen-VL backbone "
                    f"({sorted(QWEN_VISION_TOWERS)}) as encoder_type='qwen_vision' needs"
                )
            factor = int(vision.get("patch_size", 14)) * int(vision.get("spatial_merge_size", 2))
            native = None
        else:
            if model_type not in ("smolvlm", "idefics3"):
                raise ValueError(
                    f"{owner}.encoder_config model_type {model_type!r} is not a SmolVLM config "
                    "as encoder_type='smolvlm' needs"
                )
            factor = int(vision.get("patch_size", 16)) * int(enc.get("scale_factor", 2))
            native = int(vision.get("image_size", 512))
        size = self.coarse_size if self.coarse_size is not None else native
        if size is None:
            raise ValueError(f"{owner}.coarse_size=None is only valid for encoder_type='smolvlm'")
        self.coarse_size = max(factor, int(round(size / factor)) * factor)
        mean, std = _DEFAULT_NORM.get(model_type, (_HALF, _HALF))
        self.image_mean = self.image_mean or list(mean)
        self.image_std = self.image_std or list(std)


@dataclass
class FrameFeatures:
    """Frozen coarse features of a batch of videos: tokens (B, T, L, D) and a frame mask (B, T).

    Frames are left-aligned: sample i has `mask[i].sum()` valid frames first, then padding. The trainer
    caches these per sample (the encoder is frozen), so `select` and `cat` re-batch them.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 4:
            raise ValueError(
                f"FrameFeatures.tokens must be (B, T, L, D), got shape {tuple(self.tokens.shape)}"
            )
        if self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(
                f"FrameFeatures.mask must be a bool (B, T) = {tuple(self.tokens.shape[:2])} tensor, "
                f"got {tuple(self.mask.shape)} {self.mask.dtype}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_frames(self) -> list[int]:
        """Valid frames of each sample."""
        return [int(n) for n in self.mask.sum(-1).tolist()]

    def to(self, device: torch.device | str) -> FrameFeatures:
        return FrameFeatures(self.tokens.to(device), self.mask.to(device))

    def select(self, indices: Sequence[int] | torch.Tensor) -> FrameFeatures:
        """Samples `indices` (repeats allowed), with the frame axis trimmed to the longest one selected."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.tokens.device).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("FrameFeatures.select: indices is empty")
        if int(idx.min()) < -len(self) or int(idx.max()) >= len(self):
            raise ValueError(
                f"FrameFeatures.select: indices {idx.tolist()} out of range for {len(self)} samples"
            )
        mask = self.mask[idx]
        t = max(1, int(mask.sum(-1).max()))
        return FrameFeatures(self.tokens[idx, :t], mask[:, :t])

    @staticmethod
    def cat(features: Sequence[FrameFeatures]) -> FrameFeatures:
        """Concatenate along the batch, padding the frame axis (zeros, masked) to the longest."""
        if not features:
            raise ValueError("FrameFeatures.cat: nothing to concatenate")
        shapes = {tuple(f.tokens.shape[2:]) for f in features}
        if len(shapes) != 1:
            raise ValueError(f"FrameFeatures.cat: token shapes (L, D) differ: {sorted(shapes)}")
        t = max(f.tokens.shape[1] for f in features)
        tokens, masks = [], []
        for f in features:
            pad = t - f.tokens.shape[1]
            tokens.append(F.pad(f.tokens, (0, 0, 0, 0, 0, pad)))
            masks.append(F.pad(f.mask, (0, pad), value=False))
        return FrameFeatures(torch.cat(tokens), torch.cat(masks))


@dataclass
class AllocatorOutput(ModelOutput):
    """Beta parameters per frame (masked frames: alpha = beta = 1) and the pooled frame features.

    `alpha`, `beta` are clamped to [1, beta_max] (the policy). `budget_logit` (B,), `split` (B, T) and
    `concentration` (B, T) are the unclamped parts they are made of (`Allocator.beta_parameters`).
    """

    alpha: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    budget_logit: torch.Tensor | None = None
    split: torch.Tensor | None = None
    concentration: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    frame_features: torch.Tensor | None = None
    pool_weights: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Trainable decoder


def sinusoidal_embedding(num_positions: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(num_positions, dim) fixed sin/cos embedding of the frame index: any number of frames, no weights."""
    pos = torch.arange(num_positions, dtype=torch.float32, device=device)[:, None]
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / max(half, 1)
    )
    emb = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class _Attention(nn.Module):
    """Multi-head attention with a key padding mask (True = attend), through SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, sq, d = x.shape
        sk = context.shape[1]
        h = self.num_heads

        def heads(t: torch.Tensor, s: int) -> torch.Tensor:
            return t.view(n, s, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x), sq),
            heads(self.k_proj(context), sk),
            heads(self.v_proj(context), sk),
            attn_mask=key_mask[:, None, None, :],
        )
        return self.o_proj(out.transpose(1, 2).reshape(n, sq, d))


class _DecoderLayer(nn.Module):
    """Pre-norm: temporal self-attention per token position -> gated cross-attention to the query -> FFN."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int) -> None:
        super().__init__()
        self.temporal_norm = nn.LayerNorm(dim)
        self.temporal_attn = _Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.query_norm = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, num_heads)
        # x += sigmoid(gate) * cross_attn: the authors' v3 gate (reference §1.7), set in _init_weights.
        self.cross_gate = nn.Parameter(torch.zeros(()))
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        frame_mask: torch.Tensor,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        has_query: torch.Tensor,
    ) -> torch.Tensor:
        b, t, n_tok, d = x.shape
        h = self.temporal_norm(x).permute(0, 2, 1, 3).reshape(b * n_tok, t, d)
        key_mask = frame_mask[:, None, :].expand(b, n_tok, t).reshape(b * n_tok, t)
        attn = self.temporal_attn(h, h, key_mask)
        x = x + attn.view(b, n_tok, t, d).permute(0, 2, 1, 3)
        h = self.cross_norm(x).reshape(b, t * n_tok, d)
        attn = self.cross_attn(h, self.query_norm(query), query_mask).view(b, t, n_tok, d)
        x = x + torch.sigmoid(self.cross_gate) * attn * has_query[:, None, None, None]
        return x + self.ffn(self.ffn_norm(x))


class _TextAwarePool(nn.Module):
    """Per frame: gate_l = softmax_l MLP([LN(h_l); q_mean]); pooled = sum_l gate_l h_l (reference §1.3)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, query_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = query_mean[:, None, None, :].expand(*x.shape[:3], -1)
        logits = self.score(torch.cat([self.norm(x), q], dim=-1)).squeeze(-1)
        weights = logits.softmax(dim=-1)
        return torch.einsum("btl,btld->btd", weights, x), weights


class _BetaHead(nn.Module):
    """LN -> Linear -> GELU -> Linear(., 2): per frame a split score and a concentration score; `out` starts
    at zero weights (the same Beta for every frame until the prior or training moves it)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 2)
        # flagged on the Linear itself: transformers skips parameter-less containers when initialising
        # custom models, so the special init must key on the module that owns the weights
        self.out._resadapt_beta_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(self.norm(x))))


# ---------------------------------------------------------------------------------------------------------
# Frozen encoders


def _source_config(config: AllocatorConfig) -> PretrainedConfig:
    if config.encoder_config is None:
        raise ValueError(
            "AllocatorConfig.encoder_config is None: build the Allocator with Allocator.from_backbone / "
            "from_smolvlm, or pass the source model's config dict"
        )
    return AutoConfig.for_model(**config.encoder_config)


def _qwen_vision_tower(source: PretrainedConfig) -> nn.Module:
    module, name = QWEN_VISION_TOWERS[source.model_type]
    cls = getattr(importlib.import_module(f"transformers.models.{module}"), name)
    # built in the current default dtype (float32, or the dtype from_pretrained asks for), not in the
    # source checkpoint's dtype, so the frozen encoder and the decoder agree
    return cls._from_config(source.vision_config, dtype=torch.get_default_dtype())


def _smolvlm_modules(source: PretrainedConfig) -> tuple[nn.Module, nn.Module]:
    # modeling only: importing the SmolVLM processor would need torchvision, the modeling file does not.
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

    vision = SmolVLMVisionTransformer._from_config(source.vision_config, dtype=torch.get_default_dtype())
    return vision, SmolVLMConnector(source)


def _find_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and isinstance(getattr(owner, name, None), nn.Module):
            return getattr(owner, name)
    raise ValueError(f"model {type(model).__name__} has no {what} (looked for .{name} and .model.{name})")


def standardise_frames(frame_tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Frozen tokens (B, T, L, D) minus their video's mean token, divided by the video's RMS; padding 0.

    What the decoder needs is what tells one frame from another. Raw, the tiny backbone's coarse tokens are
    mostly one vector shared by every frame (measured on 60 detail-QA test videos: projected, the
    frame-to-frame std was 0.015 against a norm of 5.2, below the position embedding's norm of 8).
    """
    w = frame_mask[:, :, None, None].to(frame_tokens.dtype)
    n = w.sum((1, 2), keepdim=True) * frame_tokens.shape[2]
    mean = (frame_tokens * w).sum((1, 2), keepdim=True) / n.clamp(min=1.0)
    centred = (frame_tokens - mean) * w
    rms = torch.sqrt((centred**2).sum((1, 2, 3), keepdim=True) / (n * frame_tokens.shape[3]).clamp(min=1.0))
    return centred / (rms + 1e-6)


def relevance(
    frame_tokens: torch.Tensor, frame_mask: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """Parameter-free question relevance of each frame (B, T), from the frozen features alone.

    An MLLM's projector maps visual tokens into its word-embedding space, so a frame whose tokens score high
    against a question word (e.g. the colour it names) is a candidate. Per query token q: s_tq = max over
    the frame's tokens of <v_tl, e_q>, centred over the valid frames (words every frame matches carry no
    information); relevance_t = max_q, divided by the sample's spread. Measured on the embedded val split
    (tiny backbone, coarse 112 px): evidence frames rank above the others with AUC 0.91, the top frame is
    evidence in 75% of detail-QA videos. The Allocator learns the bilinear form the match is measured in
    (`relevance_metric`, applied to `frame_tokens` before this call) and how much to trust it (`relevance_head`).
    """
    fm = frame_mask.bool()
    qm = query_mask.bool()
    s = torch.einsum("btld,bqd->btlq", frame_tokens, query).amax(2)  # (B, T, Q)
    w = fm[..., None].to(s.dtype)
    mean = (s * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1.0)
    c = (s - mean) * w
    valid = fm[:, :, None] & qm[:, None, :]
    # clamped inside the root: a single frame has no spread, and the learned metric needs a finite gradient
    spread = torch.sqrt(((c**2 * valid).sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)).clamp(min=1e-12)) + 1e-6
    r = torch.where(valid, c, torch.full_like(c, -torch.inf)).amax(-1)
    r = torch.where(torch.isfinite(r), r, torch.zeros_like(r)) / spread[:, None]
    return r * fm


class Allocator(PreTrainedModel):
    """Per-frame Beta policy over resize scales, conditioned on coarse frames and the question.

    Frozen: the coarse vision encoder (and SmolVLM's connector) and the query encoder; they stay in eval
    mode even under `.train()`. Trainable: projections, decoder layers, pooling and the Beta head.
    """

    config_class = AllocatorConfig
    config: AllocatorConfig
    base_model_prefix = "allocator"
    main_input_name = "frame_tokens"
    _supports_sdpa = True

    def __init__(self, config: AllocatorConfig) -> None:
        super().__init__(config)
        source = _source_config(config)
        self.connector: nn.Module | None = None
        if config.encoder_type == "qwen_vision":
            vc = source.vision_config
            self.vision = _qwen_vision_tower(source)
            self.patch_size = int(vc.patch_size)
            self.merge_size = int(vc.spatial_merge_size)
            self.temporal_patch_size = int(vc.temporal_patch_size)
            self.encoder_dim = int(getattr(vc, "out_hidden_size", None) or vc.hidden_size)
            self.tokens_per_frame = (config.coarse_size // (self.patch_size * self.merge_size)) ** 2
        else:
            self.vision, self.connector = _smolvlm_modules(source)
            self.patch_size = int(source.vision_config.patch_size)
            self.merge_size = int(source.scale_factor)
            self.temporal_patch_size = 1
            self.encoder_dim = int(source.text_config.hidden_size)
            self.tokens_per_frame = (config.coarse_size // (self.patch_size * self.merge_size)) ** 2
        text_cfg = source.text_config
        self.query_dim = int(text_cfg.hidden_size)
        self.query_embed: nn.Embedding | None = None
        self.text_model: nn.Module | None = None
        if config.query_source == "embeddings":
            self.query_embed = nn.Embedding(int(text_cfg.vocab_size), self.query_dim)
        else:
            self.text_model = AutoModel.from_config(text_cfg, dtype=torch.get_default_dtype())

        d = config.dim
        self.frame_proj = nn.Linear(self.encoder_dim, d)
        self.query_proj = nn.Linear(self.query_dim, d)
        self.layers = nn.ModuleList(
            [_DecoderLayer(d, config.num_heads, config.ff_mult) for _ in range(config.depth)]
        )
        self.pool = _TextAwarePool(d, config.pool_hidden)
        self.head = _BetaHead(d, config.head_hidden)
        # one budget logit per video from its frames' mean; the head's per-frame scores only split it
        self.budget = nn.Linear(d, 1)
        if config.relevance_prior and self.encoder_dim != self.query_dim:
            raise ValueError(
                f"AllocatorConfig.relevance_prior needs frame tokens and query in one space, but their widths "
                f"differ ({self.encoder_dim} vs {self.query_dim}); set relevance_prior=False"
            )
        # The prior's bilinear form <W v, e>: W starts at the identity (the parameter-free prior) and is
        # learned, so training can re-weigh what counts as a match; the head learns how much to trust it.
        self.relevance_metric = (
            nn.Linear(self.encoder_dim, self.query_dim, bias=False) if config.relevance_prior else None
        )
        self.relevance_head = nn.Linear(1, 1) if config.relevance_prior else None
        self.post_init()
        self._freeze()

    # --- HF plumbing -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Small normal init for the decoder; the Beta head's last layer gives alpha = beta ~ 1 (uniform).

        Uses `transformers.initialization`, which skips tensors loaded from a checkpoint, so
        `from_pretrained` never overwrites trained weights.
        """
        if module is getattr(self, "relevance_metric", None):
            # identity, missing from checkpoints written before it existed: they load as they behaved
            init.copy_(
                module.weight, torch.eye(module.out_features, module.in_features, dtype=module.weight.dtype)
            )
        elif module is getattr(self, "frame_proj", None):
            # unit-variance inputs (standardise_frames) give unit-variance features, on par with positions
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            init.zeros_(module.bias)
        elif module is getattr(self, "relevance_head", None):
            # +r on the split logit: relevant frames start with more pixels (0: no prior)
            init.constant_(module.weight, self.config.relevance_init)
            init.zeros_(module.bias)
        elif module is getattr(self, "budget", None):
            init.zeros_(module.weight)
            init.constant_(module.bias, self._init_budget_logit())
        elif getattr(module, "_resadapt_beta_out", False):
            init.zeros_(module.weight)
            k = self.config.beta_param_scale
            init.copy_(
                module.bias, torch.tensor([0.0, self.config.beta_init_logit / k], dtype=module.bias.dtype)
            )
        elif isinstance(module, _DecoderLayer):
            init.constant_(module.cross_gate, self.config.gate_init)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def _init_budget_logit(self) -> float:
        """The budget logit giving the initial Beta mean: 1/2, or `init_mean_scale` (the authors start above
        the cost target, reference §1.5)."""
        c = self.config
        if c.init_mean_scale is None:
            return 0.0
        u = (c.init_mean_scale - c.s_min) / (c.s_max - c.s_min)
        return math.log(u / (1.0 - u))

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen encoders: never trained, always in eval mode."""
        mods = [self.vision, self.connector, self.query_embed, self.text_model]
        return [m for m in mods if m is not None]

    def _freeze(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> Allocator:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Allocator:
        model = super().from_pretrained(*args, **kwargs)
        model._freeze()
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args: Any,
        card_metrics: dict | None = None,
        card_training: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`PreTrainedModel.save_pretrained`, plus a Hugging Face model card (README.md) saying what the
        folder holds and how to load it. Measured results and the training data go in as `card_metrics` /
        `card_training` (or the attributes of the same names); weights and config are saved unchanged."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            metrics = card_metrics if card_metrics is not None else getattr(self, "card_metrics", None)
            training = card_training if card_training is not None else getattr(self, "card_training", None)
            card = model_card(self.config, metrics, training)
            (Path(save_directory) / "README.md").write_text(card, encoding="utf-8")

    @classmethod
    def from_backbone(cls, model: nn.Module, processor: Any = None, **config_kwargs: Any) -> Allocator:
        """An Allocator whose frozen encoders are copies of a loaded Qwen-VL backbone's vision tower and
        input embeddings (or its text model with `query_source="hidden_states"`).

        Pass the backbone's `processor` to take the normalisation its image processor applies.
        """
        model_type = getattr(model.config, "model_type", None)
        if model_type not in QWEN_VISION_TOWERS:
            raise ValueError(
                f"from_backbone: model_type {model_type!r} is not one of {sorted(QWEN_VISION_TOWERS)}"
            )
        if processor is not None and getattr(processor, "image_processor", None) is not None:
            ip = processor.image_processor
            config_kwargs.setdefault("image_mean", list(ip.image_mean))
            config_kwargs.setdefault("image_std", list(ip.image_std))
        config = AllocatorConfig(
            encoder_type="qwen_vision", encoder_config=model.config.to_dict(), **config_kwargs
        )
        allocator = cls(config)
        allocator.vision.load_state_dict(_find_submodule(model, "visual", "vision tower").state_dict())
        if allocator.query_embed is not None:
            allocator.query_embed.load_state_dict(model.get_input_embeddings().state_dict())
        else:
            lm = _find_submodule(model, "language_model", "text model")
            allocator.text_model.load_state_dict(lm.state_dict())
        allocator._freeze()
        return allocator

    @classmethod
    def from_smolvlm(cls, model: nn.Module, **config_kwargs: Any) -> Allocator:
        """The paper profile: frozen SmolVLM(2) vision tower + connector + text model, copied from `model`
        (a `SmolVLMForConditionalGeneration` or `SmolVLMModel`). Frames go in at the vision `image_size`
        unless `coarse_size` is given; the query is the text model's last hidden state unless
        `query_source="embeddings"`.
        """
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ("smolvlm", "idefics3"):
            raise ValueError(f"from_smolvlm: model_type {model_type!r} is not a SmolVLM model")
        config_kwargs.setdefault("coarse_size", None)
        config_kwargs.setdefault("query_source", "hidden_states")
        config = AllocatorConfig(
            encoder_type="smolvlm", encoder_config=model.config.to_dict(), **config_kwargs
        )
        allocator = cls(config)
        allocator.vision.load_state_dict(_find_submodule(model, "vision_model", "vision tower").state_dict())
        allocator.connector.load_state_dict(_find_submodule(model, "connector", "connector").state_dict())
        text = _find_submodule(model, "text_model", "text model")
        if allocator.query_embed is not None:
            allocator.query_embed.load_state_dict(text.get_input_embeddings().state_dict())
        else:
            allocator.text_model.load_state_dict(text.state_dict())
        allocator._freeze()
        return allocator

    # --- Frozen encoding ---------------------------------------------------------------------------------

    def _coarse_frames(self, videos: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """All frames resized to coarse_size^2 with the source processor's filter, and frames per video."""
        if isinstance(videos, np.ndarray):
            raise ValueError(
                "videos must be a list of arrays (one (T, H, W, 3) video or (H, W, 3) image each)"
            )
        if len(videos) == 0:
            raise ValueError("videos is empty")
        size = self.config.coarse_size
        # Qwen's PIL processors resize bicubic; SmolVLM's processor uses Lanczos.
        resample = (
            Image.Resampling.BICUBIC
            if self.config.encoder_type == "qwen_vision"
            else Image.Resampling.LANCZOS
        )
        frames, counts = [], []
        for i, video in enumerate(videos):
            if not isinstance(video, np.ndarray) or video.dtype != np.uint8:
                raise ValueError(
                    f"videos[{i}] must be a uint8 numpy array, got {type(video).__name__} "
                    f"{getattr(video, 'dtype', '')}"
                )
            if video.ndim == 3:
                video = video[None]
            if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[:3]) < 1:
                raise ValueError(f"videos[{i}] must be (T, H, W, 3) or (H, W, 3), got shape {video.shape}")
            for f in video:
                if f.shape[:2] != (size, size):
                    f = np.asarray(Image.fromarray(f).resize((size, size), resample))
                frames.append(f)
            counts.append(video.shape[0])
        return np.stack(frames), counts

    def _normalise(self, frames: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.config.image_mean, dtype=np.float32)
        std = np.asarray(self.config.image_std, dtype=np.float32)
        return (frames.astype(np.float32) / 255.0 - mean) / std

    def _qwen_patches(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Each frame as one image: duplicated over temporal_patch_size and patchified in Qwen's order
        (the same layout as processing.QwenVideoProcessor.patchify, batched over frames)."""
        n, h, w, c = frames.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = np.repeat(frames.transpose(0, 3, 1, 2)[:, None], tp, axis=1)  # N, tp, C, H, W
        x = x.reshape(n, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = torch.from_numpy(np.ascontiguousarray(x.reshape(n * gh * gw, c * tp * p * p)))
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long)
        return patches, grid

    def _encode_batch(self, frames: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 coarse frames -> (N, L, D_enc) frozen features."""
        x = self._normalise(frames)
        dtype = next(self.vision.parameters()).dtype
        if self.config.encoder_type == "qwen_vision":
            patches, grid = self._qwen_patches(x)
            out = self.vision(patches.to(self.device, dtype), grid_thw=grid.to(self.device))
            return out.pooler_output.view(len(frames), self.tokens_per_frame, -1).float()
        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device, dtype)
        hidden = self.vision(pixel_values=pixels).last_hidden_state
        return self.connector(hidden).float()

    @torch.no_grad()
    def encode_frames(self, videos: Sequence[np.ndarray]) -> FrameFeatures:
        """Coarse features of every frame: each item a (T, H, W, 3) uint8 video or (H, W, 3) image (T=1)."""
        frames, counts = self._coarse_frames(videos)
        feats = torch.cat(
            [
                self._encode_batch(frames[i : i + _ENCODE_BATCH_FRAMES])
                for i in range(0, len(frames), _ENCODE_BATCH_FRAMES)
            ]
        )
        t_max = max(counts)
        tokens = feats.new_zeros(len(counts), t_max, *feats.shape[1:])
        mask = torch.zeros(len(counts), t_max, dtype=torch.bool, device=feats.device)
        start = 0
        for i, n in enumerate(counts):
            tokens[i, :n] = feats[start : start + n]
            mask[i, :n] = True
            start += n
        return FrameFeatures(tokens, mask)

    @torch.no_grad()
    def encode_query(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (B, Q, Dq), q_mask (B, Q) bool) of the question tokens (left or right padding)."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be a (B, Q) integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        input_ids = input_ids.to(self.device, torch.long)
        mask = attention_mask.to(self.device).bool()
        if self.query_embed is not None:
            q = self.query_embed(input_ids)
        else:
            # positions count real tokens only, so left padding gives the same states as no padding
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            q = self.text_model(
                input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids, use_cache=False
            ).last_hidden_state
        return q.float() * mask[..., None], mask

    # --- Policy ------------------------------------------------------------------------------------------

    def forward(
        self,
        frame_tokens: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> AllocatorOutput:
        """Beta parameters (B, T) per frame from frame tokens (B, T, L, D_enc) and query (B, Q, Dq)."""
        if frame_tokens.ndim != 4 or frame_tokens.shape[-1] != self.encoder_dim:
            raise ValueError(
                f"frame_tokens must be (B, T, L, {self.encoder_dim}), got {tuple(frame_tokens.shape)}"
            )
        b, t = frame_tokens.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(b, t, dtype=torch.bool, device=frame_tokens.device)
        frame_mask = frame_mask.bool()
        if frame_mask.shape != (b, t):
            raise ValueError(f"frame_mask must be (B, T) = {(b, t)}, got {tuple(frame_mask.shape)}")
        if not bool(frame_mask.any(-1).all()):
            raise ValueError("frame_mask: every sample needs at least one valid frame")
        if query is None or query.ndim != 3 or query.shape[0] != b or query.shape[-1] != self.query_dim:
            got = None if query is None else tuple(query.shape)
            raise ValueError(f"query must be (B={b}, Q, {self.query_dim}) from encode_query, got {got}")
        if query_mask is None:
            query_mask = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
        query_mask = query_mask.bool()
        if query_mask.shape != query.shape[:2]:
            raise ValueError(f"query_mask must be {tuple(query.shape[:2])}, got {tuple(query_mask.shape)}")

        dtype = self.frame_proj.weight.dtype
        x = self.frame_proj(standardise_frames(frame_tokens.float(), frame_mask).to(dtype))
        x = x * frame_mask[:, :, None, None]
        x = x + sinusoidal_embedding(t, self.config.dim, x.device).to(dtype)[None, :, None, :]
        q = self.query_proj(query.to(dtype))
        has_query = query_mask.any(-1)
        # a sample without query tokens attends to nothing: open its mask (no NaN) and zero the result
        attend = query_mask | ~has_query[:, None]
        for layer in self.layers:
            x = layer(x, frame_mask, q, attend, has_query.to(dtype))
        weights = query_mask.to(dtype)[..., None]
        q_mean = (q * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        pooled, pool_weights = self.pool(x, q_mean)
        pooled = pooled * frame_mask[..., None]
        raw = self.head(pooled).float()
        score = raw[..., 0]
        if self.relevance_head is not None:
            metric = self.relevance_metric
            rel = relevance(
                metric(frame_tokens.to(metric.weight.dtype)).float(), frame_mask, query.float(), query_mask
            )
            score = (
                score
                + self.relevance_head(rel[..., None].to(self.relevance_head.weight.dtype))[..., 0].float()
            )
        w = frame_mask.to(score.dtype)
        n = w.sum(1, keepdim=True)
        split = (score - (score * w).sum(1, keepdim=True) / n) * w
        video = (pooled * w[..., None]).sum(1) / n
        # a product-sum, not the Linear's matvec: BLAS picks a kernel by the weight's memory layout, and a
        # reloaded Allocator then differed in the 7th digit
        budget_logit = (video * self.budget.weight[0]).sum(-1).float() + self.budget.bias[0].float()
        concentration = 2.0 * F.softplus(self.config.beta_param_scale * raw[..., 1])
        alpha, beta = self.beta_parameters(budget_logit, split, concentration)
        one = torch.ones_like(alpha)
        return AllocatorOutput(
            alpha=torch.where(frame_mask, alpha.clamp(1.0, self.config.beta_max), one),
            beta=torch.where(frame_mask, beta.clamp(1.0, self.config.beta_max), one),
            budget_logit=budget_logit,
            split=split,
            concentration=concentration,
            frame_mask=frame_mask,
            frame_features=pooled,
            pool_weights=pool_weights,
        )

    @staticmethod
    def beta_parameters(
        budget_logit: torch.Tensor, split: torch.Tensor, concentration: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unclamped (alpha, beta), (B, T), with Beta mean mu = sigmoid(budget + split).

        The authors' v3 decomposition (reference §1.7, item 6): one budget logit per video sets how much the
        video gets, a zero-sum split over its frames where it goes, so a cost signal on the budget does not
        flatten the split. alpha = mu k, beta = (1 - mu) k with k = 1 / min(mu, 1 - mu) + c: alpha, beta >= 1
        (unimodal, as the authors' +1) and the mean stays mu whatever c does. (alpha = 1 + mu c,
        beta = 1 + (1 - mu) c was tried: PPO drove c to 0 within 30 steps, where the mean no longer moves.)
        Written in the logit x, stable at any x: alpha = exp(relu(x)) + sigmoid(x) c, beta likewise in -x.
        """
        x = (budget_logit[:, None] + split).clamp(-_MAX_LOGIT, _MAX_LOGIT)
        alpha = torch.exp(F.relu(x)) + torch.sigmoid(x) * concentration
        beta = torch.exp(F.relu(-x)) + torch.sigmoid(-x) * concentration
        return alpha + 1e-6, beta + 1e-6

    @staticmethod
    def spread_parameters(output: AllocatorOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + mu c, 1 + (1 - mu) c), unclamped: what the concentration regularizer sees.

        alpha + beta = 2 + c, the free concentration only. The rest of the policy's alpha + beta is what an
        extreme mean needs to keep alpha, beta >= 1 (a frame at s_min has beta >= 1 / mu), not a collapse;
        regularizing it pulled every frame back to the middle (measured: the term grew to ~0.9, on par with
        the PPO loss, and the deterministic allocation stayed 0.2-0.3 below full resolution on evidence).
        Unclamped, so a frame past beta_max is still pulled back.
        """
        mu = torch.sigmoid(output.budget_logit[:, None] + output.split)
        return 1.0 + mu * output.concentration, 1.0 + (1.0 - mu) * output.concentration

    def budget_mean_scales(self, output: AllocatorOutput) -> torch.Tensor:
        """Scales (B, T) of the unclamped Beta means sigmoid(budget + split), only the budget logit
        differentiable: what a budget constraint trains, so that it moves how much each video gets and
        leaves where it goes to CAPO.

        Unclamped, unlike `mean_scales`, and with a gradient floor: dmu/dx is sigmoid'(x) + BUDGET_GRAD_FLOOR
        (straight-through, the value stays sigmoid(x)). Through the clamped mean, or through sigmoid' alone,
        the gradient vanishes once a video's frames all sit near s_min, and a collapsed policy was never
        pulled back (measured on val: retention 0.016, gradient norm 3e-6).
        """
        x = output.budget_logit[:, None] + output.split.detach()
        mu = torch.sigmoid(x) + BUDGET_GRAD_FLOOR * (x - x.detach())
        return torch.where(output.frame_mask, self.scales_from_latent(mu), torch.zeros_like(mu))

    def scales_from_latent(self, u: torch.Tensor) -> torch.Tensor:
        """s = s_min + u (s_max - s_min)."""
        return self.config.s_min + torch.as_tensor(u) * (self.config.s_max - self.config.s_min)

    def log_prob(self, output: AllocatorOutput, u: torch.Tensor) -> torch.Tensor:
        """Per-frame Beta log-density of the latent u (B, T); masked frames 0 (reference §1.4)."""
        u = torch.as_tensor(u, device=output.alpha.device)
        if u.shape != output.alpha.shape:
            raise ValueError(
                f"u must have the shape of alpha {tuple(output.alpha.shape)}, got {tuple(u.shape)}"
            )
        lp = beta_log_prob(u.float(), output.alpha, output.beta)
        return torch.where(output.frame_mask, lp, torch.zeros_like(lp))

    def sample(
        self, output: AllocatorOutput, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, scales, log_prob), each (B, T): u ~ Beta(alpha, beta) clamped to [1e-6, 1 - 1e-6].

        Masked frames get u = 0, scales = 0, log_prob = 0. With `generator` the draw is reproducible and
        leaves the global RNG untouched: torch's Gamma sampler takes no generator, so we seed a forked
        global RNG from it.
        """
        alpha, beta = output.alpha.detach().float(), output.beta.detach().float()
        if generator is None:
            u = torch.distributions.Beta(alpha, beta).sample()
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            cuda = alpha.device.type == "cuda"
            devices = [alpha.device.index or 0] if cuda else []
            with torch.random.fork_rng(devices=devices, device_type=alpha.device.type if cuda else "cuda"):
                torch.manual_seed(seed)
                u = torch.distributions.Beta(alpha, beta).sample()
        mask = output.frame_mask
        u = torch.where(mask, u.clamp(_U_EPS, 1.0 - _U_EPS), torch.zeros_like(u))
        scales = torch.where(mask, self.scales_from_latent(u), torch.zeros_like(u))
        return u, scales, self.log_prob(output, u)

    def mean_scales(self, output: AllocatorOutput) -> torch.Tensor:
        """Deterministic allocation: the Beta mean alpha / (alpha + beta) mapped to scales; masked 0."""
        u = output.alpha / (output.alpha + output.beta)
        return torch.where(output.frame_mask, self.scales_from_latent(u), torch.zeros_like(u))

    @torch.no_grad()
    def allocate(
        self,
        videos: Sequence[np.ndarray],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mode: str = "mean",
        generator: torch.Generator | None = None,
    ) -> list[np.ndarray]:
        """Per-sample per-frame scales (length T_i) for raw videos and tokenized questions."""
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
        if len(videos) != len(input_ids):
            raise ValueError(f"{len(videos)} videos but {len(input_ids)} rows of input_ids")
        feats = self.encode_frames(videos)
        q, q_mask = self.encode_query(input_ids, attention_mask)
        out = self(feats.tokens, feats.mask, q, q_mask)
        scales = self.mean_scales(out) if mode == "mean" else self.sample(out, generator)[1]
        return [scales[i, :n].cpu().numpy().astype(np.float64) for i, n in enumerate(feats.num_frames)]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card(config: AllocatorConfig, metrics: dict | None = None, training: str | None = None) -> str:
    """A Hugging Face model card for an Allocator: YAML metadata, what it is, its encoder and scale range,
    the measured results given, and how to load it. `base_model` is the encoder's source when that is a
    hub id (a local path says nothing to a reader elsewhere)."""
    enc = config.encoder_config or {}
    source = str(enc.get("_name_or_path") or "")
    base = source if _HUB_ID.match(source) and not Path(source).exists() else None
    meta = ["library_name: transformers", "tags:"]
    meta += [f"- {t}" for t in ("resadapt", "video", "adaptive-resolution", "qwen-vl", "allocator")]
    if base:
        meta.append(f"base_model: {base}")
    meta.append("license: other  # placeholder: set the license before publishing")
    kind = enc.get("model_type", "?")
    if config.encoder_type == "qwen_vision":
        encoder = (
            f"the vision tower of a {kind} backbone (frames as single images at {config.coarse_size} px)"
        )
    else:
        encoder = f"SmolVLM's SigLIP tower and connector ({kind}, frames at {config.coarse_size} px)"
    query = (
        "token embeddings" if config.query_source == "embeddings" else "the text model's last hidden state"
    )
    lines = [
        "---",
        *meta,
        "---",
        "",
        "# ResAdapt Allocator",
        "",
        "The Allocator of *ResAdapt: Adaptive Resolution for Efficient Multimodal Reasoning*: from coarse "
        "features of every frame and the question it predicts a per-frame resize scale, applied before an "
        "unchanged Qwen-VL backbone encodes the video (one scale per temporal chunk).",
        "",
        "## Training",
        "",
        training or "Not recorded (pass `card_training` to `save_pretrained`).",
        "",
        "## Encoder",
        "",
        f"- frozen coarse encoder: {encoder}" + (f", from `{source}`" if source else ""),
        f"- frozen query encoder: {query}",
        f"- trained decoder: width {config.dim}, {config.depth} layer(s), {config.num_heads} heads; "
        f"relevance prior {'on' if config.relevance_prior else 'off'}",
        "",
        "## Scale range",
        "",
        f"s = s_min + u (s_max - s_min) with u ~ Beta(alpha, beta) per frame, s in [{config.s_min:g}, "
        f"{config.s_max:g}]; the deterministic allocation is the Beta mean, clipped where more scale adds no "
        "tokens, or rescaled to a target retention (hard budget).",
        "",
        "## Results",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
        ]
    else:
        lines.append("No measured results were given (pass `card_metrics` to `save_pretrained`).")
    lines += [
        "",
        "## How to use",
        "",
        "```python",
        "from resadapt import PlugAndPlayAllocator",
        "",
        'allocator = PlugAndPlayAllocator.from_pretrained("path/to/this/folder", processor=backbone_processor)',
        'allocation = allocator.allocate("video.mp4", "What happens after the door opens?", budget=0.25)',
        "inputs = allocation.processor_inputs(backbone_processor)  # or .qwen_messages() / .openai_request(name)",
        "```",
        "",
        "```bash",
        'resadapt allocate video.mp4 --question "..." --allocator path/to/this/folder --budget 0.25',
        'resadapt answer video.mp4 --question "..." --allocator path/to/this/folder --backbone path/to/qwen-vl',
        "```",
        "",
        "The folder loads with `AutoModel.from_pretrained` once `resadapt` is imported (no `trust_remote_code`);"
        " its query tokenizer is saved beside it.",
        "",
    ]
    return "\n".join(lines)


AutoConfig.register(AllocatorConfig.model_type, AllocatorConfig, exist_ok=True)
AutoModel.register(AllocatorConfig, Allocator, exist_ok=True)


def query_tokenizer(params, processor):
    """The tokenizer of the Allocator's query encoder for `allocator` params (`config.AllocatorParams`): the
    backbone's (`encoder: backbone`), or SmolVLM2's from `encoder_path` (paper profile)."""
    if params.encoder == "backbone":
        return processor.tokenizer
    import transformers

    return transformers.AutoTokenizer.from_pretrained(params.encoder_path)


def build_allocator(params, backbone) -> Allocator:
    """A fresh (untrained) Allocator for `params` (`config.Params`) over the configured frozen encoder: the
    initial policy of training, and the `prior_only` methods' relevance prior.

    Its weights are drawn from `params.seed`: the Trainer seeds the RNG only once it is constructed, after
    the Allocator, and the global RNG state of a fresh process is not fixed (measured: two processes built
    different decoders, so two runs with one seed diverged from step 2; torch seeds it at random).
    """
    a = params.allocator
    kwargs = a.model_kwargs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        if a.encoder == "backbone":
            return Allocator.from_backbone(backbone, **kwargs)
        import transformers

        smol = transformers.AutoModelForImageTextToText.from_pretrained(a.encoder_path)
        return Allocator.from_smolvlm(smol, **kwargs)
