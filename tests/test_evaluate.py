"""The baselines' budget arithmetic, the evaluator's token accounting and the tables built from its log."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import log_row

from resadapt import evaluate as E
from resadapt.allocator import Allocator
from resadapt.baselines import METHODS, MethodContext, build_method
from resadapt.baselines.slow_fast import chunk_novelty
from resadapt.budget import Plan, VisionGeometry, realise
from resadapt.config import METHODS as CONFIG_METHODS
from resadapt.data.sample import LoadedSample, load_samples
from resadapt.stages import evaluate as SE

GEOM = VisionGeometry(max_pixels=224 * 224, min_pixels=28 * 28)
BUDGETED = [
    m
    for m, c in METHODS.items()
    if c.budgeted and c.pruning is None and m not in (*SE.ALLOCATOR_METHODS, *SE.PRIOR_METHODS)
]


def _video(sid="v0", n=16, size=224, evidence=(4, 5), seed=0) -> LoadedSample:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    row = {"id": sid, "task": "detail_qa", "question": "What digit is on the red card?", "answer": "7"}
    row |= {"options": [], "answer_span": [], "media_type": "video"}
    mask = np.array([i in evidence for i in range(n)])
    return LoadedSample(row, frames, list(range(n)), 2.0, mask)


def _image(sid="i0", size=224) -> LoadedSample:
    row = {"id": sid, "task": "image_qa", "question": "What digit is on the red card?", "answer": "7"}
    row |= {"options": [], "answer_span": [], "media_type": "image"}
    img = np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return LoadedSample(row, img, [0], 0.0, np.array([True]))


def test_registry_matches_the_config_names():
    assert set(METHODS) == set(CONFIG_METHODS)


@pytest.mark.parametrize("method", BUDGETED)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_budgeted_methods_stay_within_their_budget(method, budget):
    m = build_method(method, MethodContext(GEOM))
    for sample in (_video(), _video("v1", n=15)):
        r = realise(sample, m.plan(sample, budget), GEOM)
        assert r.tokens / r.reference_tokens <= budget + 1e-9, (method, budget, r.tokens)
        assert r.reference_tokens == (len(sample.frames) + 1) // 2 * 64


def test_fixed_scale_uses_the_budget_and_oracle_gives_evidence_full_resolution():
    sample = _video()
    ctx = MethodContext(GEOM, s_min=0.125)
    fixed = realise(sample, build_method("fixed_scale", ctx).plan(sample, 0.25), GEOM)
    assert 0.2 <= fixed.tokens / fixed.reference_tokens <= 0.25
    oracle = build_method("oracle", ctx)
    roomy = oracle.plan(sample, 0.25).scales
    assert np.all(roomy[4:6] == 1.0) and np.all(roomy[:4] > 0.125)
    # evidence at full resolution (64 tokens) + the other 7 chunks at s_min (1 token each) = 71 > 0.13 x 512:
    # the rest is dropped, the evidence keeps full resolution
    dropped = oracle.plan(sample, 0.13)
    assert dropped.frames == [4, 5] and np.all(dropped.scales == 1.0)
    tight = oracle.plan(sample, 0.1)  # the evidence chunk alone needs 64/512 = 0.125: shrunk, rest dropped
    assert tight.frames == [4, 5] and np.all(tight.scales < 1.0)
    assert realise(sample, tight, GEOM).retention <= 0.1


def test_oracle_keeps_as_many_evidence_chunks_at_full_resolution_as_fit():
    # two evidence chunks (4-5 fully, 9 half): both at full + 6 chunks at s_min = 134 tokens of 512
    sample = _video(evidence=(4, 5, 9))
    oracle = build_method("oracle", MethodContext(GEOM, s_min=0.125))
    both = oracle.plan(sample, 0.27)
    assert np.all(both.scales[[4, 5, 8, 9]] == 1.0) and both.frames is None
    # 0.15 x 512 = 76: one chunk at full (64) + the other seven at s_min (7): the fuller chunk stays full,
    # the other evidence chunk is not blurred to a common scale with it (it gets the rest's scale, the
    # leftover budget spread over the rest)
    one = oracle.plan(sample, 0.15)
    assert np.all(one.scales[[4, 5]] == 1.0) and np.all(one.scales[[8, 9]] == one.scales[0])
    assert 0.125 <= one.scales[0] < 0.5
    assert realise(sample, one, GEOM).retention <= 0.15
    for budget in (0.1, 0.13, 0.15, 0.2, 0.27, 0.5):
        r = realise(sample, oracle.plan(sample, budget), GEOM)
        assert r.retention <= budget + 1e-9


def test_oracle_alternatives_keep_the_timeline_or_select_chunks_within_the_budget():
    sample = _video(n=16)
    oracle = build_method("oracle", MethodContext(GEOM, s_min=0.125))
    timeline, *selected = oracle.alternatives(sample, 0.1)
    assert timeline.frames is None and 0.125 < timeline.scales[4] == timeline.scales[5] < 1.0
    assert np.all(np.delete(timeline.scales, [4, 5]) == 0.125)
    long = _video(n=64, evidence=(20, 21, 22, 23))
    *_, chosen = oracle.alternatives(long, 0.125)  # 4 of 32 chunks: both evidence chunks and two more
    assert {20, 21, 22, 23} <= set(chosen.frames) and len(chosen.frames) == 8 and np.all(chosen.scales == 1.0)
    for s, budget in ((sample, 0.1), (sample, 0.15), (long, 0.125), (long, 0.25)):
        for plan in oracle.alternatives(s, budget):
            assert realise(s, plan, GEOM).retention <= budget + 1e-9
    assert (
        oracle.alternatives(_image(), 0.1) == []
        and build_method("fixed_scale", MethodContext(GEOM)).alternatives(sample, 0.1) == []
    )


class _TimelineReader:
    """A backend that answers right only when it sees every chunk of the video (the timeline)."""

    name = "timeline_reader"
    calls = 0

    def generate(self, visuals, questions):
        from resadapt.backbone import Generation

        self.calls += len(visuals)
        out = []
        for v in visuals:
            tokens = sum(-(-len(c) // 2) * (c.shape[1] // 28) * (c.shape[2] // 28) for c in v.chunks)
            out.append(Generation("7" if len(v.chunks) == 8 else "0", tokens, tokens + 10, 0.01))
        return out


def test_the_evaluator_keeps_the_oracles_best_plan_per_sample():
    backend = _TimelineReader()
    ev = E.Evaluator(None, None, MethodContext(GEOM, s_min=0.125), backend=backend)
    samples = [_video("a"), _video("b", evidence=(9,))]
    [a, b] = ev.run_cell(E.Cell("main", "detail_qa", 16, "oracle", 0.1), samples, {})
    # the plan drops the timeline (wrong); the first alternative keeps it (right); the second is not tried
    assert (a["score"], a["plan"], b["score"], b["plan"]) == (1.0, 1, 1.0, 1) and backend.calls == 4
    assert a["retention"] <= 0.1 and a["frame_scales"][4] > 0.125
    [roomy] = ev.run_cell(E.Cell("main", "detail_qa", 16, "oracle", 0.25), samples[:1], {})
    assert (roomy["score"], roomy["plan"]) == (1.0, 0) and backend.calls == 5
    [fixed] = ev.run_cell(E.Cell("main", "detail_qa", 16, "fixed_scale", 0.1), samples[:1], {})
    assert fixed["plan"] == 0 and backend.calls == 6


def test_random_chunk_drop_depends_on_seed_and_sample_only():
    a = build_method("random_chunk_drop", MethodContext(GEOM, seed=0))
    b = build_method("random_chunk_drop", MethodContext(GEOM, seed=0))
    c = build_method("random_chunk_drop", MethodContext(GEOM, seed=1))
    plans = [m.plan(_video(f"v{i}"), 0.25).frames for i in range(6) for m in (a,)]
    assert plans == [b.plan(_video(f"v{i}"), 0.25).frames for i in range(6)]
    assert plans != [c.plan(_video(f"v{i}"), 0.25).frames for i in range(6)]
    assert all(len(p) == 4 for p in plans)  # 2 of 8 chunks
    assert not build_method("random_chunk_drop", MethodContext(GEOM)).supports_images


def test_slow_fast_makes_the_changing_chunks_slow():
    sample = _video()
    sample.frames[:] = 100
    sample.frames[6:8, :28, :28] = 250  # one card appears in chunk 3 only
    novelty = chunk_novelty(sample.frames, 2)
    assert np.isinf(novelty[0]) and novelty[3] > 0 and novelty[4] > 0 and novelty[1] == novelty[2] == 0
    # 0.6 of 512 tokens: three slow chunks (3 x 64) and five fast ones (5 x 16 at 30% of the pixels)
    scales = build_method("slow_fast", MethodContext(GEOM)).plan(sample, 0.6).scales
    assert scales[0] == scales[6] == scales[8] == 1.0 and scales[2] < 1.0


def test_images_get_one_scale_within_budget():
    img = _image()
    for method in ("fixed_scale", "oracle", "slow_fast"):
        r = realise(img, build_method(method, MethodContext(GEOM)).plan(img, 0.25), GEOM)
        assert r.visual.image is not None and r.tokens / r.reference_tokens <= 0.25


def test_realise_rejects_bad_plans():
    with pytest.raises(ValueError, match="frames must be increasing"):
        realise(_video(), Plan(scales=np.ones(2), frames=[3, 1]), GEOM)
    with pytest.raises(ValueError, match="2 frames but 3 scales"):
        realise(_video(), Plan(scales=np.ones(3), frames=[0, 1]), GEOM)
    with pytest.raises(ValueError, match="budgeted"):
        build_method("fixed_scale", MethodContext(GEOM)).plan(_video(), None)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("resadapt_soft", MethodContext(GEOM))
    with pytest.raises(ValueError, match="needs context.allocator"):
        build_method("resadapt_hard", MethodContext(GEOM)).plan(_video(), 0.25)


@pytest.fixture
def tiny(tiny_backbone):
    model, processor = tiny_backbone
    torch.manual_seed(0)
    allocator = Allocator.from_backbone(model, coarse_size=56, dim=32, depth=1, num_heads=2)
    return model, processor, allocator


def test_every_method_runs_and_the_prompt_holds_the_counted_tokens(tiny):
    """The evaluator raises if the tokens in the prompt differ from the operator's count, so running every
    input-side method through it checks the accounting; pruning methods report what the LLM received."""
    model, processor, allocator = tiny
    geom = VisionGeometry.from_processor(processor)
    ctx = MethodContext(
        geom, allocator=allocator, prior_allocator=allocator, allocator_tokenizer=processor.tokenizer
    )

    def pruned(method, keep):
        from resadapt.baselines.token_pruning import PrunedBackend

        return PrunedBackend(model, processor, method, keep, max_new_tokens=3, batch_size=4)

    ev = E.Evaluator(model, processor, ctx, max_new_tokens=3, batch_size=4, pruned_backend=pruned)
    samples = [_video("a", n=8, size=112), _video("b", n=8, size=112, evidence=(0, 1)), _image("c", 112)]
    rows = []
    for method, cls in METHODS.items():
        for budget in [0.25] if cls.budgeted else [None]:
            rows += ev.run_cell(E.Cell("main", "detail_qa", 8, method, budget), samples, {"a": 0.1})
    df = pd.DataFrame(rows)
    assert set(df.method) == set(METHODS)
    assert len(df[df.method == "random_chunk_drop"]) == 2  # not applicable to the image
    budgeted = df[df.budget.notna()]
    assert (budgeted.retention <= 0.25 + 1e-9).all()
    vanilla = df[df.method == "vanilla"]
    assert (vanilla.retention == 1.0).all() and (vanilla.visual_tokens == vanilla.reference_tokens).all()
    tome = df[df.method == "tome"]
    assert (tome.visual_tokens < tome.reference_tokens).all()
    alloc = df[df.method == "resadapt_hard"]
    assert (alloc.seconds.map(lambda t: t["allocator_encode"]) > 0).all()
    assert all(len(s) == 8 for s in df[df.id == "a"].frame_scales)
    assert all(set(t) == set(E.TIMING_KEYS) for t in df.seconds)


def test_results_log_refuses_to_overwrite(tmp_path):
    path = tmp_path / "r" / "samples.jsonl"
    log = E.ResultsLog(path)
    log.write([{"a": 1}])
    with pytest.raises(FileExistsError, match="samples.jsonl"):
        E.ResultsLog(path)
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(FileNotFoundError, match="evaluate stage"):
        E.read_results(tmp_path / "missing.jsonl")


def _log_rows():
    def row(method, budget, task, score, retention, grid="main", frames=16, alloc=0.0):
        return log_row(
            grid, task, frames, method, budget, "x", score, retention, seconds={"allocator_encode": alloc}
        )

    def four(method, budget, task, scores, retention):
        return [row(method, budget, task, s, retention) | {"id": f"s{i}"} for i, s in enumerate(scores)]

    rows = four("vanilla", None, "detail_qa", (1, 1, 1, 0), 1.0)
    rows += four("fixed_scale", 0.1, "detail_qa", (1, 0, 0, 0), 0.09)
    rows += four("resadapt_hard", 0.1, "detail_qa", (1, 1, 0, 0), 0.1)
    rows += four("oracle", 0.1, "detail_qa", (1, 1, 1, 1), 0.1)
    rows += four("vanilla", None, "grounding", (0.8, 0.4, 0.6, 0.1), 1.0)
    for f, s in ((8, 0.5), (32, 0.75)):
        rows.append(row("vanilla", None, "long_video", s, 1.0, "frames", f))
        rows.append(row("resadapt_hard", 8 / f, "long_video", s, 8 / f, "frames", f, alloc=0.02))
    return rows


def test_several_seeds_make_one_table_row_their_mean_and_a_seeds_table(tmp_path):
    """ResAdapt run with two seeds' Allocators: Tables 1 and the bars see each sample's mean over the seeds
    (intervals over test samples, not seeds x samples); the seeds table gives each seed and mean +- sd."""
    base = [r for r in _log_rows() if not (r["method"] == "resadapt_hard" and r["grid"] == "main")]
    seeded = []
    for seed, scores in ((0, (1, 1, 0, 0)), (1, (1, 0, 0, 0))):
        for i, sc in enumerate(scores):
            r = log_row("main", "detail_qa", 16, "resadapt_hard", 0.1, f"s{i}", sc, 0.1, seed=seed)
            seeded.append(r)
    log = E.ResultsLog(tmp_path / "samples.jsonl")
    log.write(base + seeded)
    df = E.read_results(log.path)
    qa = SE.qa_table(df)
    assert qa.loc[(16, "resadapt_hard", "0.1"), ("detail_qa", "acc_%")] == 37.5
    assert SE.frontier(df, "detail_qa").set_index("method").loc["resadapt_hard", "n"] == 4
    a, b = SE._paired(SE._with_labels(df), ("resadapt_hard", "0.1"), ("oracle", "0.1"))
    assert a.tolist() == [1.0, 0.5, 0.0, 0.0] and b.tolist() == [1, 1, 1, 1]
    seeds = SE.seeds_table(df)
    row = seeds.loc[("main", "detail_qa", 16, "resadapt_hard", "0.1")]
    assert (row["seed 0"], row["seed 1"], row["mean"]) == (50.0, 25.0, 37.5)
    assert row["sd"] == pytest.approx(17.7, abs=0.05)
    assert SE.seeds_table(E.read_results(_write(tmp_path / "one", base))).empty


def _write(folder, rows):
    log = E.ResultsLog(folder / "samples.jsonl")
    log.write(rows)
    return log.path


def test_an_evaluator_switches_allocators_by_the_cells_seed():
    ctx = MethodContext(GEOM)
    ev = E.Evaluator(None, None, ctx, backend=object(), allocators={0: "first", 1: "second"})
    ctx.cache["x"] = 1
    ev.use_allocator(1)
    assert ctx.allocator == "second" and not ctx.cache
    ctx.cache["x"] = 1
    ev.use_allocator(1)  # the same Allocator: its cached allocations stay
    assert ctx.cache == {"x": 1}
    with pytest.raises(ValueError, match="seed 2"):
        ev.use_allocator(2)


def test_tables_and_checks_from_a_known_log(tmp_path):
    log = E.ResultsLog(tmp_path / "s.jsonl")
    log.write(_log_rows())
    df = E.read_results(log.path)
    qa = SE.qa_table(df)
    assert qa.loc[(16, "vanilla", "own"), ("detail_qa", "acc_%")] == 75.0
    low, high = qa.loc[(16, "vanilla", "own"), [("detail_qa", "low"), ("detail_qa", "high")]]
    assert 0 <= low < 75.0 < high <= 100
    assert qa.loc[(16, "resadapt_hard", "0.1"), ("all", "retention_%")] == 10.0
    assert SE.with_ci(qa).loc[(16, "oracle", "0.1"), ("detail_qa", "acc_%")] == "100.0 [100.0, 100.0]"
    g = SE.grounding_table(df).loc[(16, "vanilla", "own")]
    assert [g[("grounding", k)] for k in ("R@0.3", "R@0.5", "R@0.7", "mIoU")] == [75.0, 50.0, 25.0, 47.5]
    metrics = SE.stage_metrics(df, _params())
    assert metrics["grounding"]["16 vanilla own"]["grounding mIoU"] == 47.5
    json.dumps(metrics, default=SE.np_default)
    checks = SE.frontier_checks(df)["rows"]["resadapt_hard@0.1"]
    assert checks["accuracy"] == 0.5
    bars = checks["bars"]
    # 0.5 - 0.25 = 0.25 >= 0.15 at the point estimate, but four samples cannot decide it
    assert bars["ge_fixed_scale_plus_15_points"]["holds"]
    assert not bars["ge_fixed_scale_plus_15_points"]["holds_at_ci_low"]
    assert not bars["ge_90pct_of_oracle"]["holds"] and not bars["ge_vanilla_minus_2_points"]["holds"]
    assert bars["ge_90pct_of_oracle"]["difference"] == pytest.approx(0.5 - 0.9)
    assert metrics["oracle_bound"]["holds"] and metrics["oracle_bound"]["comparisons"] == 2
    frames = SE.frames_checks(df, 8)["rows"]["32"]
    assert frames["references"]["vanilla@8"]["relative_gain"] == pytest.approx(0.5)
    assert frames["references"]["vanilla@8"]["margin"] == pytest.approx(0.75 - 1.15 * 0.5)
    assert frames["holds_at_ci_low"]
    # every frame count and every reference is held to the same 15% bar
    ours32 = next(r for r in _log_rows() if r["method"] == "resadapt_hard" and r["frames"] == 32)
    rows = [r for r in _log_rows() if r["grid"] == "frames" and r["method"] == "vanilla"]
    rows += [dict(ours32, frames=f, budget=8 / f) for f in (32, 64)]
    rows += [dict(ours32, frames=f, budget=8 / f, method="fixed_scale", score=0.1) for f in (32, 64)]
    log = E.ResultsLog(tmp_path / "f.jsonl")
    log.write(rows)
    checks = SE.frames_checks(E.read_results(log.path), 8)["rows"]
    margins = [ref["margin"] for r in checks.values() for ref in r["references"].values()]
    assert margins == pytest.approx([0.75 - 1.15 * 0.5, 0.75 - 1.15 * 0.1] * 2)
    over = SE.overhead(df, 32)
    assert over["allocator_share"] == pytest.approx((0.02 + 0.01 + 0.01) / 0.08)  # encode, predict, budget
    assert over["speedup_over_vanilla"] == pytest.approx(0.06 / 0.08)
    lines = SE.check_lines(
        {"frontier_detail_qa": SE.frontier_checks(df), "frames_scaling": SE.frames_checks(df, 8)}
    )
    assert any("ge 90pct of oracle (vs oracle@0.1): margin -40.0 points" in line for line in lines)
    assert any("vanilla@8 50.0% (+50% relative, holds at the CI low end)" in line for line in lines)


def test_the_deterministic_row_gets_its_bars_wherever_it_landed(tmp_path):
    """The Beta-mean row is compared at the grid R nearest its retention (the higher on a tie), never at a
    grid point far below it, where the Oracle's bar would hold vacuously."""
    log = E.ResultsLog(tmp_path / "s.jsonl")
    log.write(_log_rows())
    df = E.read_results(log.path)
    refs = df[df.method.isin(["fixed_scale", "oracle"]) & (df.budget == 0.1)]
    more = [refs.assign(budget=b, retention=b - 0.01) for b in (0.15, 0.25, 0.5)]
    df = pd.concat([df, *more], ignore_index=True)
    own = df[(df.method == "resadapt_hard") & (df.budget == 0.1)].assign(method="resadapt", budget=None)
    cases = ((0.146, "0.15"), (0.18, "0.15"), (0.12, "0.1"), (0.02, "0.1"), (0.9, "0.5"))
    for retention, at in (*cases, (0.375, "0.5")):  # 0.375: exactly between 0.25 and 0.5, a tie
        rows = SE.frontier_checks(pd.concat([df, own.assign(retention=retention)], ignore_index=True))["rows"]
        assert rows["resadapt@own"]["compared_at_R"] == at, retention
        assert rows["resadapt@own"]["retention"] == retention
        assert set(rows["resadapt@own"]["bars"]) == {
            "ge_vanilla_minus_2_points",
            "ge_fixed_scale_plus_15_points",
            "ge_90pct_of_oracle",
        }


