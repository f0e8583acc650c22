"""The cost model (resadapt/cost.py) on tiny configs, checked against FLOPs counted by hand.

Every hand count is 2 m n k per matmul (2 FLOPs per multiply-add, as torch's FlopCounterMode counts). The
real-size figures are not computed here (docs/paper_scale.md has them with their command); the published
configs are only parsed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from resadapt import cost
from resadapt.allocator import AllocatorConfig
from resadapt.cli import main

ROOT = Path(__file__).resolve().parents[1]

# tiny Qwen2.5-VL: text hidden 64 (4 heads x 16, 2 KV heads), MLP 128, 1 layer, vocab 100;
# vision hidden 32 (2 heads), MLP 64, 1 full-attention block, merger to 64
D, FF, H, KV, V = 64, 128, 4, 2, 100
VD, VI = 32, 64


def tiny_qwen25(layers: int = 1) -> transformers.PretrainedConfig:
    text = {
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": FF,
        "num_hidden_layers": layers,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 1,
        "hidden_size": VD,
        "intermediate_size": VI,
        "num_heads": 2,
        "out_hidden_size": D,
        "fullatt_block_indexes": [0],
        "window_size": 112,
    }
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_backbone() -> cost.BackboneCost:
    return cost.BackboneCost(tiny_qwen25())


@pytest.fixture(scope="module")
def tiny_allocator() -> cost.AllocatorCost:
    config = AllocatorConfig(
        encoder_type="qwen_vision",
        encoder_config=tiny_qwen25().to_dict(),
        coarse_size=56,
        query_source="hidden_states",
        dim=32,
        num_heads=2,
    )
    return cost.AllocatorCost(config)


# one text decoder layer, per token: q (D x D), k and v (D x KV*16 each), o (D x D), gate/up (D x FF), down
LAYER_MACS = D * D + 2 * D * (KV * 16) + D * D + 3 * D * FF


def test_linear_layer_is_2mnk():
    layer = nn.Linear(48, 80, device="meta")
    x = torch.empty(7, 48, device="meta")
    flops = cost.count_flops(lambda: layer(x))
    assert flops == cost.Flops(dense=2 * 7 * 48 * 80, attention=0.0)


def test_prefill_matches_hand_count(tiny_backbone):
    n = 37
    flops = tiny_backbone.prefill(n)
    # every token through the layer's weights, the lm_head on the last position only
    assert flops.dense == 2 * n * LAYER_MACS + 2 * 1 * D * V
    # QK^T and AV over all heads (H x 16 = D wide), no causal mask: 2 x (2 n n D)
    assert flops.attention == 2 * (2 * n * n * D)


def test_prefill_scales_with_layers():
    two = cost.BackboneCost(tiny_qwen25(layers=2)).prefill(10)
    assert two.dense == 2 * 10 * 2 * LAYER_MACS + 2 * D * V
    assert two.attention == 2 * 2 * (2 * 10 * 10 * D)


def test_decode_token_matches_hand_count(tiny_backbone):
    context = 50
    flops = tiny_backbone.decode_token(context)
    assert flops.dense == 2 * LAYER_MACS + 2 * D * V
    # one query against the cache plus itself
    assert flops.attention == 2 * (2 * 1 * (context + 1) * D)


def test_vision_chunk_matches_hand_count(tiny_backbone):
    h, w = 56, 84  # 4 x 6 patches of 14 px, one temporal chunk of 2 frames
    n = (h // 14) * (w // 14)
    patch_embed = 3 * 2 * 14 * 14 * VD  # Conv3d(3, VD, kernel 2x14x14), no bias
    block = VD * 3 * VD + VD * VD + 3 * VD * VI  # qkv, proj, gate/up/down
    merger = (4 * VD) * (4 * VD) + (4 * VD) * D  # per merged token (2x2 patches)
    flops = tiny_backbone.vision_chunk(h, w)
    assert flops.dense == 2 * n * (patch_embed + block) + 2 * (n // 4) * merger
    assert flops.attention == 2 * (2 * n * n * VD)  # one full-attention block


def test_vision_chunk_rejects_a_size_off_the_patch_grid(tiny_backbone):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        tiny_backbone.vision_chunk(50, 84)


def test_allocator_total_is_frames_times_encoder_plus_query_and_decoder(tiny_allocator):
    a = tiny_allocator
    assert a.encoder_frame.dense > 0 and a.query(8).dense > 0
    for frames in (2, 8):
        assert a.total(frames, 8) == frames * a.encoder_frame + a.query(8) + a.decoder(frames, 8)
    # the decoder's dense part is affine in frames (the query's projections are paid once per sample)
    d2, d4, d8 = (a.decoder(f, 8).dense for f in (2, 4, 8))
    assert d8 - d4 == 2 * (d4 - d2) and d2 > d4 - d2
    params = a.parameters()
    assert params["trainable"] > 0 and params["frozen"] > 0


def test_cost_table_columns(tiny_backbone, tiny_allocator):
    rows = cost.cost_table(
        tiny_backbone,
        [4, 8],
        [1.0, 0.25],
        tiny_allocator,
        frame_size=(112, 168),
        prompt_tokens=10,
        query_tokens=8,
    )
    assert [(r.method, r.frames) for r in rows] == [
        ("vanilla", 4),
        ("resadapt", 4),
        ("vanilla", 8),
        ("resadapt", 8),
    ]
    for r in rows:
        chunks = r.frames // 2
        vision = chunks * tiny_backbone.vision_chunk(r.chunk_height, r.chunk_width).dense
        prefill = tiny_backbone.prefill(r.visual_tokens + 10).dense
        assert r.vision_tflops == pytest.approx(vision / 1e12)
        assert r.inf_tflops == pytest.approx((vision + prefill) / 1e12)
        assert r.total_tflops == pytest.approx(r.inf_tflops + r.alloc_tflops)
        assert r.retention <= r.retention_target
        if r.method == "vanilla":
            assert r.alloc_tflops == 0 and r.retention == 1 and r.total_reduction == 0
        else:
            assert r.alloc_tflops == pytest.approx(tiny_allocator.total(r.frames, 8).dense / 1e12)
            assert r.inf_reduction > 0.5
    text = cost.format_table(rows)
    assert "vanilla" in text and "attn*" in text
    metrics = cost.table_metrics(rows, {"backbone": "tiny"})
    assert set(metrics) == {
        "settings",
        "vanilla/F4/R1",
        "resadapt/F4/R0.25",
        "vanilla/F8/R1",
        "resadapt/F8/R0.25",
    }


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_retention_outside_0_1_is_rejected(tiny_backbone, tiny_allocator, bad):
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        cost.cost_table(tiny_backbone, [4], [bad], tiny_allocator, frame_size=(112, 168))


def test_frames_must_fill_temporal_chunks(tiny_backbone, tiny_allocator):
    with pytest.raises(ValueError, match="multiple of temporal_patch_size"):
        cost.cost_table(tiny_backbone, [5], [0.5], tiny_allocator, frame_size=(112, 168))


def test_unknown_backbone_lists_the_known_ones(capsys):
    with pytest.raises(ValueError, match="known: qwen2_5_vl_7b, qwen3_vl_8b"):
        cost.BackboneCost("qwen9")
    assert main(["cost", "--backbone", "qwen9"]) == 2
    assert "qwen2_5_vl_7b" in capsys.readouterr().err
    assert main(["cost", "--frame-size", "big"]) == 2


def test_published_configs_parse():
    qwen = cost.load_arch_config("qwen2_5_vl_7b")
    assert (qwen.text_config.hidden_size, qwen.text_config.num_hidden_layers) == (3584, 28)
    assert (qwen.vision_config.depth, qwen.vision_config.intermediate_size) == (32, 3420)
    qwen3 = cost.load_arch_config("qwen3_vl_8b")
    assert (qwen3.text_config.hidden_size, qwen3.vision_config.patch_size) == (4096, 16)
    smol = cost.load_arch_config("smolvlm2_256m_video")
    assert (smol.vision_config.image_size, smol.scale_factor, smol.text_config.hidden_size) == (512, 4, 576)
    with pytest.raises(ValueError, match="known:"):
        cost.load_arch_config("llama")


def test_plot_cost_draws_one_line_per_setting(tiny_backbone, tiny_allocator):
    rows = cost.cost_table(tiny_backbone, [4, 8], [0.5, 0.25], tiny_allocator, frame_size=(112, 168))
    fig = cost.plot_cost(rows)
    labels = [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert labels == ["Vanilla", "ResAdapt R=0.5", "ResAdapt R=0.25"]


def test_training_memory_shards_the_joint_state(tiny_backbone, tiny_allocator):
    def sharded(gpus: int) -> float:
        joint = cost.training_memory(tiny_backbone, tiny_allocator, frames=4, gpus=gpus)[2]
        return joint.items["sharded fp32 weights + grads + AdamW"]

    assert sharded(2) == pytest.approx(4 * sharded(8))
    n = sum(tiny_backbone.parameters().values())
    frozen = cost.training_memory(tiny_backbone, tiny_allocator, frames=4)[0]
    assert frozen.items["backbone weights (bf16)"] == pytest.approx(n * 2 / 1024**3)
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        cost.training_memory(tiny_backbone, tiny_allocator, gpus=0)
    assert "GiB" in cost.format_memory([frozen])


@pytest.mark.parametrize("name", ["frozen_8gpu.yaml", "joint_fsdp_8gpu.yaml"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.num_processes >= 2 and config.mixed_precision == "bf16" and not config.use_cpu
    if name.startswith("frozen"):
        assert config.distributed_type == "MULTI_GPU"
    else:
        assert config.distributed_type == "FSDP"
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_activation_checkpointing"] is True
        layers = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"} <= set(layers)
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

        assert all(hasattr(modeling_qwen2_5_vl, cls) for cls in layers)


def test_bench_paper_scale_runs_tiny_on_cpu(tmp_path):
    """The GPU benchmark's code path, with tiny configs on CPU (in-process: no second interpreter start)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "bench_paper_scale", ROOT / "scripts" / "bench_paper_scale.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    runs = json.loads(out.read_text())["runs"]
    assert [(r["method"], r["retention_target"]) for r in runs] == [
        ("vanilla", 1.0),
        ("resadapt", 0.25),
        ("resadapt", 0.1),
    ]
    assert runs[0]["visual_tokens"] > runs[1]["visual_tokens"] > runs[2]["visual_tokens"]
    for r in runs:
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert (r["allocator_s"] > 0) == (r["method"] == "resadapt")
