"""Time `resadapt allocate` on a 64-frame video with a given Allocator (one thread, median of several runs).

Two numbers: the whole command in-process (load the Allocator and tokenizer, decode, allocate, print), and
`PlugAndPlayAllocator.allocate` alone with the Allocator loaded once (decode + coarse encode + predict +
budget + resize). `--tiny` builds a tiny same-architecture stand-in (Qwen2.5-VL backbone, small Allocator)
in a temporary folder instead of taking `--allocator`: the pipeline's real models are not measured by that.

    python scripts/bench_allocate.py --allocator models/allocator/seed_0 [--backbone DIR] [--video clip.mp4]
    python scripts/bench_allocate.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def synthetic_video(path: Path, frames: int, height: int, width: int, fps: float) -> Path:
    """A lossless MP4 of a square moving over a gradient (what decoding and resizing cost, not content)."""
    from resadapt.data.video import write_video

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 96)], -1)
    video = np.repeat(base.astype(np.uint8)[None], frames, axis=0)
    side = max(4, height // 6)
    for i in range(frames):
        left = (i * (width - side)) // max(1, frames - 1)
        video[i, height // 3 : height // 3 + side, left : left + side] = (255, 0, 0)
    return write_video(path, video, fps, overwrite=True)


def tiny_allocator(folder: Path) -> tuple[Path, Path]:
    """(Allocator folder, backbone folder) of a tiny Qwen2.5-VL stand-in."""
    from resadapt.allocator import Allocator
    from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone, save_backbone

    torch.manual_seed(0)
    spec = TinyBackboneSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vision_hidden_size=32,
                            vision_intermediate_size=64, max_pixels=224 * 224)  # fmt: skip
    model, processor = build_tiny_backbone(spec)
    backbone = save_backbone(model, processor, folder / "backbone")
    alloc = Allocator.from_backbone(model, processor, coarse_size=56, dim=32, depth=1, num_heads=2)
    alloc.save_pretrained(folder / "allocator")
    processor.tokenizer.save_pretrained(folder / "allocator")
    return folder / "allocator", backbone


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: imports, first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocator", help="a trained Allocator folder")
    parser.add_argument("--backbone", default=None, help="a Qwen-VL checkpoint for its pixel limits")
    parser.add_argument("--tiny", action="store_true", help="build a tiny stand-in instead of --allocator")
    parser.add_argument("--video", default=None, help="an MP4 (default: a synthetic 64-frame 360x640 clip)")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--question", default="What digit is on the red card?")
    args = parser.parse_args(argv)
    if args.tiny == bool(args.allocator):
        parser.error("give exactly one of --allocator DIR or --tiny")
    torch.set_num_threads(1)

    from resadapt.cli import main as cli
    from resadapt.plug_and_play import PlugAndPlayAllocator

    with tempfile.TemporaryDirectory(prefix="bench-allocate-") as tmp:
        tmp = Path(tmp)
        allocator, backbone = (args.allocator, args.backbone)
        if args.tiny:
            allocator, backbone = tiny_allocator(tmp)
        video = args.video or synthetic_video(tmp / "clip.mp4", args.frames, 360, 640, 30.0)
        argv_cli = ["allocate", str(video), "--question", args.question, "--allocator", str(allocator)]
        argv_cli += ["--frames", str(args.frames), "--budget", str(args.budget)]
        argv_cli += ["--backbone", str(backbone)] if backbone else []

        def command() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                if cli(argv_cli) != 0:
                    raise SystemExit(f"resadapt allocate failed: {' '.join(argv_cli)}")

        processor = None
        if backbone:
            from resadapt.cli import _backbone_processor

            processor = _backbone_processor(str(backbone))
        pnp = PlugAndPlayAllocator.from_pretrained(allocator, processor=processor)
        last = {}

        def api() -> None:
            last["a"] = pnp.allocate(video, args.question, args.budget, num_frames=args.frames)

        cmd_median, cmd_times = median_seconds(command, args.repeats)
        api_median, api_times = median_seconds(api, args.repeats)
        a = last["a"]
        print(
            f"allocator {'tiny stand-in (Qwen2.5-VL, 56 px coarse)' if args.tiny else allocator}; video {video}"
        )
        print(f"{len(a.frames)} frames of {a.frames.shape[1]}x{a.frames.shape[2]}, budget {args.budget}: "
              f"{a.visual_tokens} of {a.reference_tokens} tokens (retention {a.retention:.4f})")  # fmt: skip
        print(f"resadapt allocate (whole command, one thread): median {cmd_median:.3f} s over {args.repeats} "
              f"runs {[round(t, 3) for t in cmd_times]}")  # fmt: skip
        print(f"PlugAndPlayAllocator.allocate (loaded once): median {api_median:.3f} s "
              f"{[round(t, 3) for t in api_times]}")  # fmt: skip
        print("last run's stages (s): " + ", ".join(f"{k} {v:.4f}" for k, v in a.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
