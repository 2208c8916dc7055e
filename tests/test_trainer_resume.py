"""``pr2-train --resume`` against a real ``pr2-serve``: a run SIGKILLed after step 2 of 5 and
resumed ends where the same run without the kill ends.

One server serves both runs; before each it goes back to the model directory's weights
(``rollback(0)``: the same weights and predictors as a fresh server, prefix cache flushed).
Rollout seeds and batches are functions of ``(seed, step)``, not of the version number, so
both runs get the same rollouts for the same weights."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from safetensors.torch import load_file

from pr2_serve.client import HttpClient
from tests.helpers import API_KEY
from trainer.checkpoint.checkpoints import checkpoint_dirs
from trainer.run.cli import main as train_main

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(zero_server):
    return zero_server  # shared with test_trainer_loop (each run first rolls it back)


def run_args(server, model_dir, out) -> list[str]:
    return [
        *("--servers", server.http, "--model-dir", str(model_dir), "--output-dir", str(out)),
        *("--replay", "pr2", "--off-policy-steps", "2", "--prompts-per-batch", "4"),
        *("--samples-per-prompt", "2", "--max-tokens", "4", "--steps", "5"),
        *("--eval-every", "0", "--lr", "1e-3", "--seed", "3"),
        *("--save-every", "1", "--keep-checkpoints", "2"),
    ]


def back_to_start(server) -> int:
    """The server on the model directory's weights again, as a new version (returned)."""
    c = HttpClient(server.http, api_key=API_KEY)
    try:
        return c.rollback(0)["weight_version"]
    finally:
        c.close()


def metrics(out) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def kill_after_step(cmd: list[str], out, step: int, log_path, deadline_s: float = 600) -> None:
    """Run ``cmd``; SIGKILL it once ``metrics.jsonl`` shows ``step`` and its checkpoint
    exists."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = any(r["step"] == step for r in metrics(out))
            if done and (out / f"checkpoint-{step}").is_dir():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        rc = proc.wait()
    assert rc == -signal.SIGKILL, f"rc={rc}: {log_path.read_text()[-3000:]}"


@pytest.mark.timeout(1500)
def test_killed_run_resumes_to_the_same_weights(server, tiny_zero, tmp_path, monkeypatch):
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    back_to_start(server)
    train_main(run_args(server, tiny_zero, whole))

    back_to_start(server)
    cmd = [sys.executable, "-m", "trainer.run.cli", *run_args(server, tiny_zero, killed)]
    kill_after_step(cmd, killed, 2, tmp_path / "killed.log")
    resumed_from = checkpoint_dirs(killed)[-1][0]
    assert 2 <= resumed_from < 5  # (the poll saw step 2; a slow poll may see a later one)
    # the server moves on meanwhile (as if restarted on its model): resume must push the
    # checkpoint's weights to it as a newer version before the next rollout
    moved_to = back_to_start(server)
    train_main([*run_args(server, tiny_zero, killed), "--resume"])

    rows, ref = metrics(killed), metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # no step twice
    pushed = [r["pushed_version"] for r in rows]
    assert all(a < b for a, b in itertools.pairwise(pushed)), pushed
    for r in rows:  # each step trained on rollouts of the version before it
        assert max(r["rollout_versions"]) < r["pushed_version"], r
    assert rows[resumed_from]["rollout_versions"] == [moved_to + 1]  # the re-sync push
    assert httpx.get(f"{server.http}/v1/info").json()["weight_version"] == pushed[-1]
    # the same rollouts and updates as the run that was not killed
    for a, b in zip(ref, rows, strict=True):
        assert (a["reward_mean"], a["loss"]) == (b["reward_mean"], b["loss"]), a["step"]
    assert [s for s, _ in checkpoint_dirs(killed)] == [4, 5]
    w_ref = load_file(str(whole / "checkpoint-5" / "model.safetensors"))
    w = load_file(str(killed / "checkpoint-5" / "model.safetensors"))
    assert w.keys() == w_ref.keys() and any(".predictor." in k for k in w)
    diff = max(float((w[k] - w_ref[k]).abs().max()) for k in w)
    assert diff <= 1e-6, diff
    print(f"resumed from step {resumed_from}; max |weight difference| {diff:.2e}")


def torchrun(args: list[str], parallel: str) -> list[str]:
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "trainer.run.cli", *args, "--parallel", parallel, "--device", "cpu"),
    ]


def run_logged(cmd: list[str], log_path) -> None:
    with open(log_path, "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    assert res.returncode == 0, log_path.read_text()[-3000:]


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
def test_killed_torchrun_run_resumes_to_the_same_weights(
    server, tiny_zero, tmp_path, monkeypatch, parallel
):
    """Two ranks (FSDP2: sharded policy and Adam state; DDP: replicated), saved with
    torch.distributed.checkpoint, SIGKILLed together after step 2 of 4 and resumed under
    torchrun: the same weights as the run without the kill."""
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    def args(out):
        return [*run_args(server, tiny_zero, out), "--steps", "4"]

    back_to_start(server)
    run_logged(torchrun(args(whole), parallel), tmp_path / "whole.log")
    back_to_start(server)
    with open(tmp_path / "killed.log", "w") as log:  # its own session: the ranks die with it
        proc = subprocess.Popen(
            torchrun(args(killed), parallel),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / "checkpoint-2").is_dir():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    resumed_from = checkpoint_dirs(killed)[-1][0]
    assert 2 <= resumed_from < 4
    assert (killed / f"checkpoint-{resumed_from}" / "dcp").is_dir()  # every rank's shards
    back_to_start(server)
    run_logged(torchrun([*args(killed), "--resume"], parallel), tmp_path / "resumed.log")
    rows, ref = metrics(killed), metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(ref, rows, strict=True):
        assert (a["reward_mean"], a["loss"]) == (b["reward_mean"], b["loss"]), a["step"]
    w_ref = load_file(str(whole / "checkpoint-4" / "model.safetensors"))
    w = load_file(str(killed / "checkpoint-4" / "model.safetensors"))
    assert w.keys() == w_ref.keys()
    diff = max(float((w[k] - w_ref[k]).abs().max()) for k in w)
    assert diff <= 1e-6, diff
    print(f"{parallel}: resumed from step {resumed_from}; max |weight difference| {diff:.2e}")
