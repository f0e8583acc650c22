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
        return _train(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
