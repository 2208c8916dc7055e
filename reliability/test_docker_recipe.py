"""The Docker image's recipe, proven without a Docker engine (part of ``make reliability``).

Follows the Dockerfile's CPU stage as written (read from the file, not copied here): its
``COPY`` sources into a build folder, its ``ENV``, every ``RUN`` step in a fresh virtualenv (the
package installed non-editable from a wheel built with ``pip wheel --no-deps .``), then its
``ENTRYPOINT`` + ``CMD`` with the image's paths mapped to local ones: ``pr2-serve`` runs as an
unprivileged user (``nobody``, where this machine allows) from another working directory, on
a read-only model directory (a read-only bind mount, where allowed; the model files are not
the user's either way) with a separate state directory. Checked: ``/readyz``, a generate with
routes, a push, and a restart that restores the pushed version.

Differences from a Docker build, on purpose: the ``pip install``/``pip uninstall`` steps run
through uv (``tools/uv_pip.py``: the same arguments and pip's index settings, the versions pip
would pick) with uv's download cache, which ``make venv`` filled moments before (the image sets
``PIP_NO_CACHE_DIR``): seconds instead of minutes; no ``.pyc`` files are compiled, an extra
index this machine cannot reach is left out (its wheels come from the machine's own pip
configuration), the server binds loopback on free ports, and ``useradd`` is replaced by the
existing ``nobody``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pr2_serve.client import HttpClient
from pr2_serve.server.launch import wait_ready
from pr2_serve.tiny.tiny_model import make_tiny_model
from reliability.dockerfile import local_command, run_steps, stage
from reliability.test_reliability import record
from tests.helpers import API_KEY
from tools.uv_pip import uv_command

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
IMAGE_PATHS = ("/models", "/state")


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
        return True
    except Exception:
        return False


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> None:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def base_python() -> str:
    """A Python 3.11 every user may run (the image's is ``/usr/local/bin/python3.11``; ours
    may live under a home directory the unprivileged user cannot enter)."""
    for candidate in ("/usr/local/bin/python3.11", "/usr/bin/python3.11"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys._base_executable


def _copy_sources(st, build: Path) -> None:
    """The stage's ``COPY`` lines, from the repository into ``build`` (its WORKDIR)."""
    for sources, dest in st.copies():
        for src in sources:
            target = build / dest / (Path(src).name if dest.endswith("/") else "")
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)


def through_uv(cmd: list[str], venv: Path) -> list[str]:
    """A ``pip install``/``pip uninstall`` step into ``venv`` done by uv; others unchanged."""
    if cmd[0] != f"{venv}/bin/pip" or cmd[1] not in ("install", "uninstall"):
        return cmd
    args = [a for a in cmd[2:] if a not in ("-y", "--yes")]  # uv never asks
    return uv_command(f"{venv}/bin/python", cmd[1], *args)


def install(work: Path) -> tuple[Path, dict, list[str], float]:
    """Follow the stage's COPY, ENV and RUN; return (venv bin, env, entrypoint + cmd, seconds)."""
    st = stage((ROOT / "Dockerfile").read_text(), "cpu")
    build, venv = work / "build", work / "venv"
    _copy_sources(st, build)
    env = {**os.environ, **st.env(), "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    env.pop("PIP_NO_CACHE_DIR", None)  # the download cache keeps later runs short
    env["PIP_NO_COMPILE"] = "1"  # no .pyc for ~3 GB of packages (uv compiles none either)
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    _run([base_python(), "-m", "venv", str(venv)], work, env, 120)
    steps = run_steps(st)
    indexes = {s[i + 1] for s in steps for i, a in enumerate(s) if a == "--extra-index-url"}
    drop = {u for u in indexes if not _reachable(u)}
    wheel = None
    for step in steps:
        if wheel is None and any(re.fullmatch(r"\.(\[[\w,]+\])?", a) for a in step[1:]):
            _run([f"{venv}/bin/pip", "wheel", "--no-deps", ".", "-w", "dist"], build, env, 600)
            wheel = str(next((build / "dist").glob("pr2-*.whl")))
        cmd = local_command(step, f"{venv}/bin", wheel, drop)
        if cmd is not None:
            _run(through_uv(cmd, venv), build, env, 1800)
    assert wheel is not None, "the recipe never installs the package"
    return venv / "bin", env, st.exec_form("ENTRYPOINT") + st.exec_form("CMD"), t0


def server_argv(argv: list[str], paths: dict[str, Path], venv_bin: Path) -> list[str]:
    """The image's ENTRYPOINT + CMD on this machine: loopback, free ports, local paths."""
    out = [str(venv_bin / argv[0])]
    swap = {"--host": "127.0.0.1", "--http-port": "0", "--grpc-port": "0"}
    for i, arg in enumerate(argv[1:], 1):
        prev = argv[i - 1]
        if prev in swap:
            arg = swap[prev]
        for image_path, local in paths.items():
            if arg == image_path or arg.startswith(image_path + "/"):
                arg = str(local) + arg[len(image_path) :]
        out.append(arg)
    return out


def as_unprivileged(cmd: list[str], read_only: Path, python: Path) -> tuple[list[str], str]:
    """``cmd`` as ``nobody`` with ``read_only`` bind-mounted read-only (as far as allowed)."""
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return cmd, "the test user (not root); model files read-only by permission"
    if subprocess.run([*setpriv, str(python), "-c", "pass"], capture_output=True).returncode:
        return cmd, "root: nobody cannot run this Python; model files read-only by bind mount"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{read_only}" "{read_only}"'],
        capture_output=True,
    )
    if shutil.which("unshare") and probe.returncode == 0:
        script = f'mount --bind -o ro "{read_only}" "{read_only}" && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", *setpriv, *cmd], (
            "nobody; model directory bind-mounted read-only"
        )
    return [*setpriv, *cmd], "nobody; model files owned by root"


