"""The results section's "what this shows" lines follow the numbers
(trainer.experiments.report_findings)."""

from __future__ import annotations

from trainer.experiments.report_findings import findings, versus_r3


def agg(variant, off, zd, spread=0.0, **kw) -> dict:
    return {
        "setting": "B",
        "variant": variant,
        "off_policy_steps": off,
        "seeds": [0, 1, 2],
        "zero_deviation_offpolicy": zd,
        "zero_deviation_offpolicy_spread": spread,
        "instability_events": 0,
        **kw,
    }


def test_above_below_and_within_are_against_the_larger_seed_spread():
    r3 = agg("r3", 8, 0.944, 0.004)
    assert versus_r3(agg("lookahead", 8, 0.953, 0.008), r3)[0] == "above"
    assert versus_r3(agg("lookahead", 8, 0.951, 0.008), r3)[0] == "within the spread"
    assert versus_r3(agg("pr2", 8, 0.923, 0.008), r3)[0] == "below"
    word, diff, spread = versus_r3(agg("pr2-auto", 8, 0.944, 0.011), r3)
    assert word == "within the spread" and abs(diff) < 1e-12 and spread == 0.011


def test_findings_name_each_level_alpha_drift_and_accuracy():
    aggs = [
        agg(
            "none",
            8,
            0.94,
            router_drift_cos_lag1=0.84,
            router_drift_cos_lag2=0.7,
            router_drift_cos_lag3=0.63,
            final_eval_accuracy=0.3,
            final_eval_accuracy_spread=0.1,
        ),
        agg("r3", 8, 0.944, 0.004, final_eval_accuracy=0.28, final_eval_accuracy_spread=0.05),
        agg("pr2-auto", 8, 0.944, 0.011, predictor_scale=0.14, final_eval_accuracy=0.25),
    ]
    lines = findings(aggs, ["A", "B"])
    assert lines[1] == "- Setting A: no cells yet."
    text = "\n".join(lines)
    assert "0.84 / 0.70 / 0.63 at off-policy 8 (none)" in text
    assert "At off-policy 8 (R3 94.4 %, 3 seeds): pr2-auto 94.4 % is within the spread" in text
    assert "α ≈ 0.14" in text
    assert "ranges 0.250–0.300 across the fp32 cells, within the largest seed spread" in text


def test_the_reading_sums_up_the_levels():
    aggs = [
        agg("r3", 2, 0.988, 0.002),
        agg("r3", 8, 0.944, 0.004),
        agg("pr2", 2, 0.979, 0.005),
        agg("pr2", 8, 0.923, 0.008),
        agg("pr2-auto", 2, 0.987, 0.003, predictor_scale=0.27),
        agg("pr2-auto", 8, 0.944, 0.011, predictor_scale=0.14),
        agg("lookahead", 2, 0.989, 0.002),
        agg("lookahead", 8, 0.953, 0.008),
    ]
    text = "\n".join(findings(aggs, ["B"]))
    assert "full scale is below R3 at every level" in text
    assert "the fitted scale (α 0.14–0.27) shrinks it to R3's level, not below it" in text
    assert "only the Adam look-ahead is above R3 beyond the spread (off-policy 8)" in text
    aggs[-1] = agg("lookahead", 8, 0.930, 0.008)  # below at 8: no such claim
    assert "look-ahead" not in "\n".join(findings(aggs, ["B"]))