def test_the_coarse_task_holds_resadapt_to_fixed_scale_and_compares_its_spend(tmp_path):
    log = E.ResultsLog(tmp_path / "s.jsonl")
    log.write(_log_rows())
    df = E.read_results(log.path)
    own = df[(df.method == "resadapt_hard") & (df.budget == 0.1)].assign(method="resadapt", budget=None)
    detail = pd.concat([df, own.assign(retention=0.146)], ignore_index=True)
    assert SE.coarse_checks(detail) == {}, "no coarse task in the grid: nothing to check"
    coarse = detail.assign(task="coarse_qa")
    coarse.loc[coarse.method == "resadapt", "retention"] = 0.09
    checks = SE.coarse_checks(pd.concat([detail, coarse], ignore_index=True))
    assert checks["compared_at_R"] == "0.1" and checks["retention"] == 0.09
    bar = checks["bars"]["ge_fixed_scale_minus_2_points"]
    assert bar["reference"] == "fixed_scale@0.1"
    assert bar["difference"] == pytest.approx(0.5 - 0.25 + 0.02)
    assert checks["detail_task"] == "detail_qa" and checks["detail_retention"] == 0.146
    assert checks["spends_less_than_detail"]
    lines = SE.check_lines({"coarse_qa": checks})
    assert any("spends less than on detail_qa (14.6%): yes" in line for line in lines), lines


