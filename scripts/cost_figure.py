"""Draw plots/cost/cost_vs_frames.png (not figures/: that folder is the figures stage's DVC output, deleted when it
runs): total dense TFLOPs against frames, Vanilla and ResAdapt at several R.

    python scripts/cost_figure.py [--backbone qwen2_5_vl_7b] [--out plots/cost/cost_vs_frames.png]

FLOPs come from `resadapt.cost` (published configs, meta device, FlopCounterMode; docs/paper_scale.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resadapt import cost  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="qwen2_5_vl_7b", choices=cost.BACKBONES)
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--retention", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--out", default="plots/cost/cost_vs_frames.png")
    args = ap.parse_args(argv)
    rows = cost.cost_table(args.backbone, args.frames, args.retention)
    print(cost.format_table(rows, args.backbone))
    fig = cost.plot_cost(rows, title=f"{args.backbone}: cost against frames (dotted: Allocator)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
