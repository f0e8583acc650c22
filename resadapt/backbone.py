"""The MLLM backbone: load any Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint, or build the tiny default one.

The backbone is never modified by ResAdapt: the Allocator only changes the pixels it receives. So this
module has three jobs: give back (model, processor) for a checkpoint folder; build the tiny
same-architecture model the default profile trains on CPU; and turn (frames, per-chunk sizes, question)
into model inputs where every temporal chunk is its own video item (design.md decision 1), so that the
stock position-id code of transformers and vLLM gives identical positions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers.generation.streamers import BaseStreamer
from transformers.video_utils import VideoMetadata

from resadapt.processing import build_processor, build_tokenizer, load_processor, save_processor

ARCHITECTURES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}


@dataclass(frozen=True)
class TinyBackboneSpec:
    """Sizes of the tiny default backbone (Qwen2.5-VL architecture, trained from scratch on CPU)."""

    architecture: str = "qwen2_5_vl"
    vocab_size: int = 768
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 192
    vision_depth: int = 2
    vision_num_heads: int = 2
    min_pixels: int = 28 * 28
    max_pixels: int = 224 * 224
    tie_word_embeddings: bool = True
    seed: int = 0


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {k: tokenizer.convert_tokens_to_ids(v) for k, v in ids.items()}


def tiny_config(spec: TinyBackboneSpec, tokenizer) -> transformers.PretrainedConfig:
    """A config of the requested architecture whose token ids match `tokenizer`."""
    if spec.architecture not in ARCHITECTURES:
        raise ValueError(f"backbone architecture {spec.architecture!r} is not one of {sorted(ARCHITECTURES)}")
    head_dim = spec.hidden_size // spec.num_attention_heads
    # M-RoPE sections (t, h, w) must sum to head_dim / 2; Qwen uses 16/24/24 of 64.
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope = [t_sec, h_sec, half - t_sec - h_sec]
    special = _special_ids(tokenizer)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": spec.tie_word_embeddings,
    }
    vision: dict[str, Any] = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "out_hidden_size": spec.hidden_size,
    }
    cfg_cls = getattr(transformers, ARCHITECTURES[spec.architecture][0])
    if spec.architecture == "qwen2_5_vl":
        vision |= {
            "fullatt_block_indexes": [spec.vision_depth - 1],
            "window_size": 112,
            "tokens_per_second": 2,
        }
    elif spec.architecture == "qwen2_vl":
        vision = {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,
            "num_heads": spec.vision_num_heads,
            "mlp_ratio": spec.vision_intermediate_size // spec.vision_hidden_size,
        }
    elif spec.architecture == "qwen3_vl":
        vision |= {"patch_size": 16, "deepstack_visual_indexes": [], "num_position_embeddings": 256}
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        }
        text["head_dim"] = head_dim
    cfg = cfg_cls(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=spec.tie_word_embeddings,
        **special,
    )
    return cfg


def build_tiny_backbone(spec: TinyBackboneSpec = TinyBackboneSpec()):
    """(model, processor) for the tiny default profile, built offline and deterministically from `spec.seed`."""
    tokenizer = build_tokenizer(vocab_size=spec.vocab_size, seed=spec.seed)
    cfg = tiny_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model_cls = getattr(transformers, ARCHITECTURES[spec.architecture][1])
    model = model_cls(cfg)
    patch = 16 if spec.architecture == "qwen3_vl" else 14
    processor = build_processor(
        tokenizer,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        processor_cls=getattr(transformers, ARCHITECTURES[spec.architecture][2]),
        patch_size=patch,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


def save_backbone(model, processor, path: str | Path) -> Path:
    """`save_pretrained` (safetensors) for the model and every processor piece, in one folder."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    save_processor(processor, path)
    return path


def architecture_of(path: str | Path) -> str:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"backbone checkpoint {path} has no config.json")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{cfg_file}: model_type {model_type!r} is not a supported backbone; expected one of {sorted(ARCHITECTURES)}"
        )
    return model_type


# The backbone stage's output for an external checkpoint: a pointer to it (never a 15 GB copy).
POINTER = "resadapt_backbone.json"


def write_pointer(folder: str | Path, checkpoint: str | Path) -> Path:
    """Make `folder` stand for `checkpoint` (an absolute path is recorded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POINTER).write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve())}, indent=2))
    return folder / POINTER


def backbone_checkpoint(folder: str | Path) -> Path:
    """The checkpoint folder `folder` stands for: itself, or the one its pointer file names."""
    folder = Path(folder)
    pointer = folder / POINTER
    if not pointer.exists():
        return folder
    try:
        return Path(json.loads(pointer.read_text())["checkpoint"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{pointer}: not a backbone pointer file ({err})") from None


def load_backbone(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load (model, processor) of any Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder (or a folder with a
    pointer file to one), offline."""
    path = backbone_checkpoint(path)
    arch = architecture_of(path)
    model_cls = getattr(transformers, ARCHITECTURES[arch][1])
    model = model_cls.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    model.eval()
    processor = load_processor(path, processor_class=ARCHITECTURES[arch][2])
    return model, processor


# ---------------------------------------------------------------------------------------------------------
# Prompts: one video item per temporal chunk.


@dataclass
class VisualInput:
    """What the backbone sees for one sample: either chunks of video frames or a single image.

    `chunks[k]` is a (t, H_k, W_k, 3) uint8 array already resized by the budget operator; `chunk_times[k]`
    is its start time in seconds, written in front of the chunk so the model knows when it happened.
    """

    chunks: list[np.ndarray] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    fps: float = 2.0
    image: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image is None and not self.chunks:
            raise ValueError("a VisualInput needs either video chunks or an image")
        if self.chunks and len(self.chunk_times) != len(self.chunks):
            raise ValueError(f"{len(self.chunks)} chunks but {len(self.chunk_times)} chunk times")