def test_a_method_above_the_oracle_beyond_its_interval_is_flagged(tmp_path):
    rows = _log_rows()
    for i in range(4, 8):  # fixed_scale: every sample right, the Oracle's 4 also right: tie, no flag
        rows[i] |= {"score": 1}
    for i in range(12, 16):  # the Oracle now wrong everywhere: fixed_scale beats it on every sample
        rows[i] |= {"score": 0}
    log = E.ResultsLog(tmp_path / "s.jsonl")
    log.write(rows)
    bound = SE.oracle_bound_checks(E.read_results(log.path))
    assert not bound["holds"]
    # fixed_scale is right where the Oracle is wrong on all 4 samples; resadapt_hard on 2 of 4: not decided
    assert [(f["method"], f["R"]) for f in bound["flags"]] == [("fixed_scale", "0.1")]


def test_seed_means_equal_to_the_oracles_score_are_not_flagged(tmp_path):
    """Three seeds' IoU 0.1 average to 0.10000000000000002, above the Oracle's 0.1 by float rounding only."""
    rows = [
        log_row("main", "grounding", 16, method, 0.1, f"s{i}", 0.1, 0.1, seed=seed)
        for i in range(4)
        for method, seeds in (("oracle", (None,)), ("resadapt_hard", (0, 1, 2)))
        for seed in seeds
    ]
    df = E.read_results(_write(tmp_path, rows))
    a, b = SE._paired(SE._with_labels(SE.seed_mean(df)), ("resadapt_hard", "0.1"), ("oracle", "0.1"))
    assert (a > b).all(), "the rounding this test is about"
    bound = SE.oracle_bound_checks(df)
    assert bound["comparisons"] == 1 and bound["holds"], bound


