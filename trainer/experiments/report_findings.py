""" "What this shows": the results section's plain-language findings, derived from the grid's
aggregates by rules (never written by hand), so they change when the numbers do.

A variant is **above** / **below** R3 at an off-policy level when its off-policy zero-deviation
differs from R3's by more than the larger of the two seed spreads (max − min over seeds), and
**within the spread** otherwise; a level with one seed has spread 0, so it is said to be one seed.
"""

from __future__ import annotations

PR2_VARIANTS = ("pr2", "pr2-c0.03", "pr2-auto", "ridge", "lookahead")
LAGS = (1, 2, 3)


def _zd(a: dict) -> tuple[float, float]:
    return a["zero_deviation_offpolicy"] or 0.0, a["zero_deviation_offpolicy_spread"] or 0.0


def by_cell(aggs: list[dict], setting: str) -> dict[tuple[str, int], dict]:
    """A setting's aggregates by (variant, off-policy level)."""
    return {(a["variant"], a["off_policy_steps"]): a for a in aggs if a["setting"] == setting}


def versus_r3(a: dict, r3: dict) -> tuple[str, float, float]:
    """``("above" | "below" | "within the spread", difference, spread)`` of ``a`` against R3
    (zero-deviation over the off-policy mini-steps, fractions)."""
    (x, xs), (r, rs) = _zd(a), _zd(r3)
    spread = max(xs, rs)
    diff = x - r
    word = "above" if diff > spread else "below" if diff < -spread else "within the spread"
    return word, diff, spread


def _level_sentence(by: dict, off: int) -> str | None:
    """One off-policy level: every PR2 variant against R3, with α where fitted."""
    if ("r3", off) not in by:
        return None
    r3 = by[("r3", off)]
    parts = []
    for v in PR2_VARIANTS:
        if (v, off) not in by:
            continue
        a = by[(v, off)]
        word, diff, spread = versus_r3(a, r3)
        alpha = a.get("predictor_scale")
        scale = f", α ≈ {alpha:.2f}" if v == "pr2-auto" and alpha is not None else ""
        parts.append(
            f"{v} {100 * _zd(a)[0]:.1f} % is {word} ({100 * diff:+.1f} pp, spread "
            f"{100 * spread:.1f}{scale})"
        )
    if not parts:
        return None
    seeds = len(r3.get("seeds") or [])
    return (
        f"at off-policy {off} (R3 {100 * _zd(r3)[0]:.1f} %, {seeds} seed"
        f"{'s' if seeds != 1 else ''}): " + "; ".join(parts)
    )


def _drift_sentence(aggs: list[dict]) -> str | None:
    """Router drift cosines at lag 1/2/3 of the no-replay / R3 cells, per level."""
    parts = []
    for a in aggs:
        if a["variant"] not in ("none", "r3") or a.get("router_drift_cos_lag1") is None:
            continue
        if a["variant"] == "r3" and any(
            b["variant"] == "none" and b["off_policy_steps"] == a["off_policy_steps"] for b in aggs
        ):
            continue  # one line per level: prefer the no-replay cell
        cos = " / ".join(f"{a.get(f'router_drift_cos_lag{lag}') or 0.0:.2f}" for lag in LAGS)
        parts.append(f"{cos} at off-policy {a['off_policy_steps']} ({a['variant']})")
    return "router drift cosine at lag 1 / 2 / 3: " + ", ".join(parts) if parts else None


def _accuracy_sentence(aggs: list[dict]) -> str | None:
    """Whether final held-out accuracy separates the variants (same precision) beyond the seed
    spread, and the instability events."""
    accs = [
        a
        for a in aggs
        if a.get("final_eval_accuracy") is not None and not a["variant"].endswith("-bf16")
    ]
    if len(accs) < 2:
        return None
    lo = min(a["final_eval_accuracy"] for a in accs)
    hi = max(a["final_eval_accuracy"] for a in accs)
    spread = max(a.get("final_eval_accuracy_spread") or 0.0 for a in accs)
    events = sum(a.get("instability_events") or 0 for a in aggs)
    verdict = "within" if hi - lo <= spread else "wider than"
    return (
        f"final held-out accuracy (40 steps) ranges {lo:.3f}–{hi:.3f} across the fp32 cells, "
        f"{verdict} the largest seed spread ({spread:.3f}); {events} instability "
        f"event{'s' if events != 1 else ''} in all"
    )


def _precision_sentence(by: dict) -> str | None:
    pair = [by.get((v, 8)) for v in ("r2-bf16", "r3-bf16")]
    if not all(pair):
        return None
    r2r3 = [a.get("r2_vs_r3_zero_deviation") for a in pair]
    if any(x is None for x in r2r3):
        return None
    (r2, _), (r3, _) = _zd(pair[0]), _zd(pair[1])
    return (
        f"with a bf16 trainer and an fp32 server R2 and R3 replay different routes (R2 = R3 on "
        f"{100 * min(r2r3):.1f}–{100 * max(r2r3):.1f} % of (token, layer)); R2 {100 * r2:.1f} % "
        f"vs R3 {100 * r3:.1f} % zero-deviation at off-policy 8, one seed each"
    )


def _reading(by: dict, offs: list[int]) -> str | None:
    """What the level-by-level comparisons add up to, per PR2 variant."""
    words = {  # variant -> {level: above / below / within the spread}
        v: {
            o: versus_r3(by[(v, o)], by[("r3", o)])[0]
            for o in offs
            if {(v, o), ("r3", o)} <= by.keys()
        }
        for v in PR2_VARIANTS
    }
    parts = []
    if words["pr2"] and set(words["pr2"].values()) == {"below"}:
        parts.append("the learned predictor served at full scale is below R3 at every level")
    if words["pr2-auto"] and "below" not in words["pr2-auto"].values():
        alphas = [by[("pr2-auto", o)].get("predictor_scale") for o in words["pr2-auto"]]
        alphas = [x for x in alphas if x is not None]
        span = f" (α {min(alphas):.2f}–{max(alphas):.2f})" if alphas else ""
        parts.append(f"the fitted scale{span} shrinks it to R3's level, not below it")
    above = [o for o, w in words["lookahead"].items() if w == "above"]
    if above and "below" not in words["lookahead"].values():
        levels = ", ".join(map(str, above))
        parts.append(
            f"only the Adam look-ahead is above R3 beyond the spread (off-policy {levels})"
        )
    return "; ".join(parts) if parts else None


def findings(aggs: list[dict], settings: list[str]) -> list[str]:
    """Markdown lines: "What this shows", a bullet per setting with a sub-bullet per fact."""
    lines = ["**What this shows** (derived by `trainer/experiments/report_findings.py`):"]
    for name in settings:
        mine = [a for a in aggs if a["setting"] == name]
        if not mine:
            lines.append(f"- Setting {name}: no cells yet.")
            continue
        by = by_cell(mine, name)
        offs = sorted({a["off_policy_steps"] for a in mine})
        facts = [_drift_sentence(mine), *(_level_sentence(by, off) for off in offs)]
        facts += [_reading(by, offs), _accuracy_sentence(mine), _precision_sentence(by)]
        lines.append(f"- Setting {name}:")
        lines += [f"  - {f[0].upper()}{f[1:]}." for f in facts if f]
    return lines
