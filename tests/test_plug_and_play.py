"""Plug-and-play: a trained Allocator in front of tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL stand-ins, from Python
(allocation = the evaluate stage's methods; qwen-vl-utils messages, vLLM requests and processor inputs give
exactly the counted tokens) and from the command line (`resadapt allocate` / `resadapt answer`, any MP4, one
line and nothing written on bad input)."""

from __future__ import annotations

import enum
import importlib
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers
from conftest import BENCH_FRAMES, SMALL_BACKBONE
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from resadapt.allocator import Allocator
from resadapt.backbone import (
    ARCHITECTURES,
    TinyBackboneSpec,
    TransformersBackend,
    build_tiny_backbone,
    load_backbone,
    save_backbone,
)
from resadapt.baselines import MethodContext, build_method
from resadapt.budget import VisionGeometry
from resadapt.cli import main
from resadapt.data.embedded import split_rows
from resadapt.data.sample import load_sample
from resadapt.evaluate import Cell, Evaluator
from resadapt.plug_and_play import PlugAndPlayAllocator, answer, load_allocator
from resadapt.processing import build_processor
from resadapt.vllm_backend import VLLMBackend

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QUESTION = "What digit is on the red card?"


def _allocator_dir(model, processor, path: Path, seed: int) -> Path:
    """A small Allocator of `model` with a seeded random head (stands in for training, so frames differ)."""
    alloc = Allocator.from_backbone(model, processor, coarse_size=56, dim=32, depth=1, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            alloc.head.out.weight.normal_(0.0, 1.0)
            alloc.head.out.bias.normal_(0.0, 1.0)
    alloc.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stand_ins(tiny_backbone_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (backbone folder, Allocator folder): the session's Qwen2.5-VL and built Qwen2-VL / Qwen3-VL."""
    root = tmp_path_factory.mktemp("stand_ins")
    out = {}
    for i, arch in enumerate(ARCHS):
        if arch == "qwen2_5_vl":
            backbone = Path(tiny_backbone_dir)
            model, processor = load_backbone(backbone)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                spec = TinyBackboneSpec(architecture=arch, **SMALL_BACKBONE, max_pixels=112 * 112)
                model, processor = build_tiny_backbone(spec)
            backbone = save_backbone(model, processor, root / f"{arch}_backbone")
        out[arch] = (backbone, _allocator_dir(model, processor, root / f"{arch}_allocator", seed=i))
    return out


@pytest.fixture(scope="module")
def mp4_640(tmp_path_factory) -> Path:
    """A 640x360, 30 fps, 10 s H.264 (yuv420p, lossy: what users have) with a square moving over a gradient."""
    path = tmp_path_factory.mktemp("video") / "clip_640x360_30fps.mp4"
    y, x = np.mgrid[0:360, 0:640]
    base = np.stack([x * 255 // 639, y * 255 // 359, np.full_like(x, 96)], -1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "32", "threads": "1"}
        for i in range(300):
            frame = base.copy()
            frame[100:160, 2 * i : 2 * i + 60] = (255, 0, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _detail_row(bench: Path) -> dict:
    return split_rows(bench, "test", ["detail_qa"], 1)[0]


# ---------------------------------------------------------------------------------------------------------
# qwen-vl-utils. It imports torchvision at import time (its metadata does not list it), and torchvision
# cannot be installed beside the CPU torch here (NOTES.md). Where no torchvision exists, the module is
# imported against a stand-in for the one function its frame-list path calls, torchvision's tensor resize:
# an early return at the same size, else F.interpolate (bicubic, antialias) with uint8 rounding, as
# torchvision.transforms.functional.resize does. Everything else is the real qwen-vl-utils 0.0.14 code.


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0+resadapt-test-stand-in"
    io = types.ModuleType("torchvision.io")

    def read_video(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: no video decoding (messages carry decoded frames)")

    io.read_video = read_video
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        if list(img.shape[-2:]) == list(size):
            return img
        x = torch.nn.functional.interpolate(
            img.float(), size=list(size), mode=interpolation.value, align_corners=False, antialias=antialias
        )
        if img.dtype == torch.uint8:
            x = x.clamp(0, 255).round().to(torch.uint8)
        return x

    functional.resize = resize
    transforms.functional = functional
    transforms.InterpolationMode = InterpolationMode
    tv.io, tv.transforms = io, transforms
    return {
        "torchvision": tv,
        "torchvision.io": io,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


@pytest.fixture(scope="module")
def process_vision_info():
    """The real `qwen_vl_utils.process_vision_info` (against the stand-in when torchvision is absent);
    sys.modules is left as it was, so no other test sees a torchvision."""
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.fail("qwen-vl-utils is a dependency (pyproject.toml); install it")
    stub = {} if importlib.util.find_spec("torchvision") is not None else _torchvision_stand_in()
    before = set(sys.modules)
    sys.modules.update(stub)
    try:
        module = importlib.import_module("qwen_vl_utils")
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("torchvision", "qwen_vl_utils"):
                del sys.modules[name]
    return module.process_vision_info


@pytest.fixture(scope="module")
def loaded_allocator(stand_ins):
    return load_allocator(stand_ins["qwen2_5_vl"][1])


def _real_limits_processor(arch: str, tokenizer):
    """A processor of `arch` with Qwen-like limits (frames 4..256 merged tokens): the real checkpoints'
    floor is far above qwen-vl-utils' 4-token one."""
    patch = 16 if arch == "qwen3_vl" else 14
    f = 2 * patch
    return build_processor(
        tokenizer,
        min_pixels=4 * f * f,
        max_pixels=256 * f * f,
        processor_cls=getattr(transformers, ARCHITECTURES[arch][2]),
        patch_size=patch,
    )


@pytest.mark.parametrize("arch", ARCHS)
@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example runs a processor
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    t=st.integers(1, 9),
    h=st.integers(90, 400),  # below ~90 px a frame can sit at the pixel floor: see the xfail below
    w=st.integers(90, 400),
    fps=st.sampled_from([0.5, 1.0, 2.0, 24.0, 29.97, 60.0]),
    budget=st.one_of(st.none(), st.floats(0.05, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_qwen_vl_utils_messages_give_the_counted_tokens(
    arch, loaded_allocator, process_vision_info, t, h, w, fps, budget, seed
):
    allocator, tokenizer = loaded_allocator
    processor = _real_limits_processor(arch, tokenizer)
    pnp = PlugAndPlayAllocator(allocator, tokenizer, VisionGeometry.from_processor(processor))
    frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    try:
        alloc = pnp.allocate(frames, QUESTION, budget, video_fps=fps)
    except ValueError as err:  # a budget below what all-s_min frames keep: a clear error, not a test case
        assume("below the smallest retention" not in str(err))
        raise
    messages = alloc.qwen_messages()
    assert sum(p["type"] == "video" for p in messages[0]["content"]) == len(alloc.visual.chunks)
    images, videos, kwargs = process_vision_info(
        messages,
        return_video_kwargs=True,
        return_video_metadata=True,
        image_patch_size=pnp.geometry.patch_size,
    )
    assert images is None and len(videos) == len(alloc.visual.chunks)
    arrays = [v.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy() for v, _ in videos]
    assert [a.shape[1:3] for a in arrays] == alloc.chunk_sizes
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(
        text=[text], videos=arrays, video_metadata=[m for _, m in videos], return_tensors="pt", **kwargs
    )
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    fed = int((batch["input_ids"] == video_pad).sum())
    assert fed == alloc.visual_tokens
    merge = pnp.geometry.merge_size**2
    assert [int(g.prod()) // merge for g in batch["video_grid_thw"]] == alloc.tokens_per_chunk
    ours = alloc.processor_inputs(processor)
    assert torch.equal(ours["video_grid_thw"], batch["video_grid_thw"])
    if arch != "qwen3_vl":  # Qwen3-VL: qwen-vl-utils' metadata restarts each item's stamps at 0
        assert torch.equal(ours["input_ids"], batch["input_ids"])
        if "second_per_grid_ts" in ours:
            assert list(ours["second_per_grid_ts"]) == list(batch["second_per_grid_ts"])


def test_frames_at_the_pixel_floor_allocate(loaded_allocator):
    allocator, tokenizer = loaded_allocator
    pnp = PlugAndPlayAllocator(allocator, tokenizer, VisionGeometry(min_pixels=128 * 28 * 28))
    alloc = pnp.allocate(np.zeros((4, 120, 160, 3), np.uint8), QUESTION)
    assert alloc.retention == 1.0


def test_qwen_vl_utils_floor_is_a_clear_error(stand_ins):
    pnp = PlugAndPlayAllocator.from_pretrained(stand_ins["qwen2_5_vl"][1])
    pnp.geometry = VisionGeometry(min_pixels=28 * 28, max_pixels=112 * 112)  # the tiny stand-ins' limits
    alloc = pnp.allocate(np.zeros((2, 200, 200, 3), np.uint8), QUESTION, 0.1)
    with pytest.raises(ValueError, match=r"chunk 0 is 28x28 .*qwen-vl-utils"):
        alloc.qwen_messages()
    assert alloc.processor_inputs(load_backbone(stand_ins["qwen2_5_vl"][0])[1])[
        "video_grid_thw"
    ].tolist() == [[1, 2, 2]]


# ---------------------------------------------------------------------------------------------------------
# Python API: the evaluate stage's computation, vLLM requests, Qwen3-VL timestamps.


def test_allocation_is_the_evaluate_stage_methods_and_answer_is_the_evaluators(
    tiny_bench, stand_ins, tmp_path, capsys
):
    backbone_dir, allocator_dir = stand_ins["qwen2_5_vl"]
    model, processor = load_backbone(backbone_dir)
    row = _detail_row(tiny_bench)
    sample = load_sample(row, tiny_bench, BENCH_FRAMES)
    # what resadapt.stages.evaluate.stage_context builds: the backbone's tokenizer, Allocator.from_pretrained
    context = MethodContext(
        geometry=VisionGeometry.from_processor(processor),
        allocator=Allocator.from_pretrained(allocator_dir),
        allocator_tokenizer=processor.tokenizer,
    )
    pnp = PlugAndPlayAllocator.from_pretrained(allocator_dir, processor=processor)
    video = tiny_bench / row["media_path"]
    for method, budget in (("resadapt", None), ("resadapt_hard", 0.3)):
        plan = build_method(method, context).plan_batch([sample], budget)[0]
        alloc = pnp.allocate(video, row["question"], budget, num_frames=BENCH_FRAMES)
        assert alloc.method == method
        np.testing.assert_array_equal(alloc.scales, plan.scales)
        assert len(set(np.round(alloc.raw_scales, 6))) > 1  # frames really differ
        np.testing.assert_array_equal(alloc.frames, sample.frames)
    assert alloc.retention <= 0.3

    evaluator = Evaluator(model, processor, context, max_new_tokens=6, batch_size=1)
    [logged] = evaluator.run_cell(Cell("main", "detail_qa", BENCH_FRAMES, "resadapt_hard", 0.3), [sample], {})
    ours = answer(alloc, TransformersBackend(model, processor, max_new_tokens=6, batch_size=1))
    assert ours.generation.text == logged["prediction"]
    assert ours.generation.visual_tokens == logged["visual_tokens"] == alloc.visual_tokens
    assert logged["retention"] == alloc.retention

    argv = ["answer", str(video), "--question", row["question"], "--allocator", str(allocator_dir)]
    argv += ["--backbone", str(backbone_dir), "--budget", "0.3", "--frames", str(BENCH_FRAMES)]
    assert main([*argv, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"answer: {logged['prediction']}"
    assert f"visual tokens fed: {alloc.visual_tokens} of {alloc.reference_tokens}" in out


def test_openai_request_is_what_vllm_backend_sends(tiny_bench, stand_ins):
    backbone_dir, allocator_dir = stand_ins["qwen2_5_vl"]
    _, processor = load_backbone(backbone_dir)
    row = _detail_row(tiny_bench)
    alloc = PlugAndPlayAllocator.from_pretrained(allocator_dir, processor=processor).allocate(
        tiny_bench / row["media_path"], row["question"], 0.5, num_frames=BENCH_FRAMES - 1
    )
    backend = VLLMBackend("http://127.0.0.1:1", "served", processor, max_new_tokens=9)
    body = alloc.openai_request("served", max_new_tokens=9)
    assert body == backend.body(alloc.visual, row["question"])
    videos = [p for p in body["messages"][0]["content"] if p["type"] == "video_url"]
    assert len(videos) == len(alloc.visual.chunks) == 4
    assert body["media_io_kwargs"]["video"]["fps"] == alloc.fps


def test_qwen3_vl_inputs_carry_each_chunks_time(stand_ins, mp4_640):
    backbone_dir, allocator_dir = stand_ins["qwen3_vl"]
    _, processor = load_backbone(backbone_dir)
    alloc = PlugAndPlayAllocator.from_pretrained(allocator_dir, processor=processor).allocate(
        mp4_640, QUESTION, 0.4, fps=0.5
    )
    assert len(alloc.frames) == 5 and alloc.fps == pytest.approx(30.0)
    text = processor.tokenizer.decode(alloc.processor_inputs(processor)["input_ids"][0])
    stamps = [float(s) for s in re.findall(r"<([\d.]+) seconds>", text)]
    idx = alloc.frame_indices
    # chunk_metadata: the chunk's frames as consecutive source indices from its first frame's
    expected = [(idx[k] + (idx[k] + 1 if k + 1 < len(idx) else idx[k])) / 2 / 30 for k in range(0, 5, 2)]
    assert stamps == pytest.approx([round(e, 1) for e in expected], abs=0.051)
    assert stamps == sorted(stamps) and stamps[-1] > 7


# ---------------------------------------------------------------------------------------------------------
# Command line.


@pytest.mark.parametrize("arch", ARCHS)
def test_allocate_and_answer_on_a_640x360_30fps_mp4(arch, stand_ins, mp4_640, tmp_path, capsys):
    backbone_dir, allocator_dir = stand_ins[arch]
    base = [str(mp4_640), "--question", QUESTION, "--allocator", str(allocator_dir)]
    json_out, plot = tmp_path / "out" / "alloc.json", tmp_path / "out" / "alloc.png"
    argv = ["allocate", *base, "--backbone", str(backbone_dir), "--budget", "0.5", "--frames", "12"]
    assert main([*argv, "--json", str(json_out), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    summary = json.loads(json_out.read_text())
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert summary["frame_size"] == [360, 640] and len(summary["frames"]) == 12
    assert summary["retention"] <= 0.5 and summary["visual_tokens"] == sum(
        c["tokens"] for c in summary["chunks"]
    )
    assert f"retention {summary['retention']:.4f}" in table
    assert [f["index"] for f in summary["frames"]] == [12 + 25 * i for i in range(12)]

    assert (
        main(["answer", *base, "--backbone", str(backbone_dir), "--fps", "0.7", "--max-new-tokens", "4"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("answer: ") and "7 frames in 4 chunks" in out[1]
    assert out[2].startswith("seconds: decode") and "prefill" in out[2]


def test_allocate_prints_a_table_or_json_on_the_embedded_video(tiny_bench, stand_ins, capsys):
    row = _detail_row(tiny_bench)
    argv = ["allocate", str(tiny_bench / row["media_path"]), "--question", row["question"]]
    argv += ["--allocator", str(stand_ins["qwen2_5_vl"][1])]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["frames"]) == BENCH_FRAMES  # every frame of the 8-frame clip (default asks 32)
    assert summary["method"] == "resadapt" and summary["geometry"]["min_pixels"] == 4 * 28 * 28
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "default geometry" in out and f"of {summary['reference_tokens']} unmodified" in out


@pytest.fixture(scope="module")
def corrupt_mp4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "corrupt.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return path


ERROR_CASES = {
    "missing video": (["{missing}"], [], "missing.mp4: no such file"),
    "corrupt video": (["{corrupt}"], [], "corrupt.mp4"),
    "not an allocator": ([], ["--allocator", "{backbone}"], "is not an Allocator folder"),
    "no allocator": ([], ["--allocator", "{missing}"], "does not exist"),
    "budget zero": ([], ["--budget", "0"], "--budget must be a retention in (0, 1]"),
    "budget above one": ([], ["--budget", "1.5"], "--budget must be a retention in (0, 1]"),
    "budget text": ([], ["--budget", "half"], "--budget must be a retention"),
    "empty question": ([], ["--question", "  "], "--question is empty"),
    "frames zero": ([], ["--frames", "0"], "--frames must be a positive integer"),
    "fps negative": ([], ["--fps", "-2"], "--fps must be a positive number"),
    "frames and fps": ([], ["--frames", "4", "--fps", "1"], "either --frames or --fps"),
    "plot suffix": ([], ["--plot", "{tmp}/a.txt"], "--plot"),
}


@pytest.mark.parametrize("command", ["allocate", "answer"])
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_is_one_line_and_writes_nothing(
    command, case, tiny_bench, stand_ins, corrupt_mp4, tmp_path, capsys
):
    video_args, extra, message = ERROR_CASES[case]
    if command == "answer" and case == "plot suffix":
        pytest.skip("answer has no --plot")
    backbone_dir, allocator_dir = stand_ins["qwen2_5_vl"]
    names = {
        "missing": str(tmp_path / "missing.mp4"),
        "corrupt": str(corrupt_mp4),
        "backbone": str(backbone_dir),
        "tmp": str(tmp_path),
    }
    video = [v.format(**names) for v in video_args] or [
        str(tiny_bench / _detail_row(tiny_bench)["media_path"])
    ]
    argv = [command, *video, "--question", QUESTION, "--allocator", str(allocator_dir)]
    argv += [e.format(**names) for e in extra]
    if command == "answer":
        argv += ["--backbone", str(backbone_dir)]
    else:
        argv += ["--json", str(tmp_path / "o" / "a.json"), "--plot", str(tmp_path / "o" / "a.png")]
        if case == "plot suffix":
            argv = argv[:-2]  # the bad --plot of `extra` is the one left
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"resadapt {command}: ") and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_answer_errors_name_the_backbone_and_the_vllm_env(stand_ins, tiny_bench, tmp_path, capsys):
    backbone_dir, allocator_dir = stand_ins["qwen2_5_vl"]
    video = str(tiny_bench / _detail_row(tiny_bench)["media_path"])
    base = ["answer", video, "--question", QUESTION, "--allocator", str(allocator_dir)]
    assert main([*base, "--backbone", str(allocator_dir)]) == 2  # an Allocator is no Qwen-VL checkpoint
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model_type 'resadapt_allocator' is not a supported" in err
    argv = [
        *base,
        "--backbone",
        str(backbone_dir),
        "--backend",
        "vllm",
        "--vllm-venv",
        str(tmp_path / "none"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"no vLLM environment at {tmp_path / 'none'}" in err
    assert list(tmp_path.iterdir()) == []


def test_load_allocator_names_what_is_missing(stand_ins, tmp_path):
    src = stand_ins["qwen2_5_vl"][1]
    (tmp_path / "a").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "a" / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ValueError, match="holds no query tokenizer"):
        load_allocator(tmp_path / "a")
    with pytest.raises(ValueError, match="budget must be a retention"):
        PlugAndPlayAllocator.from_pretrained(src).allocate(np.zeros((2, 56, 56, 3), np.uint8), QUESTION, 2.0)
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        PlugAndPlayAllocator.from_pretrained(src).allocate(np.zeros((2, 56, 56, 3), np.uint8), "")


def test_lazy_export_keeps_resadapt_light():
    import subprocess

    code = "import sys, resadapt, resadapt.config; assert 'torch' not in sys.modules; print(resadapt.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "PlugAndPlayAllocator" in out
    import resadapt

    assert resadapt.PlugAndPlayAllocator is PlugAndPlayAllocator
