"""Qwen-VL tokenizer and processors that build and load fully offline, without torchvision.

transformers' stock Qwen video processor imports torchvision, and no CPU build of torchvision exists for
these machines (see shared/NOTES.md). This module supplies a numpy/PIL video processor with the same
resize rule (`smart_resize`), normalisation and patch layout, a byte-level BPE tokenizer trained on a
fixed corpus (so its ids never depend on the machine), and `load_processor`, which rebuilds a saved
processor from its pieces because `AutoProcessor.from_pretrained` insists on torchvision.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

# Qwen2.5-VL special tokens, in Qwen's order, so they get the first ids of every tokenizer we build.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer pattern: digits are split one by one, which keeps every number made of digit tokens.
QWEN_PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_CORPUS_WORDS = (
    "the a an of on in at to is are was what which who when where how many much card cards digit digits number "
    "colour color red green blue yellow orange purple white black pink cyan brown grey gray left right top bottom "
    "video image frame frames second seconds time start end between first last larger smaller same more less "
    "appear appears visible shown shows show answer question with and or not yes no none option options choose "
    "count counting compare comparison sum total higher lower greater than equal which one letter long short "
    "system user assistant you helpful please look carefully find read the small detail in it this that there "
    "from during until after before s seconds sec t"
).split()


def _tokenizer_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """A fixed synthetic corpus: words, numbers with decimals, punctuation, and chat-template text."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choice(_CORPUS_WORDS, size=int(rng.integers(3, 12)))
        parts = []
        for w in words:
            r = rng.random()
            if r < 0.15:
                parts.append(f"{rng.integers(0, 100)}.{rng.integers(0, 10)}")
            elif r < 0.25:
                parts.append(f"({chr(65 + int(rng.integers(0, 6)))})")
            else:
                parts.append(str(w))
        lines.append(" ".join(parts) + str(rng.choice(["?", ".", ":", "", " -", ","])))
    lines += ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"] * 50
    return lines


def build_tokenizer(vocab_size: int = 768, seed: int = 0):
    """Train a Qwen-style byte-level BPE tokenizer offline; special token ids are 0..13."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen2_5_vl_chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=32768,
        padding_side="left",
    )
    fast.chat_template = qwen2_5_vl_chat_template
    return fast


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
):
    """Qwen's rounding rule: both sides multiples of `factor`, area clamped into [min_pixels, max_pixels]."""
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize needs a positive size, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of (T, H, W, 3) uint8 frames with PIL, as Qwen's PIL image processor does."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in frames]
    )


class QwenVideoProcessor(VideoProcessorMixin):
    """Numpy/PIL twin of `Qwen2VLVideoProcessor` (same resize, normalisation and patch order).

    Videos come in already decoded and sampled, as (T, H, W, 3) uint8 arrays with `VideoMetadata`
    (fps and frame indices), the form both transformers and vLLM accept.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        min_pixels: int = 28 * 28,
        max_pixels: int = 28 * 28 * 768,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("processor_class", None)
        kwargs.pop("video_processor_type", None)
        super().__init__(**{k: v for k, v in kwargs.items() if k in ("return_metadata",)})
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )

    def patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(T, H, W, 3) float frames -> flat patches in Qwen's order, padding odd T with the last frame."""
        if pad := -frames.shape[0] % self.temporal_patch_size:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        t, h, w, c = frames.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = t // tp, h // p, w // p
        x = frames.transpose(0, 3, 1, 2)  # T, C, H, W
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    def preprocess(self, videos, video_metadata=None, return_tensors=None, return_metadata=False, **kwargs):
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        videos = [np.asarray(v) for v in videos]
        if video_metadata is None:
            video_metadata = [None] * len(videos)
        elif isinstance(video_metadata, (dict, VideoMetadata)):
            video_metadata = [video_metadata]
        if len(video_metadata) != len(videos):
            raise ValueError(f"got {len(videos)} videos but {len(video_metadata)} metadata entries")
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        all_patches, grids, metas = [], [], []
        for video, meta in zip(videos, video_metadata, strict=True):
            if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
                raise ValueError(
                    f"a video must be a (T, H, W, 3) uint8 array, got {video.shape} {video.dtype}"
                )
            h, w = self.target_size(video.shape[1], video.shape[2])
            x = _resize_frames(video, h, w).astype(np.float32) / 255.0
            x = (x - mean) / std
            patches, grid = self.patchify(x)
            all_patches.append(patches)
            grids.append(grid)
            if meta is None:
                meta = VideoMetadata(
                    total_num_frames=len(video), fps=2.0, frames_indices=list(range(len(video)))
                )
            elif isinstance(meta, dict):
                meta = VideoMetadata(**meta)
            metas.append(meta)
        data = {
            "pixel_values_videos": torch.from_numpy(np.concatenate(all_patches)),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        }
        if return_metadata:
            data["video_metadata"] = metas
        return BatchFeature(data=data)

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        h, w = self.target_size(height, width)
        grid_t = math.ceil(num_frames / self.temporal_patch_size)
        return grid_t * (h // self.patch_size) * (w // self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "video_processor_type": type(self).__name__,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }

    def save_pretrained(self, save_directory, **kwargs):
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "video_preprocessor_config.json").write_text(json.dumps(self.to_dict(), indent=2))
        return [str(path / "video_preprocessor_config.json")]

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        file = Path(path) / "video_preprocessor_config.json"
        if not file.exists():
            raise FileNotFoundError(f"no video processor config at {file}")
        return cls(**{**json.loads(file.read_text()), **kwargs})