def start(cmd: list[str], cwd: Path, env: dict, timeout: float = 300.0):
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log: list[str] = []
    try:
        http, _ = wait_ready(proc, log, timeout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
    return proc, f"http://{http}", log


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_the_cpu_image_recipe_without_docker():
    work = Path(tempfile.mkdtemp(prefix="pr2-docker-recipe-"))
    work.chmod(0o755)  # nobody must reach the venv and the model
    try:
        venv_bin, env, argv, t0 = install(work)
        install_s = time.perf_counter() - t0
        where = subprocess.run(
            [str(venv_bin / "python"), "-c", "import pr2_serve; print(pr2_serve.__file__)"],
            cwd="/",
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert "site-packages" in where and not where.startswith(str(ROOT)), where
        model = make_tiny_model(work / "models" / "model", seed=0, predictor="zero")
        for f in model.iterdir():  # as a model on a host usually is: readable by all
            f.chmod(0o644 if os.geteuid() == 0 else 0o444)  # not root: not writable either
        for d in ("state", "home", "elsewhere"):
            (work / d).mkdir()
            if os.geteuid() == 0:
                os.chown(work / d, NOBODY, NOBODY)
        paths = {"/models": work / "models", "/state": work / "state"}
        argv = server_argv(argv, paths, venv_bin)
        cmd, who = as_unprivileged(argv, work / "models", venv_bin / "python")
        run_env = {**env, "HOME": str(work / "home"), "PR2_API_KEY": API_KEY}
        before = sorted((p.name, p.stat().st_mtime_ns) for p in model.rglob("*"))
        t1 = time.perf_counter()
        proc, url, log = start(cmd, work / "elsewhere", run_env)
        start_s = time.perf_counter() - t1
        try:
            c = HttpClient(url, api_key=API_KEY)
            assert c.ready()
            res = c.generate([[5, 6, 7]], max_tokens=6, temperature=0.0)
            assert res.samples[0].routes.shape == (3 + 6 - 1, 4, 2)
            pred = {f"model.layers.{i}.mlp.predictor.weight": torch.randn(8, 64) for i in range(4)}
            assert c.push_weights(pred, 1)["weight_version"] == 1
            pushed = c.generate([[5, 6, 7]], max_tokens=6, temperature=0.0).samples[0]
        finally:
            stop(proc)
        proc, url, log = start(cmd, work / "elsewhere", run_env)
        try:
            c = HttpClient(url)
            assert any("restored weight version 1" in line for line in log), log[-20:]
            assert c.info()["weight_version"] == 1
            again = c.generate([[5, 6, 7]], max_tokens=6, temperature=0.0).samples[0]
            assert again.output_token_ids == pushed.output_token_ids
        finally:
            stop(proc)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in model.rglob("*")) == before
        assert (work / "state" / "committed.json").exists()
        record(
            "docker_recipe",
            {
                "install_seconds": round(install_s, 1),
                "server_start_seconds": round(start_s, 1),
                "server_user": who,
                "package": where,
            },
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
