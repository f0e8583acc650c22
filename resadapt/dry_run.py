"""Dry run of a profile: check everything its stages will open, without loading model weights.

The paper profile points at a 7B checkpoint, a SmolVLM2 encoder and ten benchmark folders that only exist on
the machines that run it. A mistake there (a path, a split, a model class, a missing video) should fail in
seconds, not after an hour of loading. Each check reads configs, tokenizers and annotation files, builds the
model classes on PyTorch's `meta` device (shapes only, no memory, no weights) and lists the weight files the
checkpoint index promises; every problem found is reported together, each naming its key or file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from resadapt.config import ConfigError, Params


def _meta_parameters(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def _weight_files(folder: Path) -> str:
    """The checkpoint's safetensors files, checked against its index (each shard it names must exist)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return f"{len(shards)} safetensors shards"
    if (folder / "model.safetensors").exists():
        return "model.safetensors"
    raise FileNotFoundError(f"{folder} holds no model.safetensors or model.safetensors.index.json")


def check_backbone(params: Params) -> str:
    import transformers

    from resadapt.backbone import ARCHITECTURES, architecture_of
    from resadapt.processing import load_processor

    if params.backbone.source == "tiny":
        return "tiny: built and trained by the backbone stage"
    path = Path(params.backbone.checkpoint)
    arch = architecture_of(path)
    cls = getattr(transformers, ARCHITECTURES[arch][1])
    config = transformers.AutoConfig.from_pretrained(path)
    n = _meta_parameters(lambda: cls._from_config(config))
    processor = load_processor(path, processor_class=ARCHITECTURES[arch][2])
    return (
        f"{path}: {arch} -> {cls.__name__}, {n / 1e9:.2f} B parameters, {_weight_files(path)}, "
        f"processor {type(processor).__name__}"
    )


def check_allocator(params: Params) -> str:
    import transformers

    from resadapt.allocator import Allocator, AllocatorConfig

    a = params.allocator
    if a.encoder == "backbone":
        return "encoder: the backbone's vision tower (built by the train stage)"
    path = Path(a.encoder_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (a local SmolVLM2 checkpoint folder is needed)")
    source = transformers.AutoConfig.from_pretrained(path)
    kwargs = a.model_kwargs() | {"query_source": "hidden_states"}  # as Allocator.from_smolvlm builds it
    config = AllocatorConfig(encoder_type="smolvlm", encoder_config=source.to_dict(), **kwargs)
    n = _meta_parameters(lambda: Allocator(config))
    transformers.AutoTokenizer.from_pretrained(path)
    return f"{path}: {source.model_type} encoder, Allocator {n / 1e6:.1f} M parameters, {_weight_files(path)}"


def check_benchmark(ref, samples_per_task: int) -> str:
    from collections import Counter

    from resadapt.data.benchmarks import load_real_benchmark

    table = load_real_benchmark(
        ref.name, ref.root, ref.split, ref.limit or samples_per_task, check_media=True
    )
    kinds = Counter(table["task"])
    return f"{ref.root}: {len(table)} rows ({', '.join(f'{k} {v}' for k, v in kinds.items())}), media present"


def dry_run(params: Params, source: str = "params") -> list[str]:
    """One line per checked item; raises ConfigError listing every problem found."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("backbone.checkpoint", lambda: check_backbone(params)),
        ("allocator.encoder_path", lambda: check_allocator(params)),
    ]
    for i, ref in enumerate(params.evaluate.benchmarks):
        checks.append(
            (
                f"evaluate.benchmarks[{i}] {ref.name}",
                lambda ref=ref: check_benchmark(ref, params.evaluate.samples_per_task),
            )
        )
    lines, problems = [], []
    for what, check in checks:
        try:
            lines.append(f"ok   {what}: {check()}")
        except Exception as err:  # every problem is collected and reported together
            problems.append(f"{what}: {type(err).__name__}: {err}")
    ev = params.evaluate
    lines.append(
        f"ok   evaluate: {len(ev.methods)} methods x {len(ev.budgets)} budgets at "
        f"{ev.main_frames(params.data.num_frames)} frames over {[*ev.tasks, *(b.name for b in ev.benchmarks)]}; "
        f"frames grid {ev.frames} on {ev.frames_task}"
    )
    if problems:
        raise ConfigError(f"{source}: dry run found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return lines
