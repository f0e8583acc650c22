"""Shared test settings and the tiny models and data several test files use, built once per session."""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# a backbone small enough to build, run and save in about a second
SMALL_BACKBONE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
)
# the tiny benchmark: 112-px frames (4x4 tokens), 8-frame videos, a handful of rows per task and split
BENCH_FRAME_SIZE, BENCH_FRAMES = 112, 8
BENCH_SIZES = {
    "train": dict(card_videos=6, compare_videos=2, grounding_videos=1, images=2, long_videos=1),
    "val": dict(card_videos=2, compare_videos=1, grounding_videos=1, images=1, long_videos=1),
    "test": dict(card_videos=2, compare_videos=1, grounding_videos=1, images=1, long_videos=1),
}


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """Root of a tiny embedded benchmark (MP4/PNG + tables), written once."""
    from resadapt.data.embedded import BenchmarkSpec, write_benchmark

    root = tmp_path_factory.mktemp("bench")
    spec = BenchmarkSpec(frame_size=BENCH_FRAME_SIZE, num_frames=BENCH_FRAMES)
    write_benchmark(root, spec, BENCH_SIZES, seed=0, progress=False, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A saved tiny Qwen2.5-VL (SMALL_BACKBONE, pixels capped at the benchmark's 112 x 112), built once."""
    from resadapt.backbone import TinyBackboneSpec, build_tiny_backbone, save_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, processor = build_tiny_backbone(TinyBackboneSpec(**SMALL_BACKBONE, max_pixels=112 * 112))
    return save_backbone(model, processor, tmp_path_factory.mktemp("backbone"))


@pytest.fixture
def tiny_backbone(tiny_backbone_dir):
    """(model, processor): a fresh copy of the session's tiny backbone (tests may train it)."""
    from resadapt.backbone import load_backbone

    return load_backbone(tiny_backbone_dir)


def log_row(grid, task, frames, method, budget, sid, score, retention, reference_tokens=512, **extra) -> dict:
    """One line of the evaluator's per-sample log (`resadapt.evaluate.ResultsLog`), for tests of the tables,
    checks, reports and lmms-eval files built from it; every timing 10 ms unless `seconds` overrides some."""
    from resadapt.evaluate import TIMING_KEYS

    seconds = dict.fromkeys(TIMING_KEYS, 0.01) | extra.pop("seconds", {})
    return {
        "grid": grid,
        "task": task,
        "frames": frames,
        "method": method,
        "budget": budget,
        "id": sid,
        "kind": task,
        "question": "q?",
        "prediction": "7",
        "answer": "7",
        "score": score,
        "visual_tokens": retention * reference_tokens,
        "reference_tokens": reference_tokens,
        "retention": retention,
        "decode_seconds": 0.05,
        "seconds": seconds,
        "end_to_end_seconds": sum(seconds.values()),
    } | extra


def tiny_params(out: Path, bench: Path, backbone: Path, **train) -> dict:
    """params.yaml (as a mapping) shrunk to the tiny benchmark and backbone: a small Allocator saved under
    `out/allocator`, two seeds, two steps, checkpoints under `out`; `train` overrides train keys."""
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    data["data"].update(root=str(bench), frame_size=BENCH_FRAME_SIZE, num_frames=BENCH_FRAMES)
    data["budget"]["max_pixels"] = BENCH_FRAME_SIZE**2
    data["backbone"]["path"] = str(backbone)
    data["allocator"].update(coarse_size=56, dim=32, depth=1, num_heads=2, path=str(out / "allocator"))
    data["train"].update(
        dict(
            tasks=["detail_qa"],
            seeds=[0, 1],
            workers=2,
            max_steps=2,
            prompts_per_step=1,
            allocations_per_prompt=2,
            rollouts_per_allocation=1,
            eval_steps=2,
            save_steps=2,
            val_samples=2,
            test_samples=2,
            checkpoints=str(out / "checkpoints"),
        )
        | train
    )
    return data
