"""The results page's grid section (``docs/results.md``) and the experiment plots, generated
from the experiment's results file (never by hand).

    python -m trainer.experiments.report results/experiment/results.json docs/results.md
    python -m trainer.experiments.report results.json docs/results.md --check  # 1 if stale

The section lives between ``<!-- results:begin -->`` and ``<!-- results:end -->``. Beside the
results file: ``tuning.json`` (setting B's tuning runs) and ``investigation.json`` (earlier runs,
from before the reference-timed predictor loss) are shown when present; the plots
(:mod:`trainer.experiments.report_plots`) are written there too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.experiments.report_findings import (
    LAGS,
    PR2_VARIANTS,
    _zd,
    by_cell,
    findings,
    versus_r3,
)
from trainer.experiments.report_paired import paired_table

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def load(results_path: str | Path) -> dict:
    """The results file and the side files present beside it (``tuning``, ``investigation``)."""
    results_path = Path(results_path)
    out = {"results": json.loads(results_path.read_text())}
    for name in ("tuning", "investigation"):
        side = results_path.with_name(f"{name}.json")
        out[name] = json.loads(side.read_text()) if side.exists() else None
    return out


# -- tables ----------------------------------------------------------------------------------------
def _predictor_lr(s: dict) -> str:
    """A setting's predictor lr as written (older results: a multiplier of the base lr)."""
    if "predictor_lr_ratio" in s:
        return f"{s['predictor_lr_ratio']:.3g} x the router's"
    return f"x {s['predictor_lr_multiplier']:g}"


def _collapsed(a: dict) -> str:
    """How many of the row's seeds collapsed (kept in the means, flagged here)."""
    n = a.get("collapsed", 0)
    return f"⚠ {n} of {len(a['seeds'])}" if n else "0"


