"""Command line.

- `resadapt validate [params.yaml]` checks a params file and prints its resolved values.
- `resadapt dry-run [params.yaml] [--overrides params-paper.yaml]` checks a profile: checkpoints, model
  classes (built on the meta device, no weights), the Allocator's encoder and every benchmark's files.
- `resadapt merge-params BASE OVERRIDES OUT [--force]` writes a profile's params (deep merge, as the smoke
  run does with params-smoke.yaml).
- `resadapt train [params.yaml]` trains the Allocator with CAPO as the `train` stage configures it, without
  the notebook; run it under `accelerate launch --num_processes K [--cpu]` to use K processes.
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
        trainer.save_allocator(params.allocator.path)
        print(f"allocator saved to {params.allocator.path}", flush=True)
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
    cost.add_argument("--memory", action="store_true", help="also print training memory per GPU")
    cost.add_argument("--gpus", type=int, default=8, help="--memory: GPUs sharing the FSDP shards")
    cost.add_argument("--rows-per-gpu", type=int, default=4, help="--memory: sequences per GPU micro-batch")
    # --- end cost ---
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
        return _train(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
