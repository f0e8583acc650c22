"""CPU benchmark (not a test): the two real-size frame encoders, random weights, one thread.

Checks the FLOP model's encoder share on real hardware: the Allocator's SmolVLM2 vision tower + connector on
one frame at its native 512 px, against Qwen2.5-VL-7B's vision tower on one 448x448 frame (one image: the
frame duplicated over the 2-frame temporal patch, 1024 patches, 256 tokens). Time does not depend on weight
values, so the towers are built from the published configs (resadapt/arch_configs/) with random weights.
Prints the median of `--runs` timed runs after one warm-up, the time ratio and the dense / total FLOP ratio
`resadapt.cost` counts for the same inputs.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/bench_encoders_cpu.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resadapt import cost  # noqa: E402


def median_seconds(fn, runs: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--qwen-size", type=int, default=448, help="side of the Qwen2.5-VL frame (multiple of 28)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

    smol_cfg = cost.load_arch_config("smolvlm2_256m_video")
    smol = SmolVLMVisionTransformer._from_config(smol_cfg.vision_config).eval()
    connector = SmolVLMConnector(smol_cfg).eval()
    s = smol_cfg.vision_config.image_size
    pixels = torch.randn(1, 3, s, s)

    qwen_cfg = cost.load_arch_config("qwen2_5_vl_7b")
    vision = Qwen2_5_VisionTransformerPretrainedModel._from_config(qwen_cfg.vision_config).eval()
    p, tp, q = qwen_cfg.vision_config.patch_size, qwen_cfg.vision_config.temporal_patch_size, args.qwen_size
    patches = torch.randn((q // p) ** 2, 3 * tp * p * p)
    grid = torch.tensor([[1, q // p, q // p]])

    with torch.inference_mode():
        t_smol, smol_runs = median_seconds(
            lambda: connector(smol(pixel_values=pixels).last_hidden_state), args.runs
        )
        t_qwen, qwen_runs = median_seconds(lambda: vision(patches, grid_thw=grid), args.runs)

    # the FLOPs of the same two forwards (meta device)
    allocator = cost.AllocatorCost(cost.paper_allocator_config())
    f_smol = allocator.encoder_frame
    f_qwen = cost.BackboneCost("qwen2_5_vl_7b").vision_chunk(q, q)
    result = {
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "smolvlm2_512_s": t_smol,
        "smolvlm2_512_runs_s": smol_runs,
        f"qwen2_5_vl_{q}_s": t_qwen,
        f"qwen2_5_vl_{q}_runs_s": qwen_runs,
        "time_ratio_qwen_over_smol": t_qwen / t_smol,
        "dense_flop_ratio": f_qwen.dense / f_smol.dense,
        "total_flop_ratio": f_qwen.total / f_smol.total,
        "smolvlm2_512_gflops": {"dense": f_smol.dense / 1e9, "attention": f_smol.attention / 1e9},
        f"qwen2_5_vl_{q}_gflops": {"dense": f_qwen.dense / 1e9, "attention": f_qwen.attention / 1e9},
        "smolvlm2_gflop_per_s": f_smol.total / t_smol / 1e9,
        "qwen_gflop_per_s": f_qwen.total / t_qwen / 1e9,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