def _register_video_processor() -> None:
    # ProcessorMixin looks the video processor's base class up on the transformers module; without
    # torchvision it is not exported there (NOTES: '_extra_content' error).
    from transformers import processing_utils

    module = processing_utils.transformers_module
    if "VideoProcessorMixin" not in vars(module):
        module.VideoProcessorMixin = VideoProcessorMixin


def build_processor(
    tokenizer,
    min_pixels: int = 28 * 28,
    max_pixels: int = 28 * 28 * 768,
    image_max_pixels: int | None = None,
    processor_cls: type | None = None,
    patch_size: int = 14,
):
    """Assemble a Qwen-VL processor from a tokenizer and the torchvision-free image/video processors."""
    _register_video_processor()
    processor_cls = processor_cls or transformers.Qwen2_5_VLProcessor
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=image_max_pixels or max_pixels, patch_size=patch_size
    )
    video_processor = QwenVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")


def save_processor(processor, path: str | Path) -> None:
    """Save tokenizer, image and video processor configs, plus which processor class to rebuild."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    processor.video_processor.save_pretrained(path)
    (path / "resadapt_processor.json").write_text(json.dumps({"processor_class": type(processor).__name__}))


def load_processor(path: str | Path, processor_class: str | None = None):
    """Rebuild a Qwen-VL processor from a checkpoint folder without `AutoProcessor` (which needs torchvision).

    Works for folders written by `save_processor` and for official Qwen checkpoints
    (tokenizer files + preprocessor_config.json).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"processor folder {path} does not exist")
    marker = path / "resadapt_processor.json"
    if processor_class is None and marker.exists():
        processor_class = json.loads(marker.read_text())["processor_class"]
    if processor_class is None:
        cfg_file = path / "preprocessor_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        processor_class = cfg.get("processor_class", "Qwen2_5_VLProcessor")
    if processor_class not in PROCESSOR_CLASSES:
        raise ValueError(
            f"{path}: processor class {processor_class!r} is not one of {sorted(PROCESSOR_CLASSES)}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_cfg = json.loads((path / "preprocessor_config.json").read_text())
    size = image_cfg.get("size") or {}
    min_pixels = image_cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    max_pixels = image_cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    video_file = path / "video_preprocessor_config.json"
    video_cfg = json.loads(video_file.read_text()) if video_file.exists() else {}
    vsize = video_cfg.get("size") or {}
    v_min = video_cfg.get("min_pixels") or vsize.get("shortest_edge") or min_pixels
    v_max = video_cfg.get("max_pixels") or vsize.get("longest_edge") or max_pixels
    if tokenizer.chat_template is None:
        tmpl = path / "chat_template.jinja"
        if tmpl.exists():
            tokenizer.chat_template = tmpl.read_text()
    processor = build_processor(
        tokenizer,
        patch_size=image_cfg.get("patch_size", 14),
        min_pixels=v_min,
        max_pixels=v_max,
        image_max_pixels=max_pixels,
        processor_cls=getattr(transformers, processor_class),
    )
    processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor
