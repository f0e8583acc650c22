"""Command line.

- `resadapt validate [params.yaml]` checks a params file and prints its resolved values.
- `resadapt dry-run [params.yaml] [--overrides params-paper.yaml]` checks a profile: checkpoints, model
  classes (built on the meta device, no weights), the Allocator's encoder and every benchmark's files.
- `resadapt merge-params BASE OVERRIDES OUT [--force]` writes a profile's params (deep merge, as the smoke
  run does with params-smoke.yaml).
- `resadapt train [params.yaml]` trains the Allocator with CAPO as the `train` stage configures it, without
  the notebook; run it under `accelerate launch --num_processes K [--cpu]` to use K processes.
- `resadapt allocate VIDEO --question Q --allocator DIR [--budget R]` prints a trained Allocator's per-frame
  scales, tokens and retention for any video (table, `--json`, `--plot PNG`); docs/plug_and_play.md.
- `resadapt answer VIDEO --question Q --backbone DIR --allocator DIR [--budget R]` answers with the allocated
  input on transformers or a vLLM server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resadapt.config import (
    OBJECTIVES,
    ConfigError,
    load_params,
    merge_params_files,
    merged_params_data,
    parse_params,
)


def _train(args) -> int:
    import torch

    from resadapt.backbone import load_backbone
    from resadapt.stages import train

    params = load_params(args.params)
    model, processor = load_backbone(params.backbone.path)
    trainer = train.run(
        params, params.train, model, processor, params.train.checkpoints, args.objective, args.max_steps
    )
    if trainer.accelerator.is_main_process:
        path = params.allocator.seed_path(params.seed)
        trainer.save_allocator(path)
        print(f"allocator saved to {path}", flush=True)
    if args.rank_report:
        out = Path(args.rank_report)
        out.mkdir(parents=True, exist_ok=True)
        rank = trainer.accelerator.process_index
        weights = {k: v.detach().cpu() for k, v in trainer.allocator.state_dict().items()}
        torch.save({"prompts": trainer.seen_prompts, "weights": weights}, out / f"rank{rank}.pt")
    return 0


def _dry_run(args) -> int:
    from resadapt.dry_run import dry_run

    if args.overrides:
        source = f"{args.params} + {args.overrides}"
        params = parse_params(merged_params_data(args.params, args.overrides), source)
    else:
        source, params = args.params, load_params(args.params, require_paths=False)
    for line in dry_run(params, source):
        print(line)
    print("dry run passed")
    return 0


def _cost(args) -> int:
    """`resadapt cost` (issue 17): the latency table's TFLOPs columns; bad values exit 2 with the reason."""
    import json

    from resadapt import cost

    try:
        h, w = (int(v) for v in args.frame_size.lower().split("x"))
    except ValueError:
        print(f"--frame-size must be HxW (e.g. 768x1024), got {args.frame_size!r}", file=sys.stderr)
        return 2
    try:
        backbone = cost.BackboneCost(args.backbone)
        allocator = cost.AllocatorCost(cost.paper_allocator_config())
        rows = cost.cost_table(
            backbone, args.frames, args.retention, allocator, (h, w),
            args.prompt_tokens, args.query_tokens, args.gen_tokens,
        )  # fmt: skip
    except ValueError as err:
        print(f"resadapt cost: {err}", file=sys.stderr)
        return 2
    print(cost.format_table(rows, args.backbone))
    if args.memory:
        print(cost.format_memory(cost.training_memory(
            backbone, allocator, max(args.frames), args.gpus, args.rows_per_gpu, frame_size=(h, w),
        )))  # fmt: skip
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("command", "json")}
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cost.table_metrics(rows, settings), indent=2) + "\n")
        print(f"wrote {out}")
    return 0


# --- plug and play (issue 16; resadapt/plug_and_play.py) ---
_PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class _BadInput(ValueError):
    """A command-line value that is wrong before anything is loaded."""


def _video_options(args) -> dict:
    """Checked --question / --budget / --frames / --fps / output paths (strings, so one line per error)."""
    if not args.question.strip():
        raise _BadInput("--question is empty")
    out: dict = {"budget": None, "num_frames": None, "fps": None}
    if args.budget is not None:
        try:
            out["budget"] = float(args.budget)
        except ValueError:
            raise _BadInput(f"--budget must be a retention in (0, 1], got {args.budget!r}") from None
        if not 0.0 < out["budget"] <= 1.0:
            raise _BadInput(f"--budget must be a retention in (0, 1], got {args.budget!r}")
    if args.frames is not None and args.fps is not None:
        raise _BadInput("give either --frames or --fps, not both")
    if args.frames is not None:
        if not args.frames.isdigit() or int(args.frames) < 1:
            raise _BadInput(f"--frames must be a positive integer, got {args.frames!r}")
        out["num_frames"] = int(args.frames)
    if args.fps is not None:
        try:
            out["fps"] = float(args.fps)
        except ValueError:
            out["fps"] = float("nan")
        if not out["fps"] > 0 or out["fps"] == float("inf"):
            raise _BadInput(f"--fps must be a positive number, got {args.fps!r}")
    json_out = getattr(args, "json", None)
    if json_out not in (None, "-") and Path(json_out).is_dir():
        raise _BadInput(f"--json {json_out} is a folder, not a file")
    plot = getattr(args, "plot", None)
    if plot is not None:
        if Path(plot).suffix.lower() not in _PLOT_SUFFIXES:
            raise _BadInput(f"--plot {plot} must end in one of {', '.join(_PLOT_SUFFIXES)}")
        if Path(plot).is_dir():
            raise _BadInput(f"--plot {plot} is a folder, not a file")
    from resadapt.data.video import probe_video

    probe_video(args.video)  # a missing or unreadable video is named before any model loads
    return out


def _write_json(target: str, data: dict) -> None:
    """Print JSON (target '-') or write it atomically."""
    import json
    import os

    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        print(text, end="")
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fail(command: str, err: BaseException) -> int:
    """One line on stderr naming what was wrong, exit status 2."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    print(f"resadapt {command}: {lines[0]}", file=sys.stderr)
    return 2


def _plug_and_play_errors():
    from transformers.utils import logging as hf_logging

    from resadapt.vllm_backend import VLLMServerError

    hf_logging.disable_progress_bar()  # stderr holds the error line alone
    return (ValueError, OSError, VLLMServerError)


def _backbone_processor(path: str):
    """The processor of a Qwen-VL checkpoint folder (checked to be one), without loading its weights."""
    from resadapt.backbone import ARCHITECTURES, architecture_of, backbone_checkpoint
    from resadapt.processing import load_processor

    folder = backbone_checkpoint(path)
    return load_processor(folder, processor_class=ARCHITECTURES[architecture_of(folder)][2])


def _allocate(args) -> int:
    """`resadapt allocate`: the allocation of one video for one question, as a table, JSON or a figure."""
    errors = _plug_and_play_errors()
    try:
        opts = _video_options(args)
        from resadapt import plug_and_play as pnp

        processor = _backbone_processor(args.backbone) if args.backbone else None
        allocator = pnp.PlugAndPlayAllocator.from_pretrained(args.allocator, processor=processor)
        allocation = allocator.allocate(args.video, args.question, **opts)
    except errors as err:
        return _fail("allocate", err)
    if args.json == "-":
        _write_json("-", allocation.summary())
    else:
        print(pnp.allocation_table(allocation))
        if allocator.geometry_source == "default":
            print("(default geometry; pass --backbone DIR for your model's pixel limits)")
    if args.json not in (None, "-"):
        _write_json(args.json, allocation.summary())
    if args.plot:
        pnp.plot_allocation(allocation, args.plot)
    return 0


def _answer(args) -> int:
    """`resadapt answer`: allocate, then generate on transformers or a vLLM server; answer, tokens, time."""
    errors = _plug_and_play_errors()
    try:
        opts = _video_options(args)
        if args.max_new_tokens < 1:
            raise _BadInput(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        from resadapt import plug_and_play as pnp
        from resadapt.backbone import TransformersBackend, backbone_checkpoint, load_backbone
        from resadapt.vllm_backend import VLLMBackend, VLLMServer, vllm_env_exists, vllm_venv

        if args.backend == "vllm" and not vllm_env_exists(args.vllm_venv):
            raise _BadInput(
                f"--backend vllm: no vLLM environment at {vllm_venv(args.vllm_venv)} (create it with "
                "scripts/vllm_env.sh or `nox -s vllm_env`, or set RESADAPT_VLLM_VENV / --vllm-venv)"
            )
        processor = _backbone_processor(args.backbone)
        allocator = pnp.PlugAndPlayAllocator.from_pretrained(args.allocator, processor=processor)
        allocation = allocator.allocate(args.video, args.question, **opts)
        if args.backend == "transformers":
            model, processor = load_backbone(args.backbone)
            backend = TransformersBackend(model, processor, args.max_new_tokens, batch_size=1)
            result = pnp.answer(allocation, backend)
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="resadapt-vllm-") as run_dir:
                with VLLMServer(backbone_checkpoint(args.backbone), run_dir, venv=args.vllm_venv) as server:
                    backend = VLLMBackend(server.url, server.model_name, processor, args.max_new_tokens, 1)
                    result = pnp.answer(allocation, backend)
    except errors as err:
        return _fail("answer", err)
    gen = result.generation
    seconds = allocation.timings | result.timings
    print(f"answer: {gen.text}")
    budget = "" if allocation.budget is None else f" at budget {allocation.budget:g}"
    print(
        f"visual tokens fed: {gen.visual_tokens} of {allocation.reference_tokens} unmodified (retention "
        f"{allocation.retention:.4f}, {allocation.method}{budget}); prompt tokens {gen.prompt_tokens}; "
        f"{len(allocation.frames)} frames in {len(allocation.visual.chunks)} chunks; backend {args.backend}"
    )
    print(
        "seconds: "
        + ", ".join(f"{k} {v:.4f}" for k, v in seconds.items())
        + f"; total {sum(seconds.values()):.4f}"
    )
    return 0


def _add_video_arguments(parser) -> None:
    parser.add_argument("video", help="an MP4 (or any video PyAV reads)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--allocator", required=True, help="a trained Allocator folder")
    parser.add_argument("--budget", default=None, help="target retention in (0, 1] (hard budget)")
    parser.add_argument("--frames", default=None, help="frames sampled uniformly (default 32)")
    parser.add_argument("--fps", default=None, help="or frames per second of video sampled")


# --- end plug and play ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resadapt")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="validate a params file and print its resolved values")
    validate.add_argument("params", nargs="?", default="params.yaml")
    train = sub.add_parser(
        "train", help="train the Allocator with CAPO (the train stage, without the notebook)"
    )
    train.add_argument("params", nargs="?", default="params.yaml")
    train.add_argument("--objective", choices=OBJECTIVES, default=None, help="default: train.objective")
    train.add_argument("--max-steps", type=int, default=None, help="default: train.max_steps")
    train.add_argument("--rank-report", default=None, help="folder for a per-process report (tests)")
    dry = sub.add_parser("dry-run", help="check a profile's paths, model classes and benchmarks (no weights)")
    dry.add_argument("params", nargs="?", default="params.yaml")
    dry.add_argument(
        "--overrides", default=None, help="an override file merged over params (params-paper.yaml)"
    )
    merge = sub.add_parser("merge-params", help="write BASE deep-merged with OVERRIDES to OUT")
    merge.add_argument("base")
    merge.add_argument("overrides")
    merge.add_argument("out")
    merge.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    # --- cost (issue 17; resadapt/cost.py) ---
    cost = sub.add_parser(
        "cost", help="FLOPs of Vanilla and ResAdapt with the real architectures (meta device)"
    )
    cost.add_argument("--backbone", default="qwen2_5_vl_7b", help="qwen2_5_vl_7b | qwen3_vl_8b")
    cost.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    cost.add_argument("--retention", type=float, nargs="+", default=[1.0, 0.25, 0.1])
    cost.add_argument("--frame-size", default="768x1024", help="HxW of the source frames")
    cost.add_argument("--prompt-tokens", type=int, default=64, help="text tokens of the backbone prompt")
    cost.add_argument("--query-tokens", type=int, default=64, help="question tokens the Allocator reads")
    cost.add_argument("--gen-tokens", type=int, default=0, help="decode steps added to Inference")
    cost.add_argument(
        "--json", nargs="?", const="metrics/cost.json", default=None, help="write a metrics file"
    )
    cost.add_argument(
        "--memory", action="store_true", help="also print training memory per GPU (at the largest --frames)"
    )
    cost.add_argument("--gpus", type=int, default=8, help="--memory: GPUs sharing the FSDP shards")
    cost.add_argument("--rows-per-gpu", type=int, default=4, help="--memory: sequences per GPU micro-batch")
    # --- end cost ---
    # --- plug and play (issue 16) ---
    allocate = sub.add_parser("allocate", help="a trained Allocator's per-frame scales, tokens and retention")
    _add_video_arguments(allocate)
    allocate.add_argument("--backbone", default=None, help="a Qwen-VL checkpoint whose pixel limits to use")
    allocate.add_argument("--json", nargs="?", const="-", default=None, help="JSON to stdout, or to a file")
    allocate.add_argument("--plot", default=None, help="draw the allocation over the frames (PNG, PDF, SVG)")
    answer = sub.add_parser("answer", help="answer a question about a video with the allocated input")
    _add_video_arguments(answer)
    answer.add_argument("--backbone", required=True, help="a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint")
    answer.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    answer.add_argument("--max-new-tokens", type=int, default=32)
    answer.add_argument("--vllm-venv", default=None, help="the vLLM environment (default .venvs/vllm)")
    # --- end plug and play ---
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print(load_params(args.params).model_dump_json(indent=2))
            return 0
        if args.command == "dry-run":
            return _dry_run(args)
        if args.command == "merge-params":
            print(merge_params_files(args.base, args.overrides, args.out, force=args.force))
            return 0
        if args.command == "cost":
            return _cost(args)
        if args.command == "allocate":
            return _allocate(args)
        if args.command == "answer":
            return _answer(args)
        return _train(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