def test_lmms_eval_layout(tmp_path):
    from resadapt.lmms_eval import write_lmms_eval

    log = E.ResultsLog(tmp_path / "s.jsonl")
    log.write([r | {"question": "q?", "answer": "7", "prediction": "7"} for r in _log_rows()])
    files = write_lmms_eval(E.read_results(log.path), tmp_path / "lmms", date="20261130_000000")
    run = tmp_path / "lmms" / "main-vanilla-Rown-F16"
    results = json.loads((run / "20261130_000000_results.json").read_text())
    keys = {"results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"}
    assert keys | {"git_hash", "date"} == set(results)
    assert results["results"]["detail_qa"]["accuracy,none"] == 0.75
    assert results["results"]["grounding"]["miou,none"] == pytest.approx(0.475)
    assert results["n-samples"]["grounding"] == {"original": 4, "effective": 4}
    sample = json.loads((run / "20261130_000000_samples_detail_qa.jsonl").read_text().splitlines()[0])
    assert {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "accuracy"} <= set(sample)
    assert sample["filtered_resps"] == ["7"] and sample["target"] == "7"
    assert len(files) == sum(1 for _ in (tmp_path / "lmms").rglob("*.json*"))


def _params(**evaluate):
    from resadapt.config import load_params

    params = load_params("params.yaml", require_paths=False)
    return params.model_copy(update={"evaluate": params.evaluate.model_copy(update=evaluate)})


