"""The grid's seed-matched differences to R3: each variant's cells paired with R3's cell of the
same seed (same warm start, same prompts), step by step.

Per (setting, off-policy level, variant): the mean over seeds of each seed's mean per-step
difference in zero-deviation (all mini-steps, and the off-policy ones) with a 95 % interval
that resamples steps within each seed
(:func:`trainer.experiments.counterfactual.paired_difference`), the per-seed differences, and
how many of the variant's seeds collapsed. Pure: the results file's cells in, table lines out.
"""

from __future__ import annotations

import numpy as np

from trainer.experiments.counterfactual import paired_difference

KEYS = (("zero_deviation", "all mini-steps"), ("zero_deviation_offpolicy", "off-policy"))


def paired_rows(cells: list[dict]) -> list[dict]:
    """One row per (setting, off-policy, variant) that has R3 cells of the same seeds."""
    r3 = {
        (c["setting"], c["off_policy_steps"], c["seed"]): c for c in cells if c["variant"] == "r3"
    }
    groups: dict = {}
    for c in cells:
        key = (c["setting"], c["off_policy_steps"], c["seed"])
        if c["variant"] != "r3" and key in r3:
            groups.setdefault((c["setting"], c["off_policy_steps"], c["variant"]), []).append(c)
    rows = []
    for (setting, off, variant), group in sorted(groups.items()):
        row = {"setting": setting, "off_policy_steps": off, "variant": variant}
        row["seeds"] = sorted(c["seed"] for c in group)
        row["collapsed"] = sum(1 for c in group if c.get("collapsed"))
        for key, _ in KEYS:
            pairs = [_series_pair(c, r3[(setting, off, c["seed"])], key) for c in group]
            pairs = [p for p in pairs if p is not None]
            row[key] = paired_difference(pairs) if pairs else None
        rows.append(row)
    return rows


def _series_pair(cell: dict, ref: dict, key: str):
    a, b = cell.get("series", {}).get(key), ref.get("series", {}).get(key)
    if not a or not b:
        return None
    both = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    return np.array([x for x, _ in both]), np.array([y for _, y in both])


def _pp(d: dict | None) -> str:
    if d is None:
        return "–"
    lo, hi = d["ci95"]
    mark = " ✔" if lo > 0 else " ✘" if hi < 0 else ""
    return f"{100 * d['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{mark}"


def paired_table(cells: list[dict]) -> list[str]:
    """Markdown lines: the seed-matched differences to R3 (✔ above with the interval
    excluding 0, ✘ below with it excluding 0)."""
    rows = paired_rows(cells)
    if not rows:
        return []
    lines = [
        "Seed-matched differences to R3 (pp of zero-deviation; 95 % interval resampling steps "
        "within seeds; ✔ / ✘: above / below with the interval excluding 0):",
        "",
        "| setting | off-policy | variant | seeds | all mini-steps | off-policy mini-steps "
        "| per seed (off-policy) | collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        off = r["zero_deviation_offpolicy"]
        per_seed = " / ".join(f"{100 * x:+.2f}" for x in off["per_seed"]) if off else "–"
        lines.append(
            f"| {r['setting']} | {r['off_policy_steps']} | {r['variant']} | {len(r['seeds'])} "
            f"| {_pp(r['zero_deviation'])} | {_pp(off)} | {per_seed} | {r['collapsed']} |"
        )
    return lines
