"""The experiment grid without a server: cell list, resume, variants' config fields, partial
labelling, summaries, the imbalanced warm start's router bias, and the report generated from a
synthetic results file (tables, goal lines, plots)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.experiments import cell_summary, report
from trainer.experiments import grid_run as experiment
from trainer.experiments.grid import (
    SETTINGS,
    VARIANTS,
    CellKey,
    MissingFeature,
    grid_cells,
    pending,
)
from trainer.experiments.imbalance import bias_routers, expert_load
from trainer.run.config import TrainConfig


# -- cell list and resume --------------------------------------------------------------------------
def test_the_grid_is_the_issues_grid():
    a = grid_cells([SETTINGS["A"]])
    assert len(a) == 3 * 3 * 2
    assert {c.variant for c in a} == {"r3", "pr2", "pr2-auto"}
    assert {c.off_policy_steps for c in a} == {2, 4, 8}
    b = grid_cells([SETTINGS["B"]])
    main = b
    assert len(main) == 5 * 2 * 3
    assert {c.variant for c in main} == {"r3", "pr2", "pr2-c0.03", "ridge", "lookahead"}
    assert len(set(a + b)) == len(a + b)
    assert SETTINGS["B"].load_balance_coef > 0 and SETTINGS["B"].imbalance_bias > 0
    assert SETTINGS["A"].load_balance_coef == 0 and not SETTINGS["A"].imbalance_bias
    # A's predictor lr as it was: x 10 of the base lr with the router at x 30
    assert SETTINGS["A"].predictor_lr_ratio * SETTINGS["A"].router_lr_multiplier == 10
    c = SETTINGS["C"]  # the paper's routing regime at toy size
    assert (c.experts, c.top_k, c.router_lr_multiplier) == (32, 4, 1.0)
    assert {k.off_policy_steps for k in grid_cells([c])} == {2, 8}


def test_warm_starts_are_a_fixed_number_of_steps(tmp_path):
    """The warm-up's length does not depend on a noisy eval: the same steps every time."""
    from pr2_serve.tiny.tiny_model import make_tiny_model
    from trainer.data.tasks import Task
    from trainer.experiments.warmup import warmup

    base = make_tiny_model(tmp_path / "base", seed=0)
    res = warmup(
        base,
        tmp_path / "w",
        Task("addition", 2),
        target_accuracy=None,
        max_steps=3,
        eval_every=1,
        eval_size=2,
        progress=False,
    )
    assert res.steps == 3


def test_pending_skips_finished_cells_in_order():
    cells = grid_cells([SETTINGS["A"]])
    done = [{**cells[i]._asdict(), "x": 1} for i in (0, 3, 5)]
    left = pending(cells, done)
    assert left == [c for i, c in enumerate(cells) if i not in (0, 3, 5)]
    assert pending(cells, [{**c._asdict()} for c in cells]) == []


def test_variants_set_only_fields_that_exist():
    plain = {f.name for f in dataclasses.fields(TrainConfig)} - {"predictor", "predictor_scale"}
    assert VARIANTS["r3"].config_fields(plain) == {"replay": "r3", "dtype": "float32"}
    assert VARIANTS["r2-bf16"].config_fields(plain)["dtype"] == "bfloat16"
    with pytest.raises(MissingFeature, match="predictor_scale"):
        VARIANTS["pr2-auto"].config_fields(plain | {"predictor"})
    with pytest.raises(MissingFeature, match="'predictor'"):
        VARIANTS["lookahead"].config_fields(plain)
    full = plain | {"predictor", "predictor_scale"}
    assert VARIANTS["pr2-auto"].config_fields(full)["predictor_scale"] == "auto"
    assert VARIANTS["lookahead"].config_fields(full) == {
        "replay": "pr2",
        "dtype": "float32",
        "predictor": "lookahead",
    }


def test_cell_config_carries_the_setting(tmp_path):
    key = CellKey("B", "r3", 8, 2)
    cfg = experiment.cell_config(SETTINGS["B"], key, tmp_path, "http://x:1", "k", tmp_path / "c")
    assert (cfg.replay, cfg.off_policy_steps, cfg.seed) == ("r3", 8, 2)
    assert cfg.load_balance_coef == SETTINGS["B"].load_balance_coef
    assert cfg.router_lr_multiplier == SETTINGS["B"].router_lr_multiplier and cfg.steps == 40
    assert cfg.predictor_lr_ratio == SETTINGS["B"].predictor_lr_ratio
    tuned = CellKey("C", "pr2-c0.03", 8, 0)
    cfg = experiment.cell_config(SETTINGS["C"], tuned, tmp_path, "http://x:1", "k", tmp_path)
    assert cfg.predictor_lr_ratio == 0.03 and cfg.lr == SETTINGS["C"].lr
    assert cfg.predictor == "learned"  # not the trainer's default (the look-ahead)


# -- results file ----------------------------------------------------------------------------------
def fake_rows(steps: int, off: int, zd: float, alpha: bool) -> list[dict]:
    return [
        {
            "step": s,
            "reward_mean": 0.3,
            "grad_norm": 1.0,
            "deviation_hist": [90, 10, 0],
            "r2_vs_r3_deviation_hist": [99, 1, 0],
            "zero_deviation": zd + 0.01,
            "zero_deviation_offpolicy": zd,
            "zero_deviation_per_mini_step": [1.0] + [zd] * (off - 1),
            "predictor_scale": 0.5 + 0.01 * s if alpha else None,
            "load_balance": 4.5,
            "router_drift_cos_lag1": 0.8 if s > 1 else None,
            "router_drift_cos_lag2": 0.75 if s > 2 else None,
            "router_drift_cos_lag3": 0.7 if s > 3 else None,
            "train_infer_kl": 1e-9,
            **({"eval_accuracy": 0.25} if s == steps else {}),
        }
        for s in range(1, steps + 1)
    ]


