"""CAPOTrainer: rollouts through the Allocator, what the loss forward sees, checkpoints and resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from conftest import tiny_params
from datasets import Dataset

from resadapt.allocator import Allocator
from resadapt.backbone import build_inputs, load_backbone
from resadapt.budget import clip_to_saturation, realise
from resadapt.data.embedded import load_benchmark
from resadapt.data.sample import load_sample
from resadapt.trainer import CAPOTrainer, CAPOTrainerConfig

ROOT = Path(__file__).resolve().parents[1]
ALLOCATOR = dict(coarse_size=56, dim=32, depth=1, num_heads=2)


class Bench(NamedTuple):
    root: Path
    backbone: Path


@pytest.fixture
def bench(tiny_bench, tiny_backbone_dir) -> Bench:
    return Bench(tiny_bench, tiny_backbone_dir)


def _rows(root, split="train", tasks=("detail_qa", "image_qa")):
    return [dict(r) | {"prompt": r["question"]} for r in load_benchmark(root)[split] if r["task"] in tasks]


def _trainer(bench: Bench, out, seed=0, joint=False, max_steps=2, callbacks=None, engine=None, **kw):
    root = bench.root
    model, processor = load_backbone(bench.backbone)
    model.train()  # loaded in eval mode; the Trainer trains it (and rollouts log under "train")
    torch.manual_seed(0)
    allocator = Allocator.from_backbone(model, **ALLOCATOR)
    args = CAPOTrainerConfig(
        output_dir=str(out),
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=kw.pop("per_device_train_batch_size", 4),
        allocations_per_prompt=2,
        rollouts_per_allocation=2,
        max_completion_length=3,
        joint_training=joint,
        beta=0.0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy=kw.pop("save_strategy", "no"),
        save_steps=kw.pop("save_steps", 2),
        eval_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        **kw,
    )
    return CAPOTrainer(
        model=model,
        allocator=allocator,
        args=args,
        train_dataset=Dataset.from_list(_rows(root)),
        eval_dataset=Dataset.from_list(_rows(root, "val")),
        processing_class=processor,
        media_root=root,
        callbacks=callbacks,
        rollout_engine=engine,
    )


def test_relevance_prior_parts_get_their_own_learning_rates(bench, tmp_path):
    trainer = _trainer(
        bench,
        tmp_path,
        allocator_learning_rate=1e-3,
        allocator_relevance_learning_rate=0.05,
        allocator_relevance_metric_learning_rate=2e-4,
    )
    lr_of = {
        id(p): group["lr"] for group in trainer.allocator_optimizer.param_groups for p in group["params"]
    }
    named = [(n, p) for n, p in trainer.allocator.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(named), "every trainable parameter is in exactly one group"
    for name, p in named:
        expected = 0.05 if name.startswith("relevance_head.") else 1e-3
        expected = 2e-4 if name.startswith("relevance_metric.") else expected
        assert lr_of[id(p)] == expected, name


def test_config_derives_groups_and_rejects_bad_values(tmp_path):
    def config(**kw):
        return CAPOTrainerConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    args = config(allocations_per_prompt=4, rollouts_per_allocation=2, per_device_train_batch_size=8)
    assert args.num_generations == 8
    bad = [
        ("per_device_train_batch_size", dict(allocations_per_prompt=4, per_device_train_batch_size=4)),
        ("objective", dict(objective="cheap", per_device_train_batch_size=16)),
        ("concentration_cap", dict(capo={"concentration_cap": 2.0}, per_device_train_batch_size=16)),
        ("allocations_per_prompt", dict(allocations_per_prompt=1, per_device_train_batch_size=2)),
        (
            "allocator_lr_scheduler_type",
            dict(allocator_lr_scheduler_type="step", per_device_train_batch_size=16),
        ),
        ("max_steps", dict(allocator_lr_scheduler_type="linear", per_device_train_batch_size=16)),
    ]
    for match, kw in bad:
        with pytest.raises(ValueError, match=match):
            config(**kw)


def test_rollout_batch_and_loss_forward_see_the_generation_pixels(bench, tmp_path):
    trainer = _trainer(bench, tmp_path, joint=True)
    rows = [r for r in _rows(bench.root) if r["task"] == "detail_qa"][:1]
    batch_rows = [rows[0]] * 4  # one prompt: M=2 allocations x N=2 rollouts
    out = trainer._generate_and_score_completions(batch_rows)
    B = 4
    assert out["completion_ids"].shape[0] == B and len(out["visuals"]) == B
    # the two rollouts of one allocation share its latent, the two allocations differ
    assert torch.equal(out["alloc_u"][0], out["alloc_u"][1])
    assert not torch.equal(out["alloc_u"][0], out["alloc_u"][2])
    assert out["alloc_first"].tolist() == [True, False, True, False]

    model = trainer.model
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    keep = out["completion_ids"].shape[1]
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        model, ids, mask, keep, visuals=out["visuals"], mm_token_type_ids=out["mm_token_type_ids"]
    )

    # Direct forward: rebuild each allocation's input from its latent with the public operator and processor.
    cfg = trainer.allocator.config
    sample = load_sample(rows[0], bench.root, rows[0]["num_frames"])
    for i in range(B):
        u = out["alloc_u"][i][out["alloc_mask"][i]].numpy()
        scales = clip_to_saturation(
            cfg.s_min + u * (cfg.s_max - cfg.s_min), 112, 112, trainer.geometry, cfg.s_max
        )
        visual = realise(sample, scales, trainer.geometry).visual
        direct = build_inputs(trainer.processing_class, [visual], [rows[0]["question"]])
        comp = out["completion_ids"][i][out["completion_mask"][i].bool()]
        full = torch.cat([direct["input_ids"][0], comp]).unsqueeze(0)
        prompt_real = out["prompt_ids"][i][out["prompt_mask"][i].bool()]
        assert torch.equal(prompt_real, direct["input_ids"][0]), (
            "generation prompt differs from the operator's"
        )
        mm = torch.cat([direct["mm_token_type_ids"][0], torch.zeros_like(comp)]).unsqueeze(0)
        with torch.no_grad():
            logits = model(
                input_ids=full,
                attention_mask=torch.ones_like(full),
                mm_token_type_ids=mm,
                pixel_values_videos=direct["pixel_values_videos"],
                video_grid_thw=direct["video_grid_thw"],
                second_per_grid_ts=direct["second_per_grid_ts"],
            ).logits[0, -len(comp) - 1 : -1]
        ref = torch.log_softmax(logits / trainer.temperature, -1).gather(-1, comp[:, None])[:, 0]
        got = logps[i][: len(comp)]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    # TRL's own path (no video features) gives other log-probs: the test above could fail.
    no_video, _, _ = _trl_logps(trainer, model, ids, mask, keep)
    m = out["completion_mask"].bool()
    assert (no_video[m] - logps[m]).abs().max() > 1e-3


def _trl_logps(trainer, model, ids, mask, keep):
    """TRL's own log-prob path, which passes no video features."""
    from trl import GRPOTrainer

    with torch.no_grad():
        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, keep)


