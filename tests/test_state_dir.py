"""The server's state directory is its own; the model directory is only read. Bad start-up
settings are one line naming the path and the flag, a non-zero exit and no traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pr2_serve.server.launch import wait_ready
from pr2_serve.server.server_config import default_state_dir, parse_args
from pr2_serve.server.startup import StartupError, check_model_dir, check_state_dir
from tests.helpers import API_KEY


# -- where the state goes ------------------------------------------------------------------------
def test_default_state_dir_is_per_user_and_per_model(tmp_path):
    model = tmp_path / "models" / "qwen"
    model.mkdir(parents=True)
    xdg = default_state_dir(model, {"XDG_STATE_HOME": "/var/xdg", "HOME": "/home/u"})
    assert xdg.parent == Path("/var/xdg/pr2") and re.fullmatch(r"qwen-[0-9a-f]{8}", xdg.name)
    home = default_state_dir(model, {"HOME": "/home/u"})
    assert home == Path("/home/u/.local/state/pr2") / xdg.name
    assert default_state_dir(model, {"XDG_STATE_HOME": "rel", "HOME": "/h"}).parent == Path(
        "/h/.local/state/pr2"
    )  # a relative XDG_STATE_HOME is ignored (the spec says so)
    other = tmp_path / "elsewhere" / "qwen"
    other.mkdir(parents=True)
    assert default_state_dir(other, {"HOME": "/home/u"}) != home  # same name, another model
    (tmp_path / "link").symlink_to(model)
    assert default_state_dir(tmp_path / "link", {"HOME": "/home/u"}) == home  # resolved
    assert not default_state_dir(model).is_relative_to(model)


def test_flags():
    cfg = parse_args(["--model", "m"])
    assert (cfg.state_dir, cfg.fresh, cfg.keep_versions) == (None, False, 2)
    cfg = parse_args(["--model", "m", "--fresh", "--keep-versions", "5", "--state-dir", "s"])
    assert (cfg.state_dir, cfg.fresh, cfg.keep_versions) == ("s", True, 5)


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (path / "model.safetensors").write_bytes(b"")
    return path


def _file(p: Path) -> None:
    p.write_text("x")


def _bad_json(p: Path) -> None:
    _model(p)
    (p / "config.json").write_text("{")


def _no_model_type(p: Path) -> None:
    _model(p)
    (p / "config.json").write_text("{}")


def _no_weights(p: Path) -> None:
    _model(p)
    (p / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: None, "does not exist (--model)"),
        (_file, "is not a directory"),
        (Path.mkdir, "no config.json (--model)"),
        (_bad_json, "not readable JSON"),
        (_no_model_type, "no model_type"),
        (_no_weights, "no *.safetensors"),
    ],
)
def test_not_a_model(tmp_path, make, words):
    path = tmp_path / "m"
    make(path)
    with pytest.raises(StartupError, match=re.escape(words)) as e:
        check_model_dir(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_state_dir_inside_the_model_is_refused(tmp_path):
    model = _model(tmp_path / "m").resolve()
    with pytest.raises(StartupError, match=r"inside the model directory .* --state-dir"):
        check_state_dir(model / ".pr2-state", model)
    assert check_state_dir(tmp_path / "s" / "deep", model) == (tmp_path / "s" / "deep").resolve()
    assert not any(model.glob(".write-probe*")) and not any((tmp_path / "s").rglob(".write*"))


# -- the command line, in a subprocess ------------------------------------------------------------
def _can_bind_read_only() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = Path("/tmp") / f"pr2-ro-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        out = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {probe} {probe} && touch {probe}/x"],
            capture_output=True,
            text=True,
        )
        return out.returncode != 0 and "Read-only" in out.stderr
    finally:
        shutil.rmtree(probe, ignore_errors=True)


RO_BIND = _can_bind_read_only()


def read_only(paths: list[Path], cmd: list[str]) -> list[str]:
    """``cmd`` run with ``paths`` read-only: bind-mounted read-only in a private mount
    namespace (root), or with write permission removed (any other user)."""
    if RO_BIND:
        mounts = " && ".join(f'mount --bind -o ro "{p}" "{p}"' for p in paths)
        return ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]
    if os.geteuid() == 0:
        pytest.skip("root without a private mount namespace: cannot make a directory read-only")
    for p in paths:
        subprocess.run(["chmod", "-R", "a-w", str(p)], check=True)
    return cmd


def full_disk(path: Path, cmd: list[str]) -> list[str]:
    """``cmd`` with ``path`` on a full file system (a 1 MiB tmpfs, filled)."""
    if not RO_BIND:
        pytest.skip("needs root and a private mount namespace for a small tmpfs")
    fill = (
        f'mount -t tmpfs -o size=1m tmpfs "{path}" && '
        f'(dd if=/dev/zero of="{path}/fill" bs=64k 2>/dev/null; true)'
    )
    return ["unshare", "-m", "sh", "-c", f'{fill} && exec "$@"', "sh", *cmd]


def serve_cmd(model, *flags: str) -> list[str]:
    return [sys.executable, "-m", "pr2_serve.server.main", "--model", str(model), *flags]


def run_start(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pr2-serve: error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_missing_or_not_a_model(tmp_path):
    out = run_start(serve_cmd(tmp_path / "nope", "--state-dir", str(tmp_path / "s")))
    assert_one_line_error(out, str(tmp_path / "nope"), "does not exist", "--model")
    (tmp_path / "empty").mkdir()
    out = run_start(serve_cmd(tmp_path / "empty", "--state-dir", str(tmp_path / "s")))
    assert_one_line_error(out, str(tmp_path / "empty"), "no config.json", "--model")


def test_unwritable_state_dir(tmp_path):
    model, state = _model(tmp_path / "m"), tmp_path / "state"
    state.mkdir()
    out = run_start(read_only([state], serve_cmd(model, "--state-dir", str(state))))
    assert_one_line_error(out, str(state.resolve()), "not writable", "--state-dir")


def test_default_state_dir_unwritable(tmp_path):
    """The default (per-user) location cannot be created: the message names it and the flag."""
    model, xdg = _model(tmp_path / "m"), tmp_path / "xdg"
    xdg.mkdir()
    out = run_start(read_only([xdg], serve_cmd(model)), env={"XDG_STATE_HOME": str(xdg)})
    assert_one_line_error(out, str(xdg.resolve() / "pr2"), "--state-dir")


def test_full_disk_at_start(tmp_path):
    model, state = _model(tmp_path / "m"), tmp_path / "state"
    state.mkdir()
    out = run_start(full_disk(state, serve_cmd(model, "--state-dir", str(state))))
    assert_one_line_error(out, str(state.resolve()), "is full", "--state-dir")


def test_unreadable_weights(tmp_path):
    """Model files the server's user cannot read (e.g. 0600, owned by another user)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to run the server as another user")
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="pr2-unreadable-"))
    try:
        work.chmod(0o755)
        model, state = _model(work / "m"), work / "state"
        model.chmod(0o755)
        (model / "config.json").chmod(0o644)
        (model / "model.safetensors").chmod(0o600)
        state.mkdir()
        os.chown(state, 65534, 65534)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        out = run_start([*cmd, *serve_cmd(model, "--state-dir", str(state))])
        assert_one_line_error(out, str(model / "model.safetensors"), "permission denied", "--model")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_state_dir_inside_the_model_and_bad_keep_versions(tmp_path):
    model = _model(tmp_path / "m")
    out = run_start(serve_cmd(model, "--state-dir", str(model / "state")))
    assert_one_line_error(out, str(model.resolve()), "only read", "--state-dir")
    out = run_start(serve_cmd(model, "--state-dir", str(tmp_path / "s"), "--keep-versions", "0"))
    assert_one_line_error(out, "--keep-versions must be >= 1")
    assert not (model / "state").exists()


