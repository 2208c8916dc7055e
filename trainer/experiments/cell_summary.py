"""A grid cell's numbers from its per-step metric rows (:func:`summarize_cell`), and their
mean and seed spread per (setting, variant, off-policy level) (:func:`aggregate`); instability
events. Pure: rows in, dicts out."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np

from trainer.experiments.grid import VARIANTS

LAG_KEYS = tuple(f"router_drift_cos_lag{lag}" for lag in (1, 2, 3))


# -- one cell's numbers ----------------------------------------------------------------------------
def instability_events(rows: list[dict]) -> dict[str, int]:
    """Reward collapses (a 5-step mean below half the first 5 steps' mean, while that was
    > 0.05), grad-norm spikes (> 10x the run's median), NaN metrics."""
    rewards = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    start = float(np.mean(rewards[:5])) if rewards else 0.0
    collapses = 0
    if start > 0.05:
        window = [float(np.mean(rewards[i : i + 5])) for i in range(len(rewards) - 4)]
        collapses = sum(1 for a, b in itertools.pairwise(window) if a >= start / 2 > b)
    norms = [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]
    med = statistics.median(norms) if norms else 0.0
    spikes = sum(1 for g in norms if med > 0 and g > 10 * med)
    nans = sum(1 for r in rows for v in r.values() if isinstance(v, float) and math.isnan(v))
    return {"reward_collapse": collapses, "grad_norm_spike": spikes, "nan": nans}


def mean_of(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def per_mini_step(rows: list[dict], key: str = "zero_deviation_per_mini_step") -> list | None:
    """Element-wise mean over steps of a per-mini-step list metric (None when not logged)."""
    lists = [r[key] for r in rows if r.get(key)]
    if not lists:
        return None
    return [mean_of(col) for col in itertools.zip_longest(*lists)]


def _scalar(x):
    """A metric as one number: lists (e.g. one value per MoE layer) by their mean."""
    if isinstance(x, list | tuple):
        return mean_of(x)
    return x


def collapsed(evals: list[float], rows: list[dict]) -> bool:
    """A run whose learning collapsed: final held-out accuracy under 5 %, or the last five
    steps' reward under a quarter of the first five's. Flagged in the tables (such a cell's
    routing numbers describe a broken policy, not the method)."""
    first = mean_of(r.get("reward_mean") for r in rows[:5])
    last = mean_of(r.get("reward_mean") for r in rows[-5:])
    low_acc = bool(evals) and evals[-1] < 0.05
    return bool(low_acc or (first and last is not None and last < 0.25 * first))


def summarize_cell(rows: list[dict], wall: float) -> dict:
    """A cell's headline numbers and per-step series (for the plots)."""
    rows = [{**r, "predictor_scale": _scalar(r.get("predictor_scale"))} for r in rows]

    def mean(key):
        return mean_of(r.get(key) for r in rows)

    hist = np.sum([r["deviation_hist"] for r in rows if r.get("deviation_hist")], axis=0)
    r2r3 = np.sum(
        [r["r2_vs_r3_deviation_hist"] for r in rows if r.get("r2_vs_r3_deviation_hist")], 0
    )
    evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
    series_keys = (
        "zero_deviation",
        "zero_deviation_offpolicy",
        "predictor_scale",
        "load_balance",
        "reward_mean",
        *LAG_KEYS,
    )
    return {
        "zero_deviation": mean("zero_deviation"),
        "zero_deviation_offpolicy": mean("zero_deviation_offpolicy"),
        "zero_deviation_per_mini_step": per_mini_step(rows),
        "deviation_hist": [int(x) for x in np.atleast_1d(hist)],
        "r2_vs_r3_zero_deviation": float(r2r3[0] / r2r3.sum()) if np.sum(r2r3) else None,
        "train_infer_kl": mean("train_infer_kl"),
        "predictor_hit_rate": mean("predictor_hit_rate"),
        "zero_predictor_hit_rate": mean("zero_predictor_hit_rate"),
        "rollout_predictor_hit_rate": mean("rollout_predictor_hit_rate"),
        "predictor_scale": mean("predictor_scale"),
        "load_balance": mean("load_balance"),
        "router_drift_rel": mean("router_drift_rel"),
        **{k: mean(k) for k in LAG_KEYS},
        "final_eval_accuracy": evals[-1] if evals else None,
        "reward_first": mean_of(r.get("reward_mean") for r in rows[:5]),
        "reward_last": mean_of(r.get("reward_mean") for r in rows[-5:]),
        "instability": instability_events(rows),
        "collapsed": collapsed(evals, rows),
        "wall_time_s": wall,
        "steps": len(rows),
        "series": {k: [r.get(k) for r in rows] for k in series_keys},
    }


AGG_KEYS = (
    "zero_deviation_offpolicy",
    "zero_deviation",
    "train_infer_kl",
    "r2_vs_r3_zero_deviation",
    "predictor_hit_rate",
    "predictor_scale",
    "load_balance",
    *LAG_KEYS,
    "final_eval_accuracy",
    "wall_time_s",
)


def aggregate(cells: list[dict]) -> list[dict]:
    """Per (setting, variant, off-policy): mean and spread (max - min over seeds)."""
    order = list(VARIANTS)
    keys = sorted(
        {(c["setting"], c["variant"], c["off_policy_steps"]) for c in cells},
        key=lambda k: (k[0], k[2], order.index(k[1]) if k[1] in order else len(order), k[1]),
    )
    out = []
    for setting, variant, off in keys:
        group = [
            c
            for c in cells
            if (c["setting"], c["variant"], c["off_policy_steps"]) == (setting, variant, off)
        ]
        agg = {
            "setting": setting,
            "variant": variant,
            "replay": group[0]["replay"],
            "off_policy_steps": off,
            "seeds": sorted(c["seed"] for c in group),
        }
        for key in AGG_KEYS:
            vals = [c[key] for c in group if c.get(key) is not None]
            agg[key] = float(np.mean(vals)) if vals else None
            agg[key + "_spread"] = float(max(vals) - min(vals)) if len(vals) > 1 else 0.0
        agg["instability_events"] = int(sum(sum(c["instability"].values()) for c in group))
        agg["collapsed"] = sum(1 for c in group if c.get("collapsed"))
        mini = [
            c["zero_deviation_per_mini_step"]
            for c in group
            if c.get("zero_deviation_per_mini_step")
        ]
        agg["zero_deviation_per_mini_step"] = (
            [mean_of(col) for col in itertools.zip_longest(*mini)] if mini else None
        )
        out.append(agg)
    return out
