"""Backbone variant 9 (README, Backbone calibration), val only: tie the language model's input at a downscaled
card to what it reads there. Continues a backbone (variant 8b's: its tower reads downscaled glyphs, its language
model answers one digit whenever the evidence is downscaled) with STEPS SFT steps under variant 6's sampler plus
one extra loss, MODE:

- `lm`: the dense token loss (`sft.dense_loss`, a fresh `DenseHead`) on the language model's hidden state after
  LAYER decoder layers at every visual token, so the digit a card token carries must survive into the LM;
- `distill`: each readable card's merged token at its scale is pulled (MSE) onto the same card's token at full
  resolution (the tower's own, without gradient), so a downscaled card looks to the LM like a full one.

    PYTHONPATH=docs/runs python docs/runs/backbone_variant9.py SOURCE OUT MODE [STEPS] [WEIGHT] [LAYER] \\
        [--dense-steps N] [--vision-lr-scale S] [--lr LR] [--threads N]
    python scripts/probe_backbone.py --backbone OUT          # docs/runs/backbone_variant9_val.txt
    python scripts/probe_dense_reading.py --backbone OUT
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import resadapt.sft as sft
from resadapt.backbone import load_backbone, save_backbone
from resadapt.budget import VisionGeometry, resize_video, scaled_size
from resadapt.config import load_params
from resadapt.data.embedded import CELL, load_benchmark


def card_tokens(cards, first_frame: int, size, base: int) -> dict[int, int]:
    """{card index: flat merged-token index} of the cards shown in a chunk, by `sft.chunk_token_labels`'s rule."""
    gh, gw = size[0] // CELL, size[1] // CELL
    out, taken = {}, set()
    for n, card in enumerate(cards):
        if first_frame not in card.frames:
            continue
        i = min(gh - 1, int((card.row + 0.5) * CELL * gh / base))
        j = min(gw - 1, int((card.col + 0.5) * CELL * gw / base))
        if (i, j) not in taken:
            taken.add((i, j))
            out[n] = i * gw + j
    return out