def setting_table(aggs: list[dict]) -> list[str]:
    lines = [
        "| variant | off-policy | zero-dev. % (off-policy mini-steps) | zero-dev. % (all) | "
        "final eval acc. | instability events | α mean | drift cos lag 1 / 2 / 3 | "
        "load-balance loss | R2 = R3 route % | train–infer KL | wall (s) | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in aggs:
        cos = " / ".join(_num(a.get(f"router_drift_cos_lag{lag}"), ".2f") for lag in LAGS)
        lines.append(
            f"| {a['variant']} | {a['off_policy_steps']} | "
            f"{_pct(a['zero_deviation_offpolicy'])} ± {_pct(a['zero_deviation_offpolicy_spread'])}"
            f" | {_pct(a['zero_deviation'])} | "
            f"{_num(a['final_eval_accuracy'], '.3f')} ± "
            f"{_num(a['final_eval_accuracy_spread'], '.3f')} | {a['instability_events']} | "
            f"{_num(a.get('predictor_scale'), '.2f')} | {cos} | "
            f"{_num(a.get('load_balance'), '.2f')} | {_pct(a.get('r2_vs_r3_zero_deviation'))} | "
            f"{_num(a['train_infer_kl'], '.1e')} | {_num(a['wall_time_s'], '.0f')} | "
            f"{_collapsed(a)} |"
        )
    return lines


def goal_b(aggs: list[dict]) -> str:
    """Setting B: the best PR2 variant (by off-policy 8 zero-deviation) above R3 by more than
    the seed spread at 8, and not below R3 at 2."""
    by = by_cell(aggs, "B")
    cands = [v for v in PR2_VARIANTS if (v, 8) in by]
    if ("r3", 8) not in by or ("r3", 2) not in by or not cands:
        return "- Setting B: not measured yet (needs r3 and a PR2 variant at off-policy 2 and 8)."
    best = max(cands, key=lambda v: _zd(by[(v, 8)])[0])
    (b8, _), (r8, _) = _zd(by[(best, 8)]), _zd(by[("r3", 8)])
    word, _, spread = versus_r3(by[(best, 8)], by[("r3", 8)])
    ok8 = word == "above"
    text = (
        f"- Setting B: best PR2 variant at off-policy 8 is **{best}**: zero-deviation "
        f"{_pct(b8)} vs r3 {_pct(r8)} (difference {100 * (b8 - r8):+.1f} pp, seed spread "
        f"{_pct(spread)} pp) → {'met' if ok8 else 'NOT met'} at 8"
    )
    if (best, 2) not in by:
        return text + f"; {best} at off-policy 2 not measured yet."
    b2, r2 = _zd(by[(best, 2)])[0], _zd(by[("r3", 2)])[0]
    return text + (
        f"; at off-policy 2 {_pct(b2)} vs r3 {_pct(r2)} → "
        f"{'met (not below)' if b2 >= r2 else 'NOT met (below)'}. "
        f"Overall: {'met' if ok8 and b2 >= r2 else 'NOT met'}."
    )


def goal_a(aggs: list[dict]) -> str:
    """Setting A: pr2 + auto α not below R3 by more than the seed spread at any level."""
    by = by_cell(aggs, "A")
    offs = sorted({off for v, off in by if v == "pr2-auto" and ("r3", off) in by})
    if not offs:
        return "- Setting A: not measured yet (needs pr2-auto and r3 at the same level)."
    parts, ok = [], True
    for off in offs:
        (p, _), (r, _) = _zd(by[("pr2-auto", off)]), _zd(by[("r3", off)])
        word, _, spread = versus_r3(by[("pr2-auto", off)], by[("r3", off)])
        good = word != "below"
        ok &= good
        parts.append(
            f"off-policy {off}: {_pct(p)} vs r3 {_pct(r)} (spread {_pct(spread)}) "
            f"→ {'met' if good else 'NOT met'}"
        )
    return (
        "- Setting A: pr2-auto vs r3, zero-deviation — "
        + "; ".join(parts)
        + (f". Overall: {'met' if ok else 'NOT met'}.")
    )


def tuning_table(tuning: dict) -> list[str]:
    lines = [
        f"Setting B's tuning runs (`tuning.json`; off-policy {tuning['off_policy_steps']}, "
        "seed 0): targets drift cos lag 3 ≥ 0.7 and r3 zero-deviation ≤ 95 %.",
        "",
        "| replay | λ (load balance) | router bias | router lr x | steps | warm-start acc. | "
        "favoured-expert share (layer mean) | drift cos lag 1 / 2 / 3 | zero-dev. % (off-policy) | "
        "load-balance loss first → last | final eval acc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tuning["runs"]:
        warm = r.get("warm_start") or {}
        share = None
        if warm.get("load_after"):
            fav = warm["experts"]
            share = sum(sum(layer[e] for e in fav) for layer in warm["load_after"]) / len(
                warm["load_after"]
            )
        lb = [x for x in r.get("series", {}).get("load_balance", []) if x is not None]
        cos = " / ".join(_num(r.get(f"router_drift_cos_lag{lag}"), ".2f") for lag in LAGS)
        lines.append(
            f"| {r['replay']} | {r['load_balance_coef']:g} | {r['imbalance_bias']:g} "
            f"({r.get('imbalance_stage', 'after')} warm-up) | "
            f"{r.get('router_lr_multiplier', 30):g} | {r['steps']} | "
            f"{_num(warm.get('eval_accuracy'), '.3f')} | {_pct(share)} | {cos} | "
            f"{_pct(r['zero_deviation_offpolicy'])} | "
            f"{_num(lb[0] if lb else None, '.2f')} → {_num(lb[-1] if lb else None, '.2f')} | "
            f"{_num(r['final_eval_accuracy'], '.3f')} |"
        )
    return lines


def investigation_table(inv: dict) -> list[str]:
    """The earlier investigation runs (old predictor timing): kept for their drift figures."""
    lines = [
        "Earlier investigation (`investigation.json`), run **before** the reference-timed "
        "predictor loss (its pr2 rows trained the predictor one update too far; the none rows "
        f"stand): off-policy {inv['off_policy_steps']}, seed 0, {inv['steps']} steps each; "
        "drift cos = lag 1.",
        "",
        "| mode | experts | prompts / batch | router lr x | predictor lr x | loss | "
        "zero-dev. % (off-policy) | hit % rollout | hit % zero | drift cos (lag 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in inv["runs"]:
        pred = r["replay"] == "pr2"
        cos = r.get("router_drift_cos_lag1", r.get("router_drift_cos_prev"))
        lines.append(
            f"| {r['replay']} | {r.get('num_experts', 8)} | {r.get('prompts_per_batch', 32)} x 8 | "
            f"{r['router_lr_multiplier']:g} | "
            f"{_num(r['predictor_lr_multiplier'], 'g') if pred else '–'} | "
            f"{r['loss'] if pred else '–'} | {_pct(r['zero_deviation_offpolicy'])} | "
            f"{_pct(r.get('rollout_predictor_hit_rate')) if pred else '–'} | "
            f"{_pct(r['zero_predictor_hit_rate'])} | {_num(cos, '.3f')} |"
        )
    return lines


# -- the section -----------------------------------------------------------------------------------
PLOTS = (
    ("zero_deviation_per_mini_step.png", "zero-deviation per mini-step"),
    ("predictor_scale.png", "predictor scale α over steps"),
    ("drift_cosines.png", "router drift cosines at lag 1-3"),
)


def render(loaded: dict, source: str, plots_link: str = "results/experiment") -> str:
    """Markdown of the results (deterministic: same files, same text); the plots are linked
    under ``plots_link`` (relative to the page)."""
    res = loaded["results"]
    aggs = res["aggregates"]
    lines = [f"Generated by `python -m trainer.experiments.report` from `{source}`."]
    if res.get("partial"):
        lines.append(
            f"**Partial results: {res['cells_done']} of {res['cells_total']} cells** (the grid "
            "is still running; goal lines are provisional)."
        )
    lines += [
        "",
        f"Model: {res['model']}; task {res['task']}. Values: mean over seeds "
        "(± spread = max − min). α = the predictor scale (pr2-auto); R2 = R3 route % = share "
        "of (token, layer) where the trainer's own old-pass top-k equals the server's route.",
    ]
    for name, s in res["settings"].items():
        mine = [a for a in aggs if a["setting"] == name]
        lines += [
            "",
            f"**Setting {name}** — {s['description']}. {s['steps']} RL steps of "
            f"{s['prompts_per_batch']} prompts x {s['samples_per_prompt']} samples; lr "
            f"{s['lr']:g}, router lr x {s['router_lr_multiplier']:g}, predictor lr "
            f"{_predictor_lr(s)}, load-balance λ {s['load_balance_coef']:g}.",
            "",
        ]
        lines += setting_table(mine) if mine else ["(no cells finished yet)"]
    lines += ["", *paired_table(res["cells"])]
    lines += ["", "Goals (measured):", goal_b(aggs), goal_a(aggs)]
    lines += ["", *findings(aggs, list(res["settings"]))]
    lines += ["", *[f"![{alt}]({plots_link}/{f})" for f, alt in PLOTS]]
    if loaded.get("tuning"):
        lines += ["", *tuning_table(loaded["tuning"])]
    if loaded.get("investigation"):
        lines += ["", *investigation_table(loaded["investigation"])]
    return "\n".join(lines)


def replace_section(readme: str, body: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pr2-report", description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("readme")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--plots", default=None, help="plot directory (default: beside results)")
    args = ap.parse_args(argv)
    loaded = load(args.results)
    readme = Path(args.readme).read_text()
    link = os.path.relpath(Path(args.results).parent, Path(args.readme).parent)
    new = replace_section(readme, render(loaded, args.results, Path(link).as_posix()))
    if args.check:
        if new != readme:
            print(
                f"{args.readme}: the results section is out of date; run "
                "python -m trainer.experiments.report",
                file=sys.stderr,
            )
            sys.exit(1)
        return
    Path(args.readme).write_text(new)
    from trainer.experiments.report_plots import plot_all

    plot_all(loaded["results"], Path(args.plots or Path(args.results).parent))


if __name__ == "__main__":
    main()
