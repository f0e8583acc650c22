"""ResAdapt: adaptive per-frame resolution in front of an unchanged Qwen-VL backbone.

The plug-and-play API is exported lazily (`resadapt.PlugAndPlayAllocator`), so `import resadapt.config`
and the stage modules stay free of torch and transformers until the API is used. The lookup goes through
`importlib` by name: nothing here runs at import time, so no stage's import closure grows.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PlugAndPlayAllocator": "resadapt.plug_and_play",
    "VideoAllocation": "resadapt.plug_and_play",
    "load_allocator": "resadapt.plug_and_play",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resadapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
