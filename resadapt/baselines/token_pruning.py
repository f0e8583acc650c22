"""Post-encoder token-pruning baselines (ToMe, VisionZip, random token drop) for Qwen2-VL / Qwen2.5-VL.

ResAdapt saves visual tokens *before* the encoder by shrinking frames. The natural competitors keep the
input untouched, run the full vision tower, and drop or merge the tokens it produced before the LLM sees
them. To compare the two honestly the LLM must really receive fewer tokens (fewer `<|video_pad|>` /
`<|image_pad|>` slots, shorter prefill), and the reported cost must be what it received. This module:

* `tome_reduce`: ToMe bipartite soft matching (Bolya et al., 2023) applied to the merged visual tokens of
  all the chunks of a video together, so tokens merge across time as well as space (the authors run ToMe
  in video mode);
* `visionzip_reduce`: VisionZip (Yang et al., 2024) dominant + contextual tokens, per visual item;
* random token drop: a seeded uniform subset of a sample's visual tokens (the authors' Random Drop, which
  drops tokens after the encoder; dropping whole chunks before it is `random_chunk_drop`);
* `PrunedBackend`: the `TransformersBackend` interface, reducing every video chunk and every image
  separately, and decoding greedily in its own loop, because `generate` would recompute the M-RoPE
  positions from the (now shorter) placeholder runs and give kept tokens the wrong positions.

Kept tokens keep the 3-D M-RoPE position of the original token they stand for, text tokens keep theirs,
and decoding continues from the original prompt's largest position + 1 (Qwen's `rope_deltas` rule), so at
`keep_ratio == 1` the backend reproduces `model.generate` token for token.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from resadapt.backbone import Generation, TimedGeneration, VisualInput, build_inputs
from resadapt.baselines.base import Method
from resadapt.budget import Plan
from resadapt.data.sample import LoadedSample

# VisionZip keeps 54 dominant + 10 contextual of 64 tokens (also 108 + 20 of 128, 162 + 30 of 192).
VISIONZIP_DOMINANT_FRACTION = 54 / 64

SUPPORTED_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")
PRUNING_METHODS = ("tome", "visionzip", "random")


def _check_keep(n: int, keep: int) -> None:
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}] for {n} tokens, got {keep}")


def tome_reduce(x: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Merge `x` (n, d) down to `keep` tokens with ToMe bipartite soft matching.

    Each round splits the tokens (in spatial order) alternately into sets A and B, matches every A token to
    its most cosine-similar B token, and merges the r most similar pairs (r <= half the tokens) into their
    B token as a size-weighted mean, so every output is the plain mean of the original tokens it absorbed.
    The similarity metric is the token feature itself: after Qwen's patch merger there are no attention
    keys, which ToMe uses inside a ViT. Returns the merged features and, per output token, the index of the
    original token whose place it takes (a B token that absorbed others, or an unmerged token), sorted so
    that the spatial order is kept.
    """
    n = x.shape[0]
    _check_keep(n, keep)
    idx = torch.arange(n, device=x.device)
    if keep == n:
        return x, idx
    feats = x.float()
    sizes = torch.ones(n, device=x.device)
    while feats.shape[0] > keep:
        m = feats.shape[0]
        r = min(m - keep, m // 2)
        a, b = feats[0::2], feats[1::2]
        sa, sb = sizes[0::2], sizes[1::2]
        ia, ib = idx[0::2], idx[1::2]
        sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        best, dst = sim.max(dim=-1)
        order = torch.sort(best, descending=True, stable=True).indices
        src, unmerged = order[:r], order[r:]
        b_sum = (b * sb[:, None]).index_add(0, dst[src], a[src] * sa[src, None])
        sb = sb.index_add(0, dst[src], sa[src])
        feats = torch.cat([a[unmerged], b_sum / sb[:, None]])
        sizes = torch.cat([sa[unmerged], sb])
        idx = torch.cat([ia[unmerged], ib])
        spatial = torch.argsort(idx)
        feats, sizes, idx = feats[spatial], sizes[spatial], idx[spatial]
    return feats.to(x.dtype), idx


def visionzip_reduce(
    x: Tensor, scores: Tensor, keep: int, dominant_fraction: float = VISIONZIP_DOMINANT_FRACTION
) -> tuple[Tensor, Tensor]:
    """Reduce `x` (n, d) to `keep` tokens: VisionZip's dominant tokens plus merged contextual tokens.

    `round(dominant_fraction * keep)` dominant tokens are the top-`scores` ones (the paper's 54 of 64 by
    default). The rest are merged into the remaining `keep - n_dominant` contextual tokens as VisionZip
    does: targets sampled uniformly (every `step`-th remaining token in spatial order), every other
    remaining token assigned to the target of highest cosine similarity. One deviation: a contextual token
    is the mean of its target and the tokens assigned to it, whereas the official code adds the target to
    the mean of the assigned tokens; the mean keeps the scale of the LLM input embeddings, which here are
    fed to the LLM directly. Returns features and original indices (a contextual token takes its target's
    index), sorted by index.
    """
    n = x.shape[0]
    _check_keep(n, keep)
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
    if keep == n:
        return x, torch.arange(n, device=x.device)
    n_dominant = min(keep, max(1, round(dominant_fraction * keep)))
    n_context = keep - n_dominant
    dominant = torch.topk(scores.float(), n_dominant).indices
    feats, idx = [x[dominant].float()], [dominant]
    if n_context > 0:
        rest_mask = torch.ones(n, dtype=torch.bool, device=x.device)
        rest_mask[dominant] = False
        rest = rest_mask.nonzero().squeeze(1)
        step = max(1, len(rest) // n_context)
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=x.device)
        is_target[torch.arange(0, len(rest), step, device=x.device)[:n_context]] = True
        targets, others = rest[is_target], rest[~is_target]
        unit = F.normalize(x.float(), dim=-1)
        assign = (unit[others] @ unit[targets].T).argmax(dim=-1)
        sums = x[targets].float().index_add(0, assign, x[others].float())
        counts = torch.ones(n_context, device=x.device).index_add(
            0, assign, torch.ones(len(others), device=x.device)
        )
        feats.append(sums / counts[:, None])
        idx.append(targets)
    feats_t, idx_t = torch.cat(feats), torch.cat(idx)
    order = torch.argsort(idx_t)
    return feats_t[order].to(x.dtype), idx_t[order]


# ---------------------------------------------------------------------------------------------------------
# VisionZip's score for a CLS-free encoder: attention received in the vision tower's last block.


def _attention_weights(attn, hidden: Tensor, cu_seqlens: Tensor, position_embeddings) -> list[Tensor]:
    """Softmax attention (heads, l, l) of each attention segment, recomputed from the block's own input.

    Uses the module's own `qkv` projection and its modeling file's `apply_rotary_pos_emb_vision`, so the
    weights are those the tower used (it only returns the attention output, not the weights).
    """
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    bounds = cu_seqlens.tolist()
    weights = []
    for s, e in itertools.pairwise(bounds):
        qs, ks = q[s:e].transpose(0, 1).float(), k[s:e].transpose(0, 1).float()
        weights.append(torch.softmax(qs @ ks.transpose(1, 2) * attn.scaling, dim=-1))
    return weights


@contextmanager
def _capture_received_attention(visual) -> Iterator[list[Tensor]]:
    """Collect, per vision-tower call, the attention each patch receives in the last block (tower order)."""
    store: list[Tensor] = []
    attn = visual.blocks[-1].attn

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        weights = _attention_weights(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])
        # mean over heads and over the queries of the token's own segment (window or frame)
        store.append(torch.cat([w.mean(dim=(0, 1)) for w in weights]))

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def _merged_token_order(visual, grid_thw: Tensor) -> Tensor | None:
    """Index that puts per-merged-token values from the tower's window order into output order."""
    if getattr(visual, "window_size", None) is None:  # Qwen2-VL: no window permutation
        return None
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return torch.argsort(window_index)


