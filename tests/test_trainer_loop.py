"""Full iterations (rollout -> train -> push -> rollout on the new version) against a real
``pr2-serve`` for each replay mode, through the ``pr2-train`` CLI."""

from __future__ import annotations

import json

import pytest

from tests.helpers import API_KEY
from trainer.run.cli import main as train_main

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(zero_server):
    return zero_server  # shared with test_trainer_resume


@pytest.mark.parametrize("mode", ["none", "r2", "r3", "pr2"])
def test_two_iterations_per_mode(server, tiny_zero, tmp_path, mode, monkeypatch):
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    out = tmp_path / mode
    address = server.http if mode in ("none", "r2") else f"grpc://{server.grpc}"
    train_main(
        [
            "--servers",
            address,
            "--model-dir",
            str(tiny_zero),
            "--replay",
            mode,
            "--predictor",
            "learned",
            "--off-policy-steps",
            "2",
            "--prompts-per-batch",
            "4",
            "--samples-per-prompt",
            "2",
            "--max-tokens",
            "4",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--eval-size",
            "4",
            "--output-dir",
            str(out),
            "--lr",
            "1e-3",
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    first, second = rows
    assert second["rollout_versions"] == [first["pushed_version"]]
    assert second["pushed_version"] == first["pushed_version"] + 1
    for key in (
        "reward_mean",
        "zero_deviation",
        "train_infer_kl",
        "clip_fraction",
        "grad_norm",
        "predictor_hit_rate",
        "time_rollout",
        "time_push",
    ):
        assert second[key] is not None, key
    assert sum(second["deviation_hist"]) > 0
    assert "eval_accuracy" in second
    # the server selects exactly what the trainer predicts with the predictor it pushed
    assert second["server_route_agreement"] >= 0.999, second["server_route_agreement"]
    if mode == "pr2":
        assert second["predictor_loss"] is not None
    if mode in ("r3", "pr2"):  # replaying the server's routes: old pass == server
        assert first["train_infer_abs_dlogp"] < 1e-4
        assert first["first_ratio_max_dev"] == 0.0


def alternating_reward(prompts, completions, completion_ids, **_) -> list[float]:
    """1, 0, 1, 0, ...: every GRPO group of 2 has non-zero advantages, so the router moves
    (the toy reward of an untrained model is 0 everywhere: no gradient, a zero look-ahead)."""
    return [float(i % 2 == 0) for i in range(len(completions))]


@pytest.mark.parametrize(
    "flags",
    [["--predictor-scale", "auto"], ["--predictor", "lookahead", "--predictor-scale", "0.5"]],
    ids=["auto", "lookahead"],
)
def test_served_predictor_reaches_the_server(server, tiny_zero, tmp_path, flags, monkeypatch):
    """pr2 with the served predictor scaled: the server selects exactly what the
    trainer predicts with alpha x (W_p or the Adam look-ahead) it pushed; alpha logged."""
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    out = tmp_path / flags[-1]
    args = ["--servers", server.http, "--model-dir", str(tiny_zero), "--replay", "pr2"]
    args += ["--predictor", "learned"]
    args += ["--off-policy-steps", "2", "--prompts-per-batch", "4", "--samples-per-prompt", "2"]
    args += ["--max-tokens", "4", "--steps", "2", "--eval-every", "0", "--lr", "1e-3"]
    args += ["--reward", "tests.test_trainer_loop:alternating_reward"]
    train_main([*args, *flags, "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["predictor_scale"] <= 1.0 for r in rows), rows
    assert rows[1]["predictor_scale_served"] == rows[0]["predictor_scale"]
    assert rows[1]["server_route_agreement"] >= 0.999, rows[1]
    assert len(rows[1]["zero_deviation_per_mini_step"]) == 2
    if "lookahead" in flags:  # the second rollout really ran with a non-zero served predictor
        assert rows[1]["predictor_scale_served"] == 0.5 and rows[1]["predictor_loss"] is None
        assert rows[1]["predictor_scale_fit"] is not None


def requests_served(srv) -> float:
    """The server's ``pr2_requests_total``, summed over its labels."""
    import httpx

    text = httpx.get(f"{srv.http}/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("pr2_requests_total")
    )


def test_rollouts_spread_over_two_servers(server, second_server, tiny_zero, tmp_path, monkeypatch):
    """Two CPU servers (the session's): rollouts come from both, both get every push, versions
    agree."""
    import httpx

    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    a, b = server, second_server
    before = [requests_served(srv) for srv in (a, b)]
    out = tmp_path / "two"
    args = ["--servers", a.http, f"grpc://{b.grpc}", "--model-dir", str(tiny_zero)]
    args += ["--replay", "pr2", "--off-policy-steps", "2", "--prompts-per-batch", "4"]
    args += ["--samples-per-prompt", "2", "--max-tokens", "4", "--steps", "2"]
    train_main([*args, "--eval-every", "0", "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["rollout_versions"] == [rows[0]["pushed_version"]]
    for srv, was in zip((a, b), before, strict=True):
        info = httpx.get(f"{srv.http}/v1/info").json()
        assert info["weight_version"] == rows[-1]["pushed_version"]
        # each server answered rollouts of both steps
        assert requests_served(srv) - was >= 2, httpx.get(f"{srv.http}/metrics").text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_fsdp2_against_a_server(server, tiny_zero, tmp_path):
    """``torchrun`` with 2 ranks and ``--parallel fsdp2``: the weights gathered from the shards
    and pushed are the trainer's (the next rollout's log-probs and predictor routes match the
    trainer's own), and every step lands as a new version."""
    import os
    import subprocess
    import sys

    import httpx

    out = tmp_path / "fsdp2"
    v0 = httpx.get(f"{server.http}/v1/info").json()["weight_version"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "trainer.run.cli", "--servers", server.http, "--model-dir", str(tiny_zero)]
    cmd += ["--replay", "pr2", "--predictor", "learned", "--parallel", "fsdp2"]
    cmd += ["--off-policy-steps", "2"]
    cmd += ["--prompts-per-batch", "4", "--samples-per-prompt", "2", "--max-tokens", "4"]
    cmd += ["--steps", "2", "--eval-every", "0", "--output-dir", str(out), "--lr", "1e-3"]
    subprocess.run(cmd, check=True, timeout=500, env={**os.environ, "PR2_API_KEY": API_KEY})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # v0 + 1 when the server held an earlier test's weights: rank 0 pushed the start (sync.py)
    [start] = rows[0]["rollout_versions"]
    assert start in (v0, v0 + 1)
    assert [r["pushed_version"] for r in rows] == [start + 1, start + 2]
    assert rows[1]["rollout_versions"] == [start + 1]
    assert httpx.get(f"{server.http}/v1/info").json()["weight_version"] == start + 2
    # rollout 2 came from the pushed (gathered) weights: replaying its routes reproduces the
    # server's log-probs, and the server picked exactly the trainer's predictor routes
    assert rows[1]["train_infer_abs_dlogp"] < 1e-4, rows[1]
    assert rows[1]["server_route_agreement"] >= 0.999, rows[1]
    assert rows[1]["predictor_loss"] is not None


def test_bf16_trainer_against_an_fp32_server(server, tiny_zero, tmp_path, monkeypatch, capsys):
    """``--dtype bfloat16`` (autocast) against the fp32 server: the start-up line shows both
    precisions, the run completes, and the engine mismatch is measured -- a train-infer KL > 0
    even while replaying the server's routes (r3; 0 up to float noise for an fp32 trainer, see
    above), and R2 != R3: some (token, layer) where the server's route is not the trainer's own
    top-k (``r2_vs_r3_deviation_hist`` beyond bin 0)."""
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    out = tmp_path / "bf16"
    args = ["--servers", server.http, "--model-dir", str(tiny_zero), "--replay", "r3"]
    args += ["--dtype", "bfloat16", "--device", "cpu", "--off-policy-steps", "2"]
    args += ["--prompts-per-batch", "8", "--samples-per-prompt", "2", "--max-tokens", "8"]
    train_main([*args, "--steps", "2", "--eval-every", "0", "--output-dir", str(out)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("precision:"))
    assert "vs trainer bfloat16 autocast" in line, line
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train_infer_kl"] > 0 for r in rows), rows
    assert sum(sum(r["r2_vs_r3_deviation_hist"][1:]) for r in rows) > 0, rows
    print({k: [r[k] for r in rows] for k in ("train_infer_kl", "r2_vs_r3_deviation_hist")})