class ScriptedEngine:
    """A rollout engine that records its requests and answers from a script: the prompt ids the processor
    builds for the request's own visual input (`prompt_shift` corrupts them), then the answer digit for even
    allocations and a wrong digit for odd ones, each followed by EOS (and pad after EOS on the last one)."""

    def __init__(self, processor, answers: dict[str, str], prompt_shift: int = 0):
        self.processor, self.answers, self.prompt_shift = processor, answers, prompt_shift
        self.requests = []

    def sample(self, visuals, questions, samplings, max_new_tokens=None):
        from resadapt.vllm_backend import Rollouts

        tok = self.processor.tokenizer
        out = []
        for k, (v, q, s) in enumerate(zip(visuals, questions, samplings, strict=True)):
            self.requests.append((v, q, s, max_new_tokens))
            ids = build_inputs(self.processor, [v], [q])["input_ids"][0].tolist()
            right = self.answers.get(q, "0")
            answer = right if k % 2 == 0 else str((int(right) + 1) % 10)
            digit = tok(answer, add_special_tokens=False)["input_ids"]
            completions = [digit + [tok.eos_token_id]] * s.n
            if s.n > 1:
                completions[-1] = digit + [tok.eos_token_id, tok.pad_token_id]
            out.append(Rollouts(ids[self.prompt_shift :], completions))
        return out