def test_stage_cells_cover_both_grids():
    params = _params()
    cells = SE.stage_cells(params)
    ev = params.evaluate
    main = [c for c in cells if c.grid == "main"]
    unbudgeted = sum(not METHODS[m].budgeted for m in ev.methods)
    once = [c for c in main if c.seed in (None, params.train.seeds[0])]
    assert len(once) == len(ev.tasks) * (unbudgeted + (len(ev.methods) - unbudgeted) * len(ev.budgets))
    # ResAdapt once per trained Allocator; frame selection with the first seed's; the rest need no Allocator
    seeds = {m: sorted({c.seed for c in main if c.method == m}, key=str) for m in ev.methods}
    assert seeds["resadapt"] == seeds["resadapt_hard"] == params.train.seeds
    assert seeds["frame_selection"] == [params.train.seeds[0]] and seeds["fixed_scale"] == [None]
    assert len(main) == len(once) + len(ev.tasks) * (1 + len(ev.budgets)) * (len(params.train.seeds) - 1)
    frames = [c for c in cells if c.grid == "frames"]
    assert {c.frames for c in frames} == set(ev.frames)
    for c in frames:
        assert c.budget is None or c.budget == pytest.approx(min(1.0, ev.frames_reference / c.frames))


def test_a_real_benchmark_is_a_source_of_both_grids(tmp_path):
    """A benchmark in its official layout (Charades-STA here, with real tiny videos) feeds the same cells."""
    from test_benchmarks import charades_sta

    from resadapt.config import BenchmarkRef
    from resadapt.data.video import write_video

    root = charades_sta(tmp_path / "charades")
    frames = np.random.default_rng(0).integers(0, 255, (12, 56, 84, 3), dtype=np.uint8)
    for vid in ("3MSZA", "AO8RW"):
        write_video(root / "Charades_v1_480" / f"{vid}.mp4", frames, 2.0, overwrite=True)  # over placeholders
    ref = BenchmarkRef(name="charades_sta", root=str(root))
    params = _params(tasks=["detail_qa"], benchmarks=[ref], num_frames=[4, 8], frames_task="charades_sta")
    cells = SE.stage_cells(params)
    assert {(c.task, c.frames) for c in cells if c.grid == "main"} == {
        (t, f) for t in ("detail_qa", "charades_sta") for f in (4, 8)
    }
    assert {c.task for c in cells if c.grid == "frames"} == {"charades_sta"}
    rows, media_root = SE.source_rows(params, "charades_sta")
    assert media_root == root and [r["task"] for r in rows] == ["grounding", "grounding"]
    samples, seconds = load_samples(rows, media_root, 8)
    assert samples[0].frames.shape == (8, 56, 84, 3) and set(seconds) == {r["id"] for r in rows}


def test_compare_results_finds_the_differing_samples(tmp_path):
    rows = _log_rows()
    for i, r in enumerate(rows):
        r |= {"id": f"x{i}", "prediction": "7", "prompt_tokens": 100}
    other = [dict(r) for r in rows]
    other[0] = other[0] | {"prediction": "3", "score": 0}  # a vanilla detail-QA row: 75% -> 50%
    logs = []
    for name, data in (("a", rows), ("b", other)):
        log = E.ResultsLog(tmp_path / f"{name}.jsonl")
        log.write(data)
        logs.append(E.read_results(log.path))
    c = SE.compare_results(*logs)
    assert c["samples"] == len(rows) and c["identical_predictions"] == pytest.approx(1 - 1 / len(rows))
    assert [d["prediction_b"] for d in c["differing"]] == ["3"]
    assert c["max_table_difference"]["qa"] == 25.0 and c["visual_tokens_equal"] == 1.0
    with pytest.raises(ValueError, match="same samples"):
        SE.compare_results(logs[0], logs[1].iloc[1:])