def build_messages(
    visual: VisualInput, question: str, answer: str | None = None, question_first: bool = False
) -> list[dict]:
    """Chat messages for one sample; the timestamps are text, each chunk is a separate video item.

    `question_first` puts the question before the visual items, so visual tokens can attend to it.
    """
    content: list[dict] = []
    if question_first:
        content.append({"type": "text", "text": question})
    if visual.image is not None:
        content.append({"type": "image"})
    for t in visual.chunk_times:
        content.append({"type": "text", "text": f"{t:.1f}s"})
        content.append({"type": "video"})
    if not question_first:
        content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def chunk_metadata(visual: VisualInput) -> list[VideoMetadata]:
    """Per-chunk video metadata (fps, source frame indices) as transformers and vLLM expect it."""
    metas = []
    for chunk, t0 in zip(visual.chunks, visual.chunk_times, strict=True):
        start = int(round(t0 * visual.fps))
        metas.append(
            VideoMetadata(
                total_num_frames=len(chunk),
                fps=visual.fps,
                frames_indices=list(range(start, start + len(chunk))),
                duration=len(chunk) / visual.fps,
            )
        )
    return metas


def build_inputs(
    processor,
    visuals: list[VisualInput],
    questions: list[str],
    answers: list[str] | None = None,
    question_first: bool = False,
) -> transformers.BatchFeature:
    """Batch model inputs (left-padded) for generation, or with answers appended for teacher forcing.

    With `answers`, the returned batch also holds `labels` (-100 everywhere but the answer tokens and the
    closing `<|im_end|>`), so the same function serves SFT and generation.
    """
    if len(visuals) != len(questions):
        raise ValueError(f"{len(visuals)} visual inputs but {len(questions)} questions")
    texts, videos, metas, images = [], [], [], []
    for i, (visual, question) in enumerate(zip(visuals, questions, strict=True)):
        answer = None if answers is None else answers[i]
        msgs = build_messages(visual, question, question_first=question_first)
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if answer is not None:
            text += answer + "<|im_end|>"
        texts.append(text)
        videos.extend(visual.chunks)
        metas.extend(chunk_metadata(visual))
        if visual.image is not None:
            images.append(visual.image)
    kwargs: dict[str, Any] = {}
    if videos:
        kwargs |= {"videos": videos, "video_metadata": metas}
    if images:
        kwargs["images"] = images
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tok.padding_side = side
    if answers is not None:
        batch["labels"] = _answer_labels(batch["input_ids"], batch["attention_mask"], tok, answers)
    return batch


def _answer_labels(input_ids, attention_mask, tokenizer, answers: list[str]) -> torch.Tensor:
    labels = torch.full_like(input_ids, -100)
    for i, answer in enumerate(answers):
        n = len(tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        labels[i, -n:] = input_ids[i, -n:]
    return labels


# ---------------------------------------------------------------------------------------------------------
# Generation backends.


@dataclass
class Generation:
    """One generated answer with the cost the backbone paid for it."""

    text: str
    visual_tokens: int
    prompt_tokens: int
    seconds: float  # wall time of the batch this sample was in, divided by the batch size


@dataclass
class TimedGeneration:
    """A generation with its seconds split into stages (`preprocess`, `prefill`, `generate`)."""

    generation: Generation
    timings: dict[str, float]


class _StepClock(BaseStreamer):
    """Records when generate hands over the prompt and each new token (the first one ends the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


class TransformersBackend:
    """Batched greedy generation with transformers (left padding, one batch per `batch_size` prompts)."""

    name = "transformers"

    def __init__(
        self, model, processor, max_new_tokens: int = 12, batch_size: int = 16, question_first: bool = False
    ):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.question_first = question_first
        tok = processor.tokenizer
        self.visual_ids = {
            tok.convert_tokens_to_ids("<|video_pad|>"),
            tok.convert_tokens_to_ids("<|image_pad|>"),
        }

    @torch.inference_mode()
    def generate_timed(self, visuals: list[VisualInput], questions: list[str]) -> list[TimedGeneration]:
        """Greedy answers, each batch's time split into preprocess / prefill (to the first new token) /
        generate and divided evenly over its samples."""
        out: list[TimedGeneration] = []
        for i in range(0, len(visuals), self.batch_size):
            vis, qs = visuals[i : i + self.batch_size], questions[i : i + self.batch_size]
            t0 = time.perf_counter()
            batch = build_inputs(self.processor, vis, qs, question_first=self.question_first)
            t1 = time.perf_counter()
            clock = _StepClock()
            seq = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                streamer=clock,
            )
            t3 = time.perf_counter()
            t2 = clock.times[1] if len(clock.times) > 1 else t3
            n = len(vis)
            timings = {"preprocess": (t1 - t0) / n, "prefill": (t2 - t1) / n, "generate": (t3 - t2) / n}
            texts = self.processor.tokenizer.batch_decode(
                seq[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            for j, text in enumerate(texts):
                row = ids[j][mask[j]].tolist()
                n_vis = sum(t in self.visual_ids for t in row)
                gen = Generation(text.strip(), n_vis, len(row), (t3 - t0) / n)
                out.append(TimedGeneration(gen, dict(timings)))
        return out

    def generate(self, visuals: list[VisualInput], questions: list[str]) -> list[Generation]:
        return [t.generation for t in self.generate_timed(visuals, questions)]
