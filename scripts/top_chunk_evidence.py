"""How often the trained Allocator's top-ranked chunk holds the evidence (detail-QA test videos).

The hard budget and frame selection keep the top-ranked chunks at full resolution, so this hit rate bounds
their accuracy. Run from the repository root after `dvc repro train`:

    OMP_NUM_THREADS=1 python scripts/top_chunk_evidence.py [params.yaml] [--initial]

`--initial` measures the untrained Allocator instead (`allocator.build_allocator`: the relevance prior
with a zero-initialised head), which shows what training added to the ranking.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from resadapt.allocator import Allocator, build_allocator, query_tokenizer
from resadapt.backbone import load_backbone
from resadapt.baselines import MethodContext
from resadapt.baselines.allocated import deterministic_allocations
from resadapt.budget import VisionGeometry, chunk_scales
from resadapt.config import load_params
from resadapt.data.embedded import split_rows
from resadapt.data.sample import load_sample


def main(params_file: str = "params.yaml", initial: bool = False) -> None:
    torch.set_num_threads(1)
    params = load_params(params_file)
    model, processor = load_backbone(params.backbone.path)
    if initial:
        allocator = build_allocator(params, model)
    else:
        allocator = Allocator.from_pretrained(params.allocator.path)
    geom = VisionGeometry.from_processor(processor)
    tp = geom.temporal_patch_size
    context = MethodContext(
        geom, allocator=allocator, allocator_tokenizer=query_tokenizer(params.allocator, processor)
    )
    rows = split_rows(params.data.root, "test", ["detail_qa"], params.train.test_samples)
    samples = [load_sample(r, params.data.root, params.data.num_frames) for r in rows]
    hits = 0
    for sample, a in zip(samples, deterministic_allocations(context, samples), strict=True):
        # the unclipped scales: clipping at token saturation ties the top chunks
        hits += bool(sample.chunk_evidence(tp)[int(np.argmax(chunk_scales(a.raw, tp)))])
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
