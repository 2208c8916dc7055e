"""Pieces of ``make demo`` / ``make experiment`` that need no server: warm-up, plots, report
(the report generator itself: tests/test_experiment_grid.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data.tasks import Task
from trainer.experiments.cell_summary import instability_events
from trainer.experiments.plots import plot_run
from trainer.experiments.report import load, render, replace_section
from trainer.experiments.warmup import warmup

ROOT = Path(__file__).resolve().parents[1]


def fake_rows(n=12, reward=0.2):
    return [
        {
            "step": i + 1,
            "reward_mean": reward + 0.01 * i,
            "zero_deviation": 0.9,
            "zero_deviation_offpolicy": 0.85,
            "train_infer_kl": 1e-8,
            "grad_norm": 1.0,
            "deviation_hist": [90, 8, 2],
            "predictor_hit_rate": 0.9,
            "zero_predictor_hit_rate": 0.8,
            "eval_accuracy": 0.3 if i % 4 == 3 else None,
        }
        for i in range(n)
    ]


def test_warmup_saves_a_loadable_checkpoint(tiny_zero, tmp_path):
    res = warmup(
        tiny_zero,
        tmp_path / "w",
        Task("count", 1),
        max_steps=3,
        eval_every=3,
        eval_size=2,
        progress=False,
    )
    assert res.steps == 3 and (tmp_path / "w" / "model.safetensors").exists()
    assert (tmp_path / "w" / "tokenizer.json").exists()


def test_plot_is_a_png(tmp_path):
    path = plot_run(fake_rows(), tmp_path / "m.png", eval_baseline=0.25)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_instability_events():
    rows = fake_rows(20, reward=0.5)
    assert instability_events(rows) == {"reward_collapse": 0, "grad_norm_spike": 0, "nan": 0}
    for r in rows[10:]:
        r["reward_mean"] = 0.0
    rows[3]["grad_norm"] = 50.0
    rows[4]["loss"] = float("nan")
    ev = instability_events(rows)
    assert ev == {"reward_collapse": 1, "grad_norm_spike": 1, "nan": 1}


def test_results_page_matches_the_committed_results():
    results = ROOT / "results" / "experiment" / "results.json"
    if not results.exists():
        pytest.fail("results/experiment/results.json is missing: run `make experiment`")
    page = (ROOT / "docs" / "results.md").read_text()
    body = render(load(results), "results/experiment/results.json", "../results/experiment")
    assert page == replace_section(page, body), "docs/results.md is stale: run `make report`"


def test_demo_stops_the_server_on_ctrl_c(tmp_path, monkeypatch):
    """``make demo`` interrupted (Ctrl-C) mid-training leaves no server running. (An error
    takes the same ``finally``; KeyboardInterrupt is the one an ``except Exception`` misses.)
    The server is a stand-in process: what is tested is the demo's ``finally``, not vLLM."""
    fault = KeyboardInterrupt
    import shutil
    import subprocess
    import sys

    import trainer.experiments.demo as demo
    from pr2_serve.server import launch
    from pr2_serve.tiny.tiny_model import make_tiny_model

    make_tiny_model(tmp_path / "demo" / "model", seed=0)  # a "warmed-up" checkpoint: reused
    started = []

    def start(model_dir, state_dir, *a, **kw):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        started.append(launch.Server(proc, "http://127.0.0.1:9", "127.0.0.1:9", state_dir))
        return started[-1]

    def boom(*a, **kw):
        assert started[0].proc.poll() is None  # the server is up while training
        raise fault("stop")

    monkeypatch.setattr(launch, "start_server", start)
    monkeypatch.setattr(demo, "_train", boom)
    try:
        with pytest.raises(fault):
            demo.main(["--out", str(tmp_path / "demo"), "--steps", "1"])
        assert len(started) == 1 and started[0].proc.poll() is not None  # stopped, not orphaned
    finally:
        for s in started:
            s.proc.kill()
    shutil.rmtree(tmp_path / "demo", ignore_errors=True)
