"""A reused experiment server gives a cell the same metrics as a fresh one (real pr2-serve).

The grid starts one server per setting and runs every cell against it: a cell's trainer pushes
its starting weights (zero predictor outside pr2) when the server's fingerprints differ
(trainer/rollouts/weight_agreement.py). Here a pr2 cell runs on a fresh server, then an r3 cell of
another seed
moves the server's weights, then the same pr2 cell runs again on the reused server: its metrics
(rollouts, deviation, losses) must be the same."""

from __future__ import annotations

import json

import pytest

from trainer.experiments.grid import CellKey, Setting
from trainer.experiments.grid_run import ServerCache, run_cell

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SKIP = ("time_", "weight_version", "rollout_versions", "pushed_version", "live_servers")


def metrics_rows(out, key: CellKey) -> list[dict]:
    path = out / "cells" / "-".join(map(str, key)) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]


def test_reused_server_gives_a_cell_the_same_metrics_as_a_fresh_one(tiny_zero, tmp_path):
    setting = Setting(
        "T",
        "test",
        variants=(),
        off_policy=(2,),
        seeds=(0,),
        steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        eval_size=8,
        load_balance_coef=0.1,
    )
    pr2, r3 = CellKey("T", "pr2", 2, 0), CellKey("T", "r3", 2, 1)
    with ServerCache(tmp_path) as servers:
        cell = run_cell(servers, tmp_path, setting, pr2, model_dir=tiny_zero)
        fresh = metrics_rows(tmp_path, pr2)
        run_cell(servers, tmp_path, setting, r3, model_dir=tiny_zero)
        run_cell(servers, tmp_path, setting, pr2, model_dir=tiny_zero)
        reused = metrics_rows(tmp_path, pr2)
        assert servers.starts == 1
    assert cell["steps"] == 2 and cell["load_balance"] is not None
    assert len(fresh) == 2 and fresh == reused
