"""Paper-scale latency benchmark: Allocator time, TTFT and end-to-end time, Vanilla against ResAdapt.

A benchmark, not a test: it times random-weight bf16 Qwen2.5-VL-7B and the paper-profile Allocator (SmolVLM2
encoder, resadapt/allocator.py) built with transformers alone from the published configs in
resadapt/arch_configs/ (nothing is downloaded; time does not depend on weight values). For each frame count
and retention R it feeds the backbone one video item per 2-frame chunk at the size `resadapt.cost.chunk_size`
gives (the 768-token cap of the reference, uniform scale <= R), exactly the shapes the cost model counts.

Per setting: warm-up once, then `--repeats` runs; medians of
- allocator_s: SmolVLM2 tower + connector on F frames at 512 px, the query through SmolLM2, the decoder and
  the Beta means (ResAdapt only; frame decoding and resizing are not timed),
- ttft_s: `generate` until its first new token (vision tower + prefill), from a streamer,
- e2e_s: allocator_s + `generate` of exactly `--gen-tokens` tokens.

    python scripts/bench_paper_scale.py                 # one H200: designed for < 8 minutes (untried)
    python scripts/bench_paper_scale.py --tiny          # tiny configs on CPU (tests/test_cost.py runs it)

`--time-limit` stops starting new settings after that many seconds and still writes what it has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resadapt import cost  # noqa: E402
from resadapt.allocator import Allocator, AllocatorConfig  # noqa: E402


class FirstTokenTimer(BaseStreamer):
    """Records when `generate` emits its first new token (its first `put` is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls, self.first = device, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_configs() -> tuple[transformers.PretrainedConfig, AllocatorConfig]:
    """A tiny Qwen2.5-VL and a tiny SmolVLM-encoder Allocator: the same code paths in a second on CPU."""
    backbone = transformers.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        image_token_id=2000,
        video_token_id=2001,
        vision_start_token_id=2002,
        vision_end_token_id=2003,
    )
    smol = transformers.SmolVLMConfig(
        scale_factor=2,
        text_config={
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
    )
    allocator = AllocatorConfig(
        encoder_type="smolvlm",
        encoder_config=smol.to_dict(),
        coarse_size=None,
        query_source="hidden_states",
        dim=32,
        num_heads=2,
    )
    return backbone, allocator


def build(config, allocator_config, device: torch.device, dtype: torch.dtype):
    """Random-weight backbone and Allocator, created directly on `device` (weights drawn there)."""
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
        allocator = Allocator(allocator_config).to(dtype)
    return model.eval(), allocator.eval()


def backbone_inputs(config, geometry, frames: int, size: tuple[int, int], prompt_tokens: int, device, dtype):
    """input_ids with one video item per chunk (vision_start, pads, vision_end), its patches and grids."""
    p, tp = geometry.patch_size, geometry.temporal_patch_size
    chunks = frames // tp
    gh, gw = size[0] // p, size[1] // p
    per_chunk = (gh // geometry.merge_size) * (gw // geometry.merge_size)
    text = list(range(1000, 1000 + prompt_tokens))
    ids, types = text[: prompt_tokens // 2], [0] * (prompt_tokens // 2)
    for _ in range(chunks):
        ids += (
            [config.vision_start_token_id]
            + [config.video_token_id] * per_chunk
            + [config.vision_end_token_id]
        )
        types += [0] + [2] * per_chunk + [0]
    ids += text[prompt_tokens // 2 :]
    types += [0] * (prompt_tokens - prompt_tokens // 2)
    input_ids = torch.tensor([ids], device=device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": torch.tensor([types], device=device, dtype=torch.int32),
        "pixel_values_videos": torch.randn(chunks * gh * gw, 3 * tp * p * p, device=device, dtype=dtype),
        "video_grid_thw": torch.tensor([[1, gh, gw]] * chunks, device=device),
        "second_per_grid_ts": torch.ones(chunks, device=device),
    }, chunks * per_chunk


@torch.no_grad()
def run_allocator(allocator: Allocator, frames: int, query_tokens: int, device, dtype) -> float:
    """Seconds for the Allocator on `frames` frames at its coarse size (features, query, decoder, means)."""
    s = allocator.config.coarse_size
    pixels = torch.randn(frames, 3, s, s, device=device, dtype=dtype)
    vocab = int(allocator.text_model.config.vocab_size) if allocator.text_model is not None else 100
    ids = torch.randint(0, vocab, (1, query_tokens), device=device)
    _sync(device)
    t0 = time.perf_counter()
    feats = allocator.connector(allocator.vision(pixel_values=pixels).last_hidden_state)
    q, q_mask = allocator.encode_query(ids)
    out = allocator(feats[None].float(), None, q, q_mask)
    allocator.mean_scales(out)
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def run_generate(model, inputs: dict, gen_tokens: int, device) -> tuple[float, float]:
    """(ttft, total) seconds of one greedy `generate` of exactly `gen_tokens` tokens."""
    timer = FirstTokenTimer(device)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(
        **inputs,
        max_new_tokens=gen_tokens,
        min_new_tokens=gen_tokens,
        do_sample=False,
        streamer=timer,
        pad_token_id=0,
    )
    _sync(device)
    total = time.perf_counter() - t0
    return (timer.first or time.perf_counter()) - t0, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (fp32)")
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="default 32 128 (tiny: 4)")
    ap.add_argument("--retention", type=float, nargs="+", default=[1.0, 0.25, 0.1])
    ap.add_argument("--frame-size", default="768x1024", help="HxW of the source frames")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--query-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=None, help="default 64 (tiny: 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3; tiny 1)")
    ap.add_argument("--time-limit", type=float, default=420.0, help="seconds; no new setting after it")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    h, w = (int(v) for v in args.frame_size.lower().split("x"))
    for r in args.retention:
        if not 0 < r <= 1:
            ap.error(f"--retention must be in (0, 1], got {r}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        config, allocator_config = tiny_configs()
        frames, gen, repeats = args.frames or [4], args.gen_tokens or 4, args.repeats or 1
        h, w = (224, 336) if args.frame_size == "768x1024" else (h, w)
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --tiny on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        config, allocator_config = cost.load_arch_config("qwen2_5_vl_7b"), cost.paper_allocator_config()
        frames, gen, repeats = args.frames or [32, 128], args.gen_tokens or 64, args.repeats or 3
    torch.manual_seed(0)
    model, allocator = build(config, allocator_config, device, dtype)
    geometry = cost.backbone_geometry(config)
    print(f"built in {time.perf_counter() - started:.1f} s on {device} ({dtype})", flush=True)
    runs, stopped = [], False
    for f in frames:
        for r in [1.0] + [r for r in args.retention if r < 1.0]:
            if time.perf_counter() - started > args.time_limit:
                stopped = True
                break
            size = cost.chunk_size(geometry, (h, w), r)
            inputs, tokens = backbone_inputs(config, geometry, f, size, args.prompt_tokens, device, dtype)
            method = "vanilla" if r == 1.0 else "resadapt"
            samples = []
            for i in range(repeats + 1):  # the first is the warm-up
                alloc = run_allocator(allocator, f, args.query_tokens, device, dtype) if r < 1.0 else 0.0
                ttft, total = run_generate(model, inputs, gen, device)
                if i:
                    samples.append((alloc, ttft, total))
            alloc, ttft, total = (statistics.median(x) for x in zip(*samples, strict=True))
            row = {
                "method": method,
                "frames": f,
                "retention_target": r,
                "chunk": list(size),
                "visual_tokens": tokens,
                "allocator_s": alloc,
                "ttft_s": ttft,
                "gen_s": total - ttft,
                "e2e_s": alloc + total,
            }
            runs.append(row)
            print(
                f"{method:9} F={f:4d} R={r:5.3f} tokens={tokens:6d} alloc={1e3 * alloc:8.1f} ms "
                f"ttft={1e3 * ttft:8.1f} ms gen={1e3 * (total - ttft):8.1f} ms e2e={1e3 * (alloc + total):8.1f} ms",
                flush=True,
            )
        if stopped:
            break
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"frame_size": [h, w]},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "stopped_by_time_limit": stopped,
        "seconds": time.perf_counter() - started,
        "runs": runs,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"done in {result['seconds']:.1f} s" + (" (stopped by --time-limit)" if stopped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