def test_rollout_engine_gets_every_allocation_and_its_answers_are_scored(bench, tmp_path):
    rows = [r for r in _rows(bench.root) if r["task"] == "detail_qa"][:1]
    probe = _trainer(bench, tmp_path / "probe")
    engine = ScriptedEngine(probe.processing_class, {rows[0]["question"]: rows[0]["answer"]})
    trainer = _trainer(bench, tmp_path, temperature=0.7, engine=engine)
    trainer.state.global_step = 5
    out = trainer._generate_and_score_completions([rows[0]] * 4)  # M=2 allocations x N=2 rollouts

    assert len(engine.requests) == 2  # one request per allocation, N completions each
    sample = load_sample(rows[0], bench.root, rows[0]["num_frames"])
    cfg = trainer.allocator.config
    video_id = trainer.model.config.video_token_id
    for k, (visual, question, sampling, limit) in enumerate(engine.requests):
        assert question == rows[0]["question"] and limit == 3
        assert sampling.n == 2 and sampling.temperature == 0.7 and video_id in sampling.suppress_token_ids
        u = out["alloc_u"][2 * k][out["alloc_mask"][2 * k]].numpy()
        scales = clip_to_saturation(
            cfg.s_min + u * (cfg.s_max - cfg.s_min), 112, 112, trainer.geometry, cfg.s_max
        )
        expected = realise(sample, scales, trainer.geometry).visual
        assert len(visual.chunks) == len(expected.chunks)
        assert all(
            a.shape == b.shape and (a == b).all() for a, b in zip(visual.chunks, expected.chunks, strict=True)
        )
    seeds = [r[2].seed for r in engine.requests]
    assert len(set(seeds)) == 2

    tok = trainer.processing_class.tokenizer
    texts = tok.batch_decode(
        [c[m.bool()] for c, m in zip(out["completion_ids"], out["completion_mask"], strict=True)],
        skip_special_tokens=True,
    )
    wrong = str((int(rows[0]["answer"]) + 1) % 10)
    assert texts == [rows[0]["answer"]] * 2 + [wrong] * 2
    assert out["completion_mask"].sum(1).tolist() == [2, 2, 2, 2]  # the pad after EOS is masked
    assert trainer._metrics["train"]["alloc/accuracy"][-1] == 0.5
    assert out["alloc_adv"][0] > out["alloc_adv"][2]  # the correct allocation is the better one

    # the same step draws the same seeds (a resumed run asks for the same rollouts); the next step others
    trainer._generate_and_score_completions([rows[0]] * 4)
    trainer.state.global_step = 6
    trainer._generate_and_score_completions([rows[0]] * 4)
    assert [r[2].seed for r in engine.requests[2:4]] == seeds
    assert not set(r[2].seed for r in engine.requests[4:]) & set(seeds)

    # validation answers go through the engine too (greedy)
    before = len(engine.requests)
    trainer.evaluate()
    greedy = engine.requests[before:]
    assert greedy and all(r[2].temperature == 0.0 and r[2].n == 1 for r in greedy)


def test_rollout_engine_with_another_prompt_or_joint_training_is_refused(bench, tmp_path):
    rows = [r for r in _rows(bench.root) if r["task"] == "detail_qa"][:1]
    probe = _trainer(bench, tmp_path / "probe")
    answers = {rows[0]["question"]: rows[0]["answer"]}
    shifted = ScriptedEngine(probe.processing_class, answers, prompt_shift=1)
    trainer = _trainer(bench, tmp_path / "a", engine=shifted)
    with pytest.raises(RuntimeError, match="differs from the processor's"):
        trainer._generate_and_score_completions([rows[0]] * 4)
    engine = ScriptedEngine(probe.processing_class, answers)
    with pytest.raises(ValueError, match="frozen backbone"):
        _trainer(bench, tmp_path / "b", joint=True, engine=engine)
    with pytest.raises(ValueError, match="repetition_penalty"):
        _trainer(bench, tmp_path / "c", engine=engine, repetition_penalty=1.1)


def test_frozen_backbone_trains_only_the_allocator(bench, tmp_path):
    trainer = _trainer(bench, tmp_path, max_steps=2)
    before_b = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    before_a = {k: v.clone() for k, v in trainer.allocator.state_dict().items()}
    trainer.train()
    after_b = trainer.model.state_dict()
    assert all(torch.equal(before_b[k], after_b[k]) for k in before_b), "the frozen backbone changed"
    changed = {k for k, v in trainer.allocator.state_dict().items() if not torch.equal(before_a[k], v)}
    frozen = {n for n, p in trainer.allocator.named_parameters() if not p.requires_grad}
    assert changed and frozen and not changed & frozen, "only the decoder and head may change"
    logged = trainer.state.log_history[0]
    for key in (
        "reward",
        "alloc/accuracy",
        "alloc/mean_scale",
        "alloc/retention",
        "alloc/advantage_std",
        "alloc/concentration",
        "alloc/ppo_loss",
    ):
        assert key in logged, key
    assert 0.0 < logged["alloc/retention"] <= 1.0