def pooled_scores(visual, received: Tensor, grid_thw: Tensor) -> Tensor:
    """Attention received per LLM token: summed over the `spatial_merge_size**2` patches the merger fuses."""
    unit = visual.spatial_merge_size**2
    pooled = received.view(-1, unit).sum(dim=-1)
    order = _merged_token_order(visual, grid_thw)
    return pooled if order is None else pooled[order.to(pooled.device)]


# ---------------------------------------------------------------------------------------------------------
# The backend.


@dataclass
class PrunedInputs:
    """The reduced, left-padded prompt the LLM receives, with what is needed to keep decoding."""

    input_ids: Tensor  # (B, L) with one placeholder per kept visual token
    inputs_embeds: Tensor  # (B, L, d)
    attention_mask: Tensor  # (B, L)
    position_ids: Tensor  # (3, B, L) original M-RoPE positions of the kept tokens
    next_position: Tensor  # (B,) the original prompt's largest position + 1
    visual_tokens: list[int]
    prompt_tokens: list[int]


class PrunedBackend:
    """Greedy generation where each visual item's tokens are reduced by ToMe or VisionZip before the LLM.

    Same interface as `TransformersBackend`. For VisionZip the dominance score is the attention each LLM
    token receives in the vision tower's last block (mean over heads and over the queries of its attention
    segment, summed over the patches the merger fuses), because Qwen's tower has no CLS token whose
    attention the paper uses. ToMe needs no score.
    """

    name = "pruned"

    def __init__(
        self,
        model,
        processor,
        method: Literal["tome", "visionzip", "random"],
        keep_ratio: float,
        max_new_tokens: int = 12,
        batch_size: int = 16,
    ):
        if method not in PRUNING_METHODS:
            raise ValueError(f"method must be one of {PRUNING_METHODS}, got {method!r}")
        if not isinstance(keep_ratio, int | float) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        model_type = model.config.model_type
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"PrunedBackend supports {SUPPORTED_ARCHITECTURES}, not {model_type!r}")
        self.model = model
        self.processor = processor
        self.method = method
        self.keep_ratio = float(keep_ratio)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.name = f"{method}@{self.keep_ratio:g}"
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id
        self.placeholder = {1: model.config.image_token_id, 2: model.config.video_token_id}
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = torch.tensor(sorted({*eos, tok.convert_tokens_to_ids("<|im_end|>")}))
        penalty = model.generation_config.repetition_penalty
        self.repetition = (
            RepetitionPenaltyLogitsProcessor(penalty) if penalty is not None and penalty != 1.0 else None
        )

    def keep_count(self, n: int) -> int:
        # floor, so the tokens fed never exceed the target retention (rounding 0.15 x 64 up gave 0.156)
        return max(1, math.floor(self.keep_ratio * n + 1e-9))

    def _encode(self, pixels: Tensor, grid: Tensor, modality: int) -> list[tuple[Tensor, Tensor | None]]:
        """Run the vision tower on one modality: (merged token features, VisionZip scores or None) per item."""
        inner = self.model.model
        fn = inner.get_image_features if modality == 1 else inner.get_video_features
        if self.method != "visionzip":
            return [(f, None) for f in fn(pixels, grid).pooler_output]
        with _capture_received_attention(inner.visual) as store:
            feats = fn(pixels, grid).pooler_output
        scores = pooled_scores(inner.visual, store[-1], grid).split([len(f) for f in feats])
        return list(zip(feats, scores, strict=True))

    def _reduce(self, items: list[tuple[Tensor, Tensor | None]], seed: int) -> list[tuple[Tensor, Tensor]]:
        """One sample's items of one modality reduced: (kept features, their indices in the item) per item.

        VisionZip reduces each item on its own; ToMe and random drop pool the sample's items (the chunks of a
        video), so tokens merge or survive across time, and an item may keep none.
        """
        if self.method == "visionzip":
            return [visionzip_reduce(f, sc, self.keep_count(len(f))) for f, sc in items]
        sizes = [len(f) for f, _ in items]
        x = torch.cat([f for f, _ in items])
        keep = self.keep_count(len(x))
        if self.method == "tome":
            feats, idx = tome_reduce(x, keep)
        else:
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:keep].sort().values
            feats = x[idx]
        out, start = [], 0
        for n in sizes:
            sel = (idx >= start) & (idx < start + n)
            out.append((feats[sel], idx[sel] - start))
            start += n
        return out

    def prepare(self, batch) -> PrunedInputs:
        """Reduce a processor batch (from `build_inputs`) to what the LLM receives."""
        inner = self.model.model
        ids, mask, types = batch["input_ids"], batch["attention_mask"].bool(), batch["mm_token_type_ids"]
        positions, _ = inner.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"),
            second_per_grid_ts=batch.get("second_per_grid_ts"),
            attention_mask=batch["attention_mask"],
        )
        runs = [  # per row: the modality of each visual item, in prompt order
            [m for m, _ in itertools.groupby(types[b][mask[b]].tolist()) if m] for b in range(ids.shape[0])
        ]
        items: dict[int, Iterator[tuple[Tensor, Tensor]]] = {}
        for modality, pix, grid in (
            (1, "pixel_values", "image_grid_thw"),
            (2, "pixel_values_videos", "video_grid_thw"),
        ):
            if batch.get(pix) is None:
                continue
            encoded = iter(self._encode(batch[pix], batch[grid], modality))
            reduced = []
            for b, row_runs in enumerate(runs):
                mine = [next(encoded) for m in row_runs if m == modality]
                if mine:  # seeded by the row's own tokens: the same sample drops the same tokens in any batch
                    seed = zlib.crc32(ids[b][mask[b]].numpy().tobytes()) ^ modality
                    reduced += self._reduce(mine, seed)
            if next(encoded, None) is not None:
                raise RuntimeError(
                    f"more visual items of type {modality} than placeholder runs in the prompt"
                )
            items[modality] = iter(reduced)
        embed = self.model.get_input_embeddings()
        rows: list[tuple[Tensor, Tensor, Tensor]] = []
        next_position, n_visual = [], []
        for b in range(ids.shape[0]):
            row_ids, row_pos, row_types = ids[b][mask[b]], positions[:, b][:, mask[b]], types[b][mask[b]]
            next_position.append(int(row_pos.max()) + 1)
            new_ids, new_emb, new_pos, visual = [], [], [], 0
            start = 0
            for modality, run in itertools.groupby(row_types.tolist()):
                end = start + len(list(run))
                if modality == 0:
                    new_ids.append(row_ids[start:end])
                    new_emb.append(embed(row_ids[start:end]))
                    new_pos.append(row_pos[:, start:end])
                else:
                    feats, kept = next(items[modality])
                    if len(kept) and int(kept.max()) >= end - start:
                        raise RuntimeError(f"a visual item has {end - start} placeholders but more features")
                    new_ids.append(torch.full((len(kept),), self.placeholder[modality], dtype=ids.dtype))
                    new_emb.append(feats.to(embed.weight.dtype))
                    new_pos.append(row_pos[:, start + kept])
                    visual += len(kept)
                start = end
            rows.append((torch.cat(new_ids), torch.cat(new_emb), torch.cat(new_pos, dim=1)))
            n_visual.append(visual)
        return self._left_pad(rows, next_position, n_visual)

    def _left_pad(self, rows, next_position: list[int], n_visual: list[int]) -> PrunedInputs:
        length = max(len(r[0]) for r in rows)
        pad_emb = self.model.get_input_embeddings()(torch.tensor([self.pad_id]))[0]
        B, d = len(rows), rows[0][1].shape[-1]
        input_ids = torch.full((B, length), self.pad_id, dtype=rows[0][0].dtype)
        embeds = pad_emb.expand(B, length, d).clone()
        mask = torch.zeros(B, length, dtype=torch.long)
        pos = torch.ones(3, B, length, dtype=rows[0][2].dtype)
        for b, (i, e, p) in enumerate(rows):
            n = len(i)
            input_ids[b, length - n :], embeds[b, length - n :], pos[:, b, length - n :] = i, e, p
            mask[b, length - n :] = 1
        return PrunedInputs(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            next_position=torch.tensor(next_position),
            visual_tokens=n_visual,
            prompt_tokens=[len(r[0]) for r in rows],
        )

    def decode(self, pruned: PrunedInputs) -> list[list[int]]:
        """Greedy decoding with a KV cache; generated token ids per row, up to and including the stop token."""
        model, B = self.model, pruned.input_ids.shape[0]
        embed = model.get_input_embeddings()
        mask = pruned.attention_mask
        out = model(
            inputs_embeds=pruned.inputs_embeds,
            attention_mask=mask,
            position_ids=pruned.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        self.prefill_done = time.perf_counter()
        seen = pruned.input_ids
        done = torch.zeros(B, dtype=torch.bool)
        generated: list[Tensor] = []
        for step in range(self.max_new_tokens):
            logits = out.logits[:, -1].float()
            if self.repetition is not None:
                logits = self.repetition(seen, logits)
            token = torch.where(done, self.pad_id, logits.argmax(dim=-1))
            generated.append(token)
            seen = torch.cat([seen, token[:, None]], dim=1)
            done |= torch.isin(token, self.eos_ids)
            if bool(done.all()) or step == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            pos = (pruned.next_position + step).view(1, B, 1).expand(3, B, 1)
            out = model(
                inputs_embeds=embed(token[:, None]),
                attention_mask=mask,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(B)]
        stop = set(self.eos_ids.tolist())
        return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]

    def generate(self, visuals: list[VisualInput], questions: list[str]) -> list[Generation]:
        return [t.generation for t in self.generate_timed(visuals, questions)]

    @torch.inference_mode()
    def generate_timed(self, visuals: list[VisualInput], questions: list[str]) -> list[TimedGeneration]:
        """Greedy answers with each batch's time split into preprocess / prefill (vision tower, reduction and
        the LLM's prompt forward) / generate, as `TransformersBackend.generate_timed` splits it."""
        out = []
        tok = self.processor.tokenizer
        for i in range(0, len(visuals), self.batch_size):
            vis, qs = visuals[i : i + self.batch_size], questions[i : i + self.batch_size]
            t0 = time.perf_counter()
            batch = build_inputs(self.processor, vis, qs)
            t1 = time.perf_counter()
            pruned = self.prepare(batch)
            new = self.decode(pruned)
            t3 = time.perf_counter()
            n = len(vis)
            timings = {
                "preprocess": (t1 - t0) / n,
                "prefill": (self.prefill_done - t1) / n,
                "generate": (t3 - self.prefill_done) / n,
            }
            for j, text in enumerate(tok.batch_decode(new, skip_special_tokens=True)):
                gen = Generation(
                    text.strip(), pruned.visual_tokens[j], pruned.prompt_tokens[j], (t3 - t0) / n
                )
                out.append(TimedGeneration(gen, dict(timings)))
        return out


class _TokenPruning(Method):
    """Unmodified input; the backend keeps a fraction R (the target retention) of the visual tokens."""

    def plan(self, sample: LoadedSample, budget: float | None) -> Plan:
        self.check_budget(budget)
        return Plan(scales=np.ones(1 if sample.is_image else len(sample.frames)), keep_ratio=float(budget))


class ToMe(_TokenPruning):
    """ToMe over all the chunks of a video together (spatial and temporal merging)."""

    name = "tome"
    pruning = "tome"


class RandomTokenDrop(_TokenPruning):
    """Keep a seeded uniform random subset of the visual tokens after the encoder (the paper's Random Drop)."""

    name = "random_token_drop"
    pruning = "random"


class VisionZip(_TokenPruning):
    name = "visionzip"
    pruning = "visionzip"