def distill_loss(model, processor, exs, scales, feats: torch.Tensor, tp: int = 2) -> torch.Tensor:
    """MSE of readable downscaled card tokens (rows of `feats`, the video features of this batch's forward)
    to the same cards' tokens at full resolution."""
    geom = VisionGeometry.from_processor(processor)
    student, teacher_chunks, teacher_idx = [], [], []
    offset, t_offset = 0, 0
    for ex, sc in zip(exs, scales, strict=True):
        if ex.is_image:
            continue
        base = ex.frames.shape[1]
        for k, s in enumerate(sc):
            size = scaled_size(base, ex.frames.shape[2], s, geom)
            n_tokens = (size[0] // CELL) * (size[1] // CELL)
            full = (base // CELL, ex.frames.shape[2] // CELL)
            if s < 1.0:
                low = card_tokens(ex.cards, k * tp, size, base)
                high = card_tokens(ex.cards, k * tp, (full[0] * CELL, full[1] * CELL), base)
                pairs = [
                    (offset + low[n], t_offset + high[n])
                    for n in low
                    if n in high and ex.cards[n].digit is not None and ex.cards[n].readable_at(s)
                ]
                if pairs:
                    part = ex.frames[k * tp : (k + 1) * tp]
                    teacher_chunks.append(resize_video(part, np.ones(len(part)), geom).chunks[0])
                    t_offset += full[0] * full[1]
                    student += [a for a, _ in pairs]
                    teacher_idx += [b for _, b in pairs]
            offset += n_tokens
    if offset != feats.shape[0]:
        raise RuntimeError(f"token count {offset} != video features {feats.shape[0]}")
    if not student:
        return feats.sum() * 0.0
    out = processor.video_processor(teacher_chunks)
    with torch.no_grad():
        target = sft.video_features(model, out["pixel_values_videos"], out["video_grid_thw"])[teacher_idx]
    return F.mse_loss(feats[student], target) / target.pow(2).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("mode", choices=["lm", "distill"])
    ap.add_argument("steps", type=int, nargs="?", default=300)
    ap.add_argument("weight", type=float, nargs="?", default=0.5)
    ap.add_argument("layer", type=int, nargs="?", default=1)
    ap.add_argument("--dense-steps", type=int, default=0, help="whole-frame dense steps (one view) first")
    ap.add_argument("--vision-lr-scale", type=float, help="backbone.sft.vision_lr_scale of the SFT steps")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak rate of the SFT steps (backbone.sft.sft_lr)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    mode, steps, weight, layer = args.mode, args.steps, args.weight, args.layer
    torch.set_num_threads(args.threads)
    params = load_params("params.yaml")
    model, processor = load_backbone(args.source)
    update = {"sft_lr": args.lr, "p_uniform": 0.3, "dense_steps": args.dense_steps, "dense_window": None}
    update |= {"dense_views": 1} | ({"vision_lr_scale": args.vision_lr_scale} if args.vision_lr_scale else {})
    schedule = params.backbone.sft.model_copy(update=update)
    rows = list(load_benchmark(params.data.root)["train"])
    stream = sft.split_examples(rows, params.data.root, params.data.num_frames)(
        np.random.default_rng(params.seed), 0.0
    )
    rng = np.random.default_rng(params.seed + 1)
    torch.manual_seed(params.seed)
    head, lm_head = sft.DenseHead(model, processor.tokenizer), sft.DenseHead(model, processor.tokenizer)
    if args.dense_steps:
        t0 = time.time()
        model.train()
        sft.dense_phase(model, head, processor, lambda n: [next(stream) for _ in range(n)], schedule, rng)
        print(f"{args.dense_steps} whole-frame dense steps in {time.time() - t0:.0f} s", flush=True)
    token_ids = {"image": model.config.image_token_id, "video": model.config.video_token_id}
    vision = list(model.model.visual.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    rest += [p for h in (head, lm_head) for n, p in h.named_parameters() if n != "embed.weight"]
    opt = torch.optim.AdamW(
        [{"params": vision, "lr_scale": schedule.vision_lr_scale}, {"params": rest, "lr_scale": 1.0}],
        lr=schedule.sft_lr,
        weight_decay=0.0,
    )
    capture = sft.VisualCapture(model)
    model.train()
    t0 = time.time()
    for step in range(steps):
        frac = step / steps
        for g in opt.param_groups:
            g["lr"] = g["lr_scale"] * schedule.sft_lr * min(1.0, (step + 1) / 20) * (0.05 + 0.95 * (1 - frac))
        exs = [next(stream) for _ in range(schedule.sft_batch)]
        scales = [
            sft.chunk_scales_for(
                e, rng, params.budget.s_min, schedule.p_full, schedule.p_uniform, readable_share=0.75
            )
            for e in exs
        ]
        batch, dense = sft.conversation_inputs(processor, exs, scales)
        capture.take()
        out = model(**batch, output_hidden_states=mode == "lm")
        loss, stats = out.loss, {"lm_loss": round(out.loss.item(), 4)}
        order = [k for k in ("image", "video") if k in dense]
        for kind, f in zip(order, capture.take(), strict=True):
            dl, acc = sft.dense_loss(head, f, *dense[kind])
            loss = loss + schedule.dense_weight * dl
            stats[f"{kind}_tower_acc"] = round(acc, 3)
            if mode == "lm":
                h = out.hidden_states[layer][batch["input_ids"] == token_ids[kind]]
                hl, hacc = sft.dense_loss(lm_head, h, *dense[kind])
                loss = loss + weight * hl
                stats[f"{kind}_lm_acc"] = round(hacc, 3)
            elif kind == "video":
                dl = distill_loss(model, processor, exs, scales, f)
                loss = loss + weight * dl
                stats["distill"] = round(dl.item(), 4)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], schedule.clip)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(step, round(time.time() - t0), stats, flush=True)
    capture.close()
    model.eval()
    save_backbone(model, processor, args.out)
    print(f"{steps} steps ({mode}, weight {weight}) in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
