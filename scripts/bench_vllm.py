"""Agreement and throughput: transformers vs vLLM on the same embedded test samples (not a test).

    OMP_NUM_THREADS=1 python scripts/bench_vllm.py [--per-task 10] [--scales 1.0 0.5] [--out FILE]

Needs the vLLM environment (scripts/vllm_env.sh). For every scale: the same VisualInputs go through
`TransformersBackend` (batched, left-padded, one thread) and `VLLMBackend` (a VLLMServer with one thread,
`batch_size` requests in flight); it reports exact-text agreement, token-accounting equality, samples/s of
each (after a warm-up) and, with --unbatched, transformers one sample at a time (no padding) as a third
reference, which separates padding effects from engine differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from resadapt.backbone import TransformersBackend, VisualInput, load_backbone  # noqa: E402
from resadapt.budget import VisionGeometry, realise  # noqa: E402
from resadapt.config import load_params  # noqa: E402
from resadapt.data.embedded import split_rows  # noqa: E402
from resadapt.data.sample import load_sample  # noqa: E402
from resadapt.vllm_backend import (  # noqa: E402
    VLLMBackend,
    VLLMServer,
    agreement,
    post_json,
    vllm_env_exists,
)

ROOT = Path(__file__).resolve().parents[1]


def load_visuals(params, tasks, per_task, scales, geom):
    """{scale: (visuals, questions, operator token counts)} plus the rows, in table order."""
    table = split_rows(params.data.root, "test", list(tasks), per_task)
    samples = [load_sample(r, params.data.root, params.data.num_frames) for r in table]
    out = {}
    for s in scales:
        vis, qs, toks = [], [], []
        for sample in samples:
            n = 1 if sample.is_image else len(sample.frames)
            r = realise(sample, np.full(n, float(s)), geom)
            vis.append(r.visual)
            qs.append(sample.row["question"])
            toks.append(r.tokens)
        out[s] = (vis, qs, toks)
    return out, table


def mirrored(v: VisualInput) -> VisualInput:
    if v.image is not None:
        return VisualInput(image=np.ascontiguousarray(v.image[:, ::-1]))
    chunks = [np.ascontiguousarray(c[:, :, ::-1]) for c in v.chunks]
    return VisualInput(chunks=chunks, chunk_times=list(v.chunk_times), fps=v.fps)


def timed(backend, visuals, questions):
    t0 = time.perf_counter()
    gens = backend.generate(visuals, questions)
    return gens, time.perf_counter() - t0


def first_token_margins(model, processor, visuals, questions, texts):
    """Per sample, the smallest top-1 minus top-2 logit gap along transformers' own greedy answer
    (single-sample forward, no padding): how close the greedy choice was to flipping."""
    from resadapt.backbone import build_inputs

    tok = processor.tokenizer
    margins = []
    for v, q, t in zip(visuals, questions, texts, strict=True):
        batch = build_inputs(processor, [v], [q], answers=[t])
        with torch.inference_mode():
            logits = model(**{k: x for k, x in batch.items() if k != "labels"}).logits[0]
        n = len(tok(t + "<|im_end|>", add_special_tokens=False)["input_ids"])
        steps = logits[-n - 1 : -1]
        top2 = steps.topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
    return margins


def logprob_gaps(model, processor, backend, visuals, questions):
    """Per sample, the largest |log p(token)| difference between vLLM (its returned logprobs) and a
    single-sample transformers forward teacher-forced on vLLM's answer: the numerical distance of the two
    engines on the tokens actually generated. None where the answer does not re-tokenise to vLLM's ids."""
    from resadapt.backbone import build_inputs

    gaps = []
    for v, q in zip(visuals, questions, strict=True):
        body = backend.body(v, q) | {"logprobs": True, "top_logprobs": 1}
        choice = post_json(backend.server_url + "/v1/chat/completions", body)["choices"][0]
        ids = choice["token_ids"]
        lp_vllm = torch.tensor([c["logprob"] for c in choice["logprobs"]["content"]])
        text = choice["message"]["content"] or ""
        batch = build_inputs(processor, [v], [q], answers=[text])
        n = len(ids)
        answer_ids = processor.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        forced = batch["input_ids"][0, -len(answer_ids) :]
        if forced[:n].tolist() != ids:
            gaps.append(None)
            continue
        with torch.inference_mode():
            logits = model(**{k: x for k, x in batch.items() if k != "labels"}).logits[0].float()
        start = batch["input_ids"].shape[1] - len(forced)
        lp_hf = torch.log_softmax(logits[start - 1 : start - 1 + n], dim=-1)
        lp_hf = lp_hf.gather(1, torch.tensor(ids)[:, None])[:, 0]
        gaps.append(float((lp_hf - lp_vllm).abs().max()))
    return gaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--model", default=str(ROOT / "models" / "backbone"))
    ap.add_argument("--tasks", nargs="+", default=["detail_qa", "multi_frame", "image_qa", "grounding"])
    ap.add_argument("--per-task", type=int, default=10)
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.5])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--venv", default=None)
    ap.add_argument("--run-dir", default=str(ROOT / "outputs" / "vllm" / "bench"))
    ap.add_argument("--unbatched", action="store_true", help="also run transformers with batch size 1")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "vllm" / "bench.json"))
    args = ap.parse_args(argv)
    if not vllm_env_exists(args.venv):
        print("no vLLM environment: run scripts/vllm_env.sh first", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    params = load_params(args.params)
    model, processor = load_backbone(args.model)
    geom = VisionGeometry.from_processor(processor)
    data, table = load_visuals(params, args.tasks, args.per_task, args.scales, geom)
    hf = TransformersBackend(model, processor, args.max_new_tokens, args.batch_size)
    hf1 = TransformersBackend(model, processor, args.max_new_tokens, 1)
    report: dict = {"samples": len(table), "tasks": args.tasks, "batch_size": args.batch_size, "scales": {}}

    with VLLMServer(args.model, args.run_dir, venv=args.venv) as server:
        report["vllm_startup_seconds"] = server.startup_seconds
        report["model_dir_changes"] = server.model_changes
        vb = VLLMBackend(server.url, server.model_name, processor, args.max_new_tokens, args.batch_size)
        # warm-up both engines on mirrored copies (same sizes, other pixels: no prefix-cache hits later)
        warm_v, warm_q, _ = data[args.scales[0]]
        warm = [mirrored(v) for v in warm_v[:4]]
        hf.generate(warm, warm_q[:4])
        vb.generate(warm, warm_q[:4])
        for s in args.scales:
            vis, qs, toks = data[s]
            g_hf, t_hf = timed(hf, vis, qs)
            t0 = time.perf_counter()
            timed_vl = vb.generate_timed(vis, qs)
            t_vl = time.perf_counter() - t0
            g_vl = [t.generation for t in timed_vl]
            row = {
                "transformers_samples_per_s": len(vis) / t_hf,
                "vllm_samples_per_s": len(vis) / t_vl,
                "vllm_over_transformers": t_hf / t_vl,
                "vs_transformers": agreement(g_hf, g_vl),
                "operator_tokens_equal_vllm": sum(
                    g.visual_tokens == t for g, t in zip(g_vl, toks, strict=True)
                )
                / len(toks),
                "mean_visual_tokens": float(np.mean(toks)),
                "vllm_client_encode_share": float(
                    np.mean([t.timings["preprocess"] for t in timed_vl]) * len(vis) / t_vl
                ),
            }
            gaps = [g for g in logprob_gaps(model, processor, vb, vis, qs) if g is not None]
            row["logprob_gap"] = {
                "samples": len(gaps),
                "max": float(np.max(gaps)) if gaps else None,
                "median": float(np.median(gaps)) if gaps else None,
            }
            if args.unbatched:
                g_1, t_1 = timed(hf1, vis, qs)
                row["transformers_unbatched_samples_per_s"] = len(vis) / t_1
                row["vs_transformers_unbatched"] = agreement(g_1, g_vl)
                row["transformers_batched_vs_unbatched"] = agreement(g_1, g_hf)
            bad = sorted(set(row["vs_transformers"]["disagreements"]))
            margins = first_token_margins(model, processor, vis, qs, [g.text for g in g_hf])
            row["min_logit_margin_all"] = {"median": float(np.median(margins)), "min": float(np.min(margins))}
            row["disagreement_details"] = [
                {
                    "id": str(table[i]["id"]),
                    "task": table[i]["task"],
                    "transformers": g_hf[i].text,
                    "vllm": g_vl[i].text,
                    "transformers_min_logit_margin": margins[i],
                }
                for i in bad
            ]
            report["scales"][str(s)] = row
            print(
                f"scale {s}: agreement {row['vs_transformers']['text_agreement']:.3f} "
                f"(n={len(vis)}), visual tokens equal {row['vs_transformers']['visual_tokens_equal']:.3f}, "
                f"prompt tokens equal {row['vs_transformers']['prompt_tokens_equal']:.3f}, "
                f"transformers {row['transformers_samples_per_s']:.2f}/s, vLLM {row['vllm_samples_per_s']:.2f}/s "
                f"(x{row['vllm_over_transformers']:.2f})",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "scales"}, indent=2))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
