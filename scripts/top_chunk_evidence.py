"""How often the trained Allocator's top-ranked chunk holds the evidence (detail-QA test videos).

The hard budget and frame selection keep the top-ranked chunks at full resolution, so this hit rate bounds
their accuracy. Run from the repository root after `dvc repro train`:

    OMP_NUM_THREADS=1 python scripts/top_chunk_evidence.py [params.yaml] [--initial]

`--initial` measures the untrained Allocator instead (`rl_stages.build_allocator`: the relevance prior with
a zero-initialised head), which shows what training added to the ranking.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from resadapt import rl_stages
from resadapt.allocator import Allocator, chunk_scales
from resadapt.backbone import load_backbone
from resadapt.calibration import chunk_evidence
from resadapt.config import load_params


def main(params_file: str = "params.yaml", initial: bool = False) -> None:
    torch.set_num_threads(1)
    params = load_params(params_file)
    model, processor = load_backbone(params.backbone.path)
    if initial:
        allocator = rl_stages.build_allocator(params, model)
    else:
        allocator = Allocator.from_pretrained(params.allocator.path)
    tp = params.budget.temporal_patch_size
    with tempfile.TemporaryDirectory() as out:
        trainer = rl_stages.make_trainer(params, params.train, model, processor, out, allocator=allocator)
        rows = rl_stages.rows(params, "test", ["detail_qa"], limit=params.train.test_samples)
        scales = rl_stages._unclipped_allocations(trainer, rows)
        hits = 0
        for row, s in zip(rows, scales, strict=True):
            evidence = chunk_evidence(trainer._prompt(row, keep_frames=True).sample, tp)
            hits += bool(evidence[int(np.argmax(chunk_scales(s, tp)))])
    which = "untrained" if initial else "trained"
    print(
        f"{which} Allocator: top-ranked chunk holds the evidence in {hits} of {len(rows)} detail-QA test "
        f"videos ({hits / len(rows):.0%})"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", nargs="?", default="params.yaml")
    ap.add_argument("--initial", action="store_true", help="the untrained Allocator (relevance prior only)")
    args = ap.parse_args()
    main(args.params, args.initial)