# -- a real server on a read-only model directory ------------------------------------------------
def _serve(cmd: list[str], env: dict, timeout: float = 240.0):
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PR2_API_KEY": API_KEY, **env},
    )
    log: list[str] = []
    http, _grpc = wait_ready(proc, log, timeout)
    return proc, f"http://{http}", log


@pytest.mark.vllm
@pytest.mark.slow
def test_read_only_model_dir_serves_with_its_own_state(tiny_zero, tmp_path):
    """Read-only model, default state dir (per user): serves, takes a push into the state
    dir only; ``--fresh`` then starts on the model's weights and says so."""
    import torch

    from pr2_serve.client import HttpClient

    model = tmp_path / "model"
    shutil.copytree(tiny_zero, model)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.rglob("*"))
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    flags = ["--http-port", "0", "--grpc-port", "0", "--dtype", "float32", "--max-model-len", "256"]
    state = default_state_dir(model, {**os.environ, **env})
    proc, url, log = _serve(read_only([model], serve_cmd(model, *flags)), env)
    try:
        assert any(f"no committed weights in {state}" in x for x in log), log[-20:]
        c = HttpClient(url, api_key=API_KEY)
        pred = {f"model.layers.{i}.mlp.predictor.weight": torch.randn(8, 64) for i in range(4)}
        assert c.push_weights(pred, 1)["weight_version"] == 1
        assert (state / "committed.json").exists()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, "".join(log[-30:])
    proc, url, log = _serve(read_only([model], serve_cmd(model, *flags, "--fresh")), env)
    try:
        assert any("--fresh: forgot committed version 1" in x for x in log), log[-20:]
        assert HttpClient(url).info()["weight_version"] == 0
    finally:
        proc.terminate()
        proc.wait(60)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.rglob("*")) == before


def test_start_up_checks_run_before_vllm_is_imported():
    """A bad start-up flag fails in well under a second: ``pr2_serve.server.main`` imports neither
    vLLM nor torch until the checks have passed (the service imports them in ``serve``)."""
    code = "import sys, pr2_serve.server.main; print(sorted({'vllm', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
