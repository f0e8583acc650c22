"""Plug-and-play: a trained Allocator in front of anyone's Qwen-VL model.

The Allocator only decides how many pixels each temporal chunk of a video gets; the backbone and its
inference engine stay unmodified (design decision 1). So using a trained Allocator elsewhere takes three
steps, each here:

1. `PlugAndPlayAllocator.from_pretrained(folder)` loads the Allocator and the query tokenizer the trainer
   saved beside it (`CAPOTrainer.save_allocator`); the token geometry comes from the backbone's processor
   when given, else from the Allocator's encoder config with Qwen's reference pixel limits.
2. `allocate(video, question, budget)` decodes the video (any MP4, or frames already decoded) and runs
   exactly what the evaluate stage runs for the `resadapt` method (no budget: the Beta means clipped at
   token saturation) or `resadapt_hard` (a target retention): the registry method on a `MethodContext`,
   then `budget.realise`. Tokens and retention are measured against the same frames unmodified.
3. The `VideoAllocation` it returns becomes backbone input in the form each consumer takes: Qwen chat
   messages for `qwen_vl_utils.process_vision_info` (one video item per chunk, its frames as PIL images at
   `resized_height` x `resized_width`), the OpenAI chat request a vLLM server takes (the request
   `VLLMBackend` sends), or processor inputs for `model.generate` (`backbone.build_inputs`, which also
   gives Qwen3-VL its per-chunk timestamps through `chunk_metadata`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resadapt.allocator import Allocator, AllocatorConfig
from resadapt.backbone import TimedGeneration, VisualInput, build_inputs, build_messages
from resadapt.baselines import MethodContext, build_method
from resadapt.baselines.allocated import deterministic_allocations
from resadapt.budget import VisionGeometry, realise, retention_of_tokens, video_tokens
from resadapt.data.sample import LoadedSample
from resadapt.data.video import probe_video, read_video
from resadapt.vllm_backend import request_body

__all__ = [
    "DEFAULT_FRAMES",
    "QWEN_VL_UTILS_MIN_TOKENS",
    "PlugAndPlayAllocator",
    "VideoAllocation",
    "answer",
    "default_geometry",
    "load_allocator",
]

#: Frames sampled from a video file when neither a frame count nor a rate is given (the paper's main grid).
DEFAULT_FRAMES = 32
#: qwen-vl-utils 0.0.14 enlarges any video item given `resized_height`/`resized_width` to at least this
#: many merged tokens per frame (its `smart_resize` floor, IMAGE_MIN_TOKEN_NUM), so smaller chunks cannot
#: be expressed in its messages.
QWEN_VL_UTILS_MIN_TOKENS = 4
_SAMPLE_ID = "plug_and_play"


def load_allocator(path: str | Path) -> tuple[Allocator, Any]:
    """(Allocator in eval mode, its query tokenizer) from a folder `CAPOTrainer.save_allocator` wrote.

    Checks the folder before loading, so a wrong folder is named with what it lacks rather than failing
    deep inside transformers.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"allocator folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path} is not an Allocator folder: it has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a readable config ({err})") from None
    if model_type != AllocatorConfig.model_type:
        raise ValueError(
            f"{path} is not an Allocator folder: config.json has model_type {model_type!r}, "
            f"not {AllocatorConfig.model_type!r}"
        )
    if not any((path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"{path} is not an Allocator folder: it has no model.safetensors")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(
            f"{path} holds no query tokenizer (tokenizer.json / tokenizer_config.json): save it beside the "
            "Allocator, as CAPOTrainer.save_allocator does (allocator_tokenizer.save_pretrained(folder))"
        )
    allocator = Allocator.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return allocator, tokenizer


def default_geometry(config: AllocatorConfig) -> VisionGeometry:
    """Token geometry when no backbone processor is given: the patch layout of the Allocator's own Qwen-VL
    encoder (Qwen2.5-VL's for a SmolVLM encoder, the paper profile's backbone) with Qwen's reference pixel
    limits scaled to its token side: video frames 4..768 merged tokens, images 4..16384."""
    if config.encoder_type != "qwen_vision" or not config.encoder_config:
        return VisionGeometry()
    vc = config.encoder_config.get("vision_config") or {}
    patch, merge = int(vc.get("patch_size", 14)), int(vc.get("spatial_merge_size", 2))
    f2 = (patch * merge) ** 2
    return VisionGeometry(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
        min_pixels=4 * f2,
        max_pixels=768 * f2,
        image_min_pixels=4 * f2,
        image_max_pixels=16384 * f2,
    )


def _check_budget(budget: Any) -> float | None:
    if budget is None:
        return None
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a retention in (0, 1], got {budget!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be a retention in (0, 1], got {budget!r}")
    return value


def _check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return question


@dataclass
class VideoAllocation:
    """One video allocated for one question: per-frame scales, the resized chunks and their measured cost.

    `raw_scales` are the Allocator's Beta means (rank frames by these); `scales` are what the operator
    applied (clipped at token saturation, or rescaled to the budget). `visual` holds one resized chunk per
    temporal patch with its start time, exactly what the backbone gets.
    """

    question: str
    source: str
    frames: np.ndarray  # decoded frames (T, H, W, 3) uint8, unmodified
    frame_indices: list[int]
    fps: float
    raw_scales: np.ndarray
    scales: np.ndarray
    budget: float | None
    method: str
    visual: VisualInput
    visual_tokens: int
    reference_tokens: int
    geometry: VisionGeometry
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def retention(self) -> float:
        """Measured: visual tokens fed / tokens of the same frames unmodified."""
        return retention_of_tokens(self.visual_tokens, self.reference_tokens)

    @property
    def resized_frames(self) -> list[np.ndarray]:
        """The resized chunks, (t, h_k, w_k, 3) uint8 each."""
        return list(self.visual.chunks)

    @property
    def chunk_sizes(self) -> list[tuple[int, int]]:
        return [(int(c.shape[1]), int(c.shape[2])) for c in self.visual.chunks]

    @property
    def chunk_frames(self) -> list[list[int]]:
        """Positions (in `frames`) of each chunk's frames."""
        tp = self.geometry.temporal_patch_size
        n = len(self.frames)
        return [list(range(i, min(i + tp, n))) for i in range(0, n, tp)]

    @property
    def tokens_per_chunk(self) -> list[int]:
        return [video_tokens(len(c), c.shape[1], c.shape[2], self.geometry) for c in self.visual.chunks]

    def summary(self) -> dict:
        """Everything but pixels, JSON-ready: per frame, per chunk and the totals."""
        chunk_of = {f: k for k, fs in enumerate(self.chunk_frames) for f in fs}
        g = self.geometry
        return {
            "video": self.source,
            "question": self.question,
            "method": self.method,
            "budget": self.budget,
            "frame_size": [int(self.frames.shape[1]), int(self.frames.shape[2])],
            "fps": self.fps,
            "frames": [
                {
                    "position": i,
                    "index": int(self.frame_indices[i]),
                    "time_s": round(self.frame_indices[i] / self.fps, 4),
                    "raw_scale": round(float(self.raw_scales[i]), 6),
                    "scale": round(float(self.scales[i]), 6),
                    "chunk": chunk_of[i],
                }
                for i in range(len(self.frames))
            ],
            "chunks": [
                {"frames": fs, "height": h, "width": w, "tokens": t, "start_s": round(s, 4)}
                for fs, (h, w), t, s in zip(
                    self.chunk_frames,
                    self.chunk_sizes,
                    self.tokens_per_chunk,
                    self.visual.chunk_times,
                    strict=True,
                )
            ],
            "visual_tokens": self.visual_tokens,
            "reference_tokens": self.reference_tokens,
            "retention": self.retention,
            "geometry": {
                "patch_size": g.patch_size,
                "merge_size": g.merge_size,
                "temporal_patch_size": g.temporal_patch_size,
                "min_pixels": g.min_pixels,
                "max_pixels": g.max_pixels,
            },
            "seconds": dict(self.timings),
        }

    # --- backbone input in each consumer's form ----------------------------------------------------------

    def qwen_messages(self, question_first: bool = False) -> list[dict]:
        """Qwen chat messages for `qwen_vl_utils.process_vision_info`: `build_messages`' layout (timestamp
        text, then one video item per chunk), each item its frames as PIL images with the chunk's size as
        `resized_height` / `resized_width` and the video's rate as `sample_fps` / `raw_fps`.

        Call `process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True,
        image_patch_size=<backbone patch>)` and hand the metadata to the processor: then Qwen2/2.5-VL get the
        same tokens and positions as `processor_inputs`. qwen-vl-utils 0.0.14 resamples every frame twice
        (through a 2x coarser grid and back), so pixels differ slightly; its metadata restarts each item's
        frame indices at 0, so Qwen3-VL's own `<t seconds>` stamps are chunk-local (the timestamp text in
        front of each chunk still carries the time). Raises ValueError for a chunk below
        `QWEN_VL_UTILS_MIN_TOKENS` merged tokens per frame, which qwen-vl-utils would enlarge.
        """
        f = self.geometry.factor
        for k, (h, w) in enumerate(self.chunk_sizes):
            if (h // f) * (w // f) < QWEN_VL_UTILS_MIN_TOKENS:
                raise ValueError(
                    f"chunk {k} is {h}x{w} ({(h // f) * (w // f)} merged tokens per frame): qwen-vl-utils enlarges "
                    f"any video item below {QWEN_VL_UTILS_MIN_TOKENS} tokens, so its tokens would not match; use "
                    "processor_inputs / openai_request, or a processor whose min_pixels is at least "
                    f"{QWEN_VL_UTILS_MIN_TOKENS * f * f}"
                )
        chunks = iter(self.visual.chunks)
        out = []
        for msg in build_messages(self.visual, self.question, question_first=question_first):
            content = []
            for part in msg["content"]:
                if part["type"] == "video":
                    chunk = next(chunks)
                    content.append(
                        {
                            "type": "video",
                            "video": [Image.fromarray(frame) for frame in chunk],
                            "resized_height": int(chunk.shape[1]),
                            "resized_width": int(chunk.shape[2]),
                            "sample_fps": float(self.visual.fps),
                            "raw_fps": float(self.visual.fps),
                        }
                    )
                else:
                    content.append(dict(part))
            out.append({"role": msg["role"], "content": content})
        return out

    def openai_request(self, model_name: str, **options: Any) -> dict:
        """The OpenAI chat-completion body a vLLM server takes (exactly what `VLLMBackend` sends): frames
        travel losslessly, the frame rate as per-request `media_io_kwargs`. `options`: those of
        `vllm_backend.request_body` (max_new_tokens, question_first, image_format, sampling)."""
        return request_body(self.visual, self.question, model_name, **options)

    def processor_inputs(self, processor: Any, question_first: bool = False):
        """Inputs for `model.generate` of any Qwen2-VL / 2.5-VL / 3-VL checkpoint (`build_inputs`)."""
        return build_inputs(processor, [self.visual], [self.question], question_first=question_first)


class PlugAndPlayAllocator:
    """A trained Allocator with its query tokenizer and the token geometry of the backbone it feeds."""

    def __init__(self, allocator: Allocator, tokenizer: Any, geometry: VisionGeometry | None = None):
        self.allocator = allocator.eval()
        self.tokenizer = tokenizer
        self.geometry = geometry or default_geometry(allocator.config)
        self.geometry_source = "given" if geometry is not None else "default"

    @classmethod
    def from_pretrained(
        cls, path: str | Path, processor: Any = None, geometry: VisionGeometry | None = None
    ) -> PlugAndPlayAllocator:
        """Load an Allocator folder; pass the backbone's `processor` (or a `geometry`) for its pixel limits."""
        if processor is not None and geometry is not None:
            raise ValueError("pass either processor or geometry, not both")
        allocator, tokenizer = load_allocator(path)
        if processor is not None:
            geometry = VisionGeometry.from_processor(processor)
        out = cls(allocator, tokenizer, geometry)
        if processor is not None:
            out.geometry_source = "processor"
        return out

    def decode(
        self,
        video: str | os.PathLike | np.ndarray,
        num_frames: int | None = None,
        fps: float | None = None,
        video_fps: float | None = None,
        frame_indices: list[int] | None = None,
    ) -> tuple[np.ndarray, list[int], float, str]:
        """(frames, frame indices, source fps, source name) of a video file or of decoded frames.

        A file is sampled uniformly: `num_frames` frames, or `fps` frames per second of its duration
        (default `DEFAULT_FRAMES`). Decoded frames are taken as they are, at `video_fps` (default 1: their
        `frame_indices`, default 0..T-1, are then seconds).
        """
        if isinstance(video, np.ndarray):
            if num_frames is not None or fps is not None:
                raise ValueError("num_frames / fps sample a video file; pass decoded frames already sampled")
            if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or min(video.shape[:3]) < 1:
                raise ValueError(
                    f"decoded video must be a (T, H, W, 3) uint8 array, got shape {video.shape} dtype {video.dtype}"
                )
            rate = 1.0 if video_fps is None else float(video_fps)
            if not math.isfinite(rate) or rate <= 0:
                raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
            indices = list(range(len(video))) if frame_indices is None else [int(i) for i in frame_indices]
            if len(indices) != len(video) or sorted(set(indices)) != indices or indices[0] < 0:
                raise ValueError(
                    f"frame_indices must be {len(video)} increasing non-negative ints, got {frame_indices!r}"
                )
            return video, indices, rate, "<frames>"
        if video_fps is not None or frame_indices is not None:
            raise ValueError("video_fps / frame_indices describe decoded frames; a file's come from the file")
        if num_frames is not None and fps is not None:
            raise ValueError("give either num_frames or fps, not both")
        path = Path(video)
        if fps is not None:
            rate = float(fps)
            if not math.isfinite(rate) or rate <= 0:
                raise ValueError(f"fps must be a positive number, got {fps!r}")
            num_frames = max(1, round(probe_video(path).duration_s * rate))
        elif num_frames is None:
            num_frames = DEFAULT_FRAMES
        elif isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        frames, meta = read_video(path, num_frames)
        return frames, list(meta.frame_indices), float(meta.fps), str(path)

    def allocate(
        self,
        video: str | os.PathLike | np.ndarray,
        question: str,
        budget: float | None = None,
        *,
        num_frames: int | None = None,
        fps: float | None = None,
        video_fps: float | None = None,
        frame_indices: list[int] | None = None,
    ) -> VideoAllocation:
        """Allocate `video` for `question`: the evaluate stage's `resadapt` method without a budget,
        `resadapt_hard` at target retention `budget` in (0, 1]."""
        question = _check_question(question)
        budget = _check_budget(budget)
        t0 = time.perf_counter()
        frames, indices, rate, source = self.decode(video, num_frames, fps, video_fps, frame_indices)
        decode_s = time.perf_counter() - t0
        sample = LoadedSample(
            row={"id": _SAMPLE_ID, "question": question, "media_type": "video"},
            frames=frames,
            frame_indices=indices,
            fps=rate,
            evidence_mask=np.zeros(len(frames), dtype=bool),
        )
        context = MethodContext(
            geometry=self.geometry,
            s_min=float(self.allocator.config.s_min),
            allocator=self.allocator,
            allocator_tokenizer=self.tokenizer,
        )
        name = "resadapt" if budget is None else "resadapt_hard"
        raw = deterministic_allocations(context, [sample])[0].raw  # cached: the method reuses it
        plan = build_method(name, context).plan_batch([sample], budget)[0]
        realised = realise(sample, plan, self.geometry)
        return VideoAllocation(
            question=question,
            source=source,
            frames=frames,
            frame_indices=indices,
            fps=rate,
            raw_scales=np.asarray(raw, dtype=np.float64),
            scales=np.asarray(plan.scales, dtype=np.float64),
            budget=budget,
            method=name,
            visual=realised.visual,
            visual_tokens=realised.tokens,
            reference_tokens=realised.reference_tokens,
            geometry=self.geometry,
            timings={"decode": decode_s} | plan.timings | {"apply": realised.apply_seconds},
        )


def answer(allocation: VideoAllocation, backend: Any) -> TimedGeneration:
    """Generate with any backend of `resadapt.backbone` / `resadapt.vllm_backend` on the allocated input,
    checking that the prompt holds exactly the visual tokens the allocation counted."""
    gen = backend.generate_timed([allocation.visual], [allocation.question])[0]
    if gen.generation.visual_tokens != allocation.visual_tokens:
        raise RuntimeError(
            f"the prompt holds {gen.generation.visual_tokens} visual tokens but the allocation counted "
            f"{allocation.visual_tokens}: is the backend's processor the one the geometry came from?"
        )
    return gen


# ---------------------------------------------------------------------------------------------------------
# Reports of an allocation: a text table and a figure over the frames.


def allocation_table(allocation: VideoAllocation) -> str:
    """Per-frame table (time, Beta mean, applied scale, its chunk's size and tokens) and the totals."""
    s = allocation.summary()
    g = s["geometry"]
    lines = [
        f"video {s['video']}: {len(s['frames'])} frames of {s['frame_size'][0]}x{s['frame_size'][1]} at "
        f"{s['fps']:.3f} fps; method {s['method']}"
        + ("" if s["budget"] is None else f" at budget {s['budget']:g}"),
        f"question: {s['question']}",
        f"{'frame':>5} {'index':>6} {'time_s':>8} {'raw':>7} {'scale':>7} {'chunk':>5} {'size':>9} {'tokens':>6}",
    ]
    for f in s["frames"]:
        c = s["chunks"][f["chunk"]]
        first = f["position"] == c["frames"][0]
        size = f"{c['height']}x{c['width']}" if first else ""
        tokens = str(c["tokens"]) if first else ""
        lines.append(
            f"{f['position']:>5} {f['index']:>6} {f['time_s']:>8.2f} {f['raw_scale']:>7.3f} "
            f"{f['scale']:>7.3f} {f['chunk']:>5} {size:>9} {tokens:>6}"
        )
    lines.append(
        f"visual tokens {s['visual_tokens']} of {s['reference_tokens']} unmodified: retention {s['retention']:.4f}"
    )
    lines.append(
        f"geometry: patch {g['patch_size']}, merge {g['merge_size']}, temporal {g['temporal_patch_size']}, "
        f"video pixels [{g['min_pixels']}, {g['max_pixels']}]"
    )
    lines.append("seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


_THUMB_HEIGHT = 72


def plot_allocation(allocation: VideoAllocation, path: str | Path, max_thumbnails: int = 32) -> Path:
    """Frame thumbnails (each shown at its chunk's resized size, so detail lost is visible) over bars of
    the Beta mean and the applied scale per frame; written atomically (a temporary file renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(allocation.frames)
    shown = sorted(
        {round(i * (n - 1) / max(1, min(n, max_thumbnails) - 1)) for i in range(min(n, max_thumbnails))}
    )
    tp = allocation.geometry.temporal_patch_size
    thumbs = []
    for i in shown:
        chunk = allocation.visual.chunks[i // tp]
        h, w = allocation.frames.shape[1:3]
        size = (max(1, round(w * _THUMB_HEIGHT / h)), _THUMB_HEIGHT)
        thumbs.append(np.asarray(Image.fromarray(chunk[i % tp]).resize(size, Image.Resampling.NEAREST)))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.5 * len(shown) + 2), 4.5), gridspec_kw={"height_ratios": [1, 2]}
    )
    top.imshow(np.concatenate(thumbs, axis=1))
    top.set_axis_off()
    top.set_title(f"frames as the backbone sees them ({len(shown)} of {n})", fontsize=9)
    x = np.arange(n)
    bottom.bar(x, allocation.raw_scales, color="0.8", label="Allocator (Beta mean)")
    bottom.bar(x, allocation.scales, width=0.5, color="tab:blue", label="applied scale")
    bottom.set_xlabel("frame")
    bottom.set_ylabel("scale")
    bottom.set_xlim(-0.5, n - 0.5)
    budget = "" if allocation.budget is None else f", budget {allocation.budget:g}"
    bottom.set_title(
        f"{allocation.visual_tokens} of {allocation.reference_tokens} tokens: retention "
        f"{allocation.retention:.3f}{budget}",
        fontsize=9,
    )
    bottom.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