class _Crash(Exception):
    pass


@pytest.mark.parametrize("budget_coef", [0.0, 50.0], ids=["capo", "capo_with_budget_constraint"])
def test_killed_run_resumes_to_the_same_result(bench, tmp_path, budget_coef):
    from transformers import TrainerCallback

    from resadapt.config import CAPOConfig

    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    if budget_coef:
        kw |= dict(capo=CAPOConfig(budget_coef=budget_coef), target_retention=0.1)
    else:  # a decaying schedule: the resumed run must pick up its step, not restart it
        kw |= dict(allocator_lr_scheduler_type="linear")
    full = _trainer(bench, tmp_path / "full", **kw)
    full.train()
    dets = [h["alloc/deterministic_retention"] for h in full.state.log_history if "alloc/budget_loss" in h]
    if budget_coef:  # above the target: the constraint lowers every video's budget logit (from 0)
        assert len(dets) == 4 and min(dets) > 0.1
        assert full.allocator.budget.bias.item() < -3e-3  # Adam: about -lr (1e-3) on each of the 4 steps
    else:
        assert dets == []

    class CrashAfter3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise _Crash

    run = tmp_path / "killed"
    killed = _trainer(bench, run, callbacks=[CrashAfter3()], **kw)
    with pytest.raises(_Crash):
        killed.train()
    assert (run / "checkpoint-2" / "allocator" / "model.safetensors").exists()
    assert (run / "checkpoint-2" / "allocator" / "optimizer.pt").exists()
    resumed = _trainer(bench, run, **kw)
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    for (k, a), b in zip(
        full.allocator.state_dict().items(), resumed.allocator.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=f"allocator weight {k} differs after resume")
    lrs = [h["alloc/lr"] for h in full.state.log_history if "alloc/lr" in h]
    expected = [1e-3, 7.5e-4, 5e-4, 2.5e-4] if not budget_coef else [1e-3] * 4
    assert lrs == pytest.approx(expected)
    assert [h["alloc/lr"] for h in resumed.state.log_history if "alloc/lr" in h][-2:] == pytest.approx(
        expected[2:]
    )
    last_full = [h for h in full.state.log_history if "alloc/mean_scale" in h][-1]
    last_resumed = [h for h in resumed.state.log_history if "alloc/mean_scale" in h][-1]
    assert last_full["alloc/mean_scale"] == pytest.approx(last_resumed["alloc/mean_scale"])


def test_resume_without_allocator_state_fails_clearly(bench, tmp_path):
    trainer = _trainer(bench, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "allocator" / "model.safetensors").unlink()
    again = _trainer(bench, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    with pytest.raises(FileNotFoundError, match="allocator"):
        again.train(resume_from_checkpoint=str(ckpt))


@pytest.mark.parametrize(
    "how",
    [
        ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"],
        # the paper profile's frozen-backbone launch file, shrunk to 2 processes (bf16 is a GPU setting)
        ["--config_file", str(ROOT / "configs" / "accelerate" / "frozen_8gpu.yaml")],
    ],
    ids=["multi_gpu", "frozen_8gpu_config"],
)
def test_accelerate_two_processes(bench, tmp_path, how):
    """Two processes train one Allocator: different prompts per rank, identical weights at the end.

    On a machine without GPUs, accelerate 1.15 starts two (gloo) processes with `--multi_gpu`; its `--cpu`
    launcher starts only one unless MPI is set up (`--mpirun_hostfile`), which is why this checks both ranks.
    The same holds for the repository's 8-GPU launch file with `--num_processes 2`.
    """
    params = tiny_params(
        tmp_path,
        bench.root,
        bench.backbone,
        rollouts_per_allocation=2,
        eval_steps=100,
        checkpoints=str(tmp_path / "runs"),
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(launcher),
        "launch",
        *how,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "resadapt.cli",
        "train",
        str(tmp_path / "params.yaml"),
        "--rank-report",
        str(tmp_path / "ranks"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted((tmp_path / "ranks").glob("rank*.pt"))
    assert len(reports) == 2
    a, b = (torch.load(r, weights_only=True) for r in reports)
    assert a["prompts"] != b["prompts"], "both ranks trained on the same prompts"
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], msg=f"ranks disagree on {k}")
    assert (tmp_path / "allocator" / "seed_0" / "model.safetensors").exists()  # the params' seed
