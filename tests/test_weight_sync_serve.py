"""Weight agreement against a real ``pr2-serve`` (fp32): the README's Train example keeps
routing at least as well as r3, and a restarted server that restores a previous run's weights
is detected and re-synced (or refused with ``--on-mismatch fail``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import API_KEY, start_server
from trainer.run.cli import main as train_main

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

WARMUP_STEPS = 150  # the demo's warm-up, shortened: rewards vary within groups, so routers move


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A warmed-up tiny Qwen3-MoE like ``make demo``'s ``runs/demo/model``."""
    from pr2_serve.tiny.tiny_model import make_tiny_model
    from trainer.data.tasks import Task
    from trainer.experiments.warmup import warmup

    tmp = tmp_path_factory.mktemp("demo")
    base = make_tiny_model(tmp / "base", seed=0)
    task = Task("addition", digits=2)
    warmup(
        base, tmp / "model", task, max_steps=WARMUP_STEPS, eval_every=WARMUP_STEPS, progress=False
    )
    return tmp / "model"


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    """``{"srv": the running server}`` (the restart test replaces it)."""
    box = {"srv": start_server(demo_model, tmp_path_factory.mktemp("sync-state"))}
    yield box
    box["srv"].stop()


def _train(address: str, model: Path, out: Path, *flags: str) -> list[dict]:
    """The README's Train example (``--replay pr2 --off-policy-steps 2``), ``flags`` after."""
    argv = ["--servers", address, "--model-dir", str(model), "--replay", "pr2"]
    train_main([*argv, "--off-policy-steps", "2", "--output-dir", str(out), *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_readme_train_example_routes_no_worse_than_r3(server, demo_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    http = server["srv"].http
    r3 = _train(http, demo_model, tmp_path / "r3", "--steps", "4", "--replay", "r3")
    pr2 = _train(http, demo_model, tmp_path / "pr2", "--steps", "4")  # the defaults
    for a, b in zip(pr2, r3, strict=True):
        got, ref = a["zero_deviation_offpolicy"], b["zero_deviation_offpolicy"]
        assert got >= ref - 0.01, (a["step"], got, ref, [r["predictor_hit_rate"] for r in pr2])


def test_a_restarted_server_is_resynced_or_refused(
    server, demo_model, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    srv = server["srv"]
    pr2 = _train(srv.http, demo_model, tmp_path / "pr2", "--steps", "2")
    assert pr2[-1]["pushed_version"] >= 2
    srv.stop()
    server["srv"] = srv = start_server(demo_model, srv.state_dir)  # restores the last push
    restored = pr2[-1]["pushed_version"]
    assert any(f"restored weight version {restored}" in line for line in srv.log)

    cmd = [sys.executable, "-m", "trainer.run.cli", "--servers", srv.http, "--model-dir"]
    cmd += [str(demo_model), "--replay", "r3", "--on-mismatch", "fail", "--steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    for words in (srv.http, f"version {restored}", "restored from the state directory", "--fresh"):
        assert words in res.stderr, res.stderr

    capsys.readouterr()
    r3 = _train(srv.http, demo_model, tmp_path / "r3", "--steps", "2", "--replay", "r3")
    said = capsys.readouterr().out
    assert f"as version {restored + 1}" in said and "the trainer's starting weights" in said, said
    assert r3[0]["rollout_versions"] == [restored + 1]
    assert r3[0]["train_infer_kl"] < 1e-6, r3[0]["train_infer_kl"]  # matched start, fp32
    assert all(r["zero_deviation"] >= 0.99 for r in r3), [r["zero_deviation"] for r in r3]