ZD = {"none": 0.88, "r3": 0.90, "pr2": 0.93, "pr2-auto": 0.92, "lookahead": 0.91}


def synthetic_results(tmp_path, keys) -> dict:
    cells = []
    for k in keys:
        zd = ZD.get(k.variant, 0.9) + 0.002 * k.seed
        rows = fake_rows(6, k.off_policy_steps, zd, k.variant == "pr2-auto")
        cells.append(
            {
                **k._asdict(),
                "replay": VARIANTS[k.variant].replay,
                **cell_summary.summarize_cell(rows, 10.0),
            }
        )
    total = len(grid_cells(list(SETTINGS.values())))
    return experiment.write_results(
        tmp_path / "results.json", list(SETTINGS.values()), cells, total
    )


def test_summary_and_partial_label(tmp_path):
    keys = grid_cells([SETTINGS["B"]])[:4]
    res = synthetic_results(tmp_path, keys)
    assert res["partial"] and res["cells_done"] == 4
    c = res["cells"][0]
    assert c["zero_deviation_per_mini_step"] == pytest.approx([1.0] + [0.90] * 7)
    assert c["router_drift_cos_lag3"] == pytest.approx(0.7)
    assert c["r2_vs_r3_zero_deviation"] == pytest.approx(0.99)
    assert c["final_eval_accuracy"] == 0.25 and len(c["series"]["router_drift_cos_lag1"]) == 6
    agg = res["aggregates"][0]
    assert agg["seeds"] == [0, 1, 2] and agg["zero_deviation_offpolicy_spread"] == (
        pytest.approx(0.004)
    )
    every = grid_cells(list(SETTINGS.values()))
    assert not synthetic_results(tmp_path, every)["partial"]


# -- report ----------------------------------------------------------------------------------------
def test_report_from_a_synthetic_results_file(tmp_path):
    res = synthetic_results(tmp_path, grid_cells(list(SETTINGS.values())))
    loaded = {"results": res, "tuning": None, "investigation": None}
    text = report.render(loaded, "results/experiment/results.json")
    assert "Partial" not in text
    assert "**Setting A**" in text and "**Setting B**" in text
    assert "| pr2-auto | 8 | 92.1 ± 0.2 |" in text  # mean over seeds 0, 1 ± spread
    # B: best PR2 variant pr2 (93.2) vs r3 (90.2) at 8, spread 0.4 → met; at 2 not below
    assert "best PR2 variant at off-policy 8 is **pr2**" in text
    assert "→ met at 8" in text and "met (not below)" in text
    assert "- Setting A: pr2-auto vs r3" in text and "NOT met" not in text
    assert text == report.render(loaded, "results/experiment/results.json")  # deterministic
    from trainer.experiments.report_plots import plot_all

    paths = plot_all(res, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_report_goal_not_met_and_partial(tmp_path):
    keys = [k for k in grid_cells([SETTINGS["B"]]) if k.variant in ("r3", "pr2")]
    res = synthetic_results(tmp_path, keys)
    for c in res["cells"]:  # pr2 now below r3 everywhere
        if c["variant"] == "pr2":
            c["zero_deviation_offpolicy"] -= 0.05
    res["aggregates"] = cell_summary.aggregate(res["cells"])
    text = report.render({"results": res}, "r.json")
    assert f"**Partial results: {len(keys)} of" in text
    assert "→ NOT met at 8" in text and "NOT met (below)" in text
    assert "Setting A: not measured yet" in text


def test_report_rewrites_the_readme_section(tmp_path):
    synthetic_results(tmp_path, grid_cells([SETTINGS["A"]])[:2])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nSTALE TEXT\n{report.END}\nrest\n")
    report.main([str(tmp_path / "results.json"), str(readme)])
    text = readme.read_text()
    assert "STALE TEXT" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert (tmp_path / "drift_cosines.png").exists()
    report.main([str(tmp_path / "results.json"), str(readme), "--check"])  # up to date


# -- imbalanced warm start -------------------------------------------------------------------------
def test_bias_routers_raises_favoured_logits_on_the_mean_input():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(8, 16, generator=g) for _ in range(2)]
    h = [torch.randn(16, generator=g) for _ in range(2)]
    new = bias_routers(w, h, [0, 3], 2.5)
    for w0, w1, hm in zip(w, new, h, strict=True):
        delta = (w1 - w0) @ hm
        assert delta[[0, 3]] == pytest.approx(torch.tensor([2.5, 2.5]), abs=1e-5)
        assert torch.equal(w1[[1, 2, 4, 5, 6, 7]], w0[[1, 2, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match="expert 9"):
        bias_routers(w, h, [9], 1.0)
    assert expert_load([torch.tensor([[0, 1], [0, 2]])], 4) == [[0.5, 0.25, 0.25, 0.0]]


def test_a_collapsed_cell_is_flagged_in_the_table():
    rows = fake_rows(10, 8, 0.9, False)
    for r in rows[-5:]:
        r["reward_mean"] = 0.01  # from 0.3 to 0.01: learning collapsed
    bad = cell_summary.summarize_cell(rows, 1.0)
    good = cell_summary.summarize_cell(fake_rows(10, 8, 0.9, False), 1.0)
    assert bad["collapsed"] and not good["collapsed"]
    cells = [
        {**CellKey("B", "r3", 8, s)._asdict(), "replay": "r3", **c}
        for s, c in enumerate((bad, good))
    ]
    table = "\n".join(report.setting_table(cell_summary.aggregate(cells)))
    assert "⚠ 1 of 2" in table
