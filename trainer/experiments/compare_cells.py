"""Do two results files agree on the cells they share? (A fresh clone's ``make experiment`` of
a few cells against the committed grid: the reproducibility check.)

    python -m trainer.experiments.compare_cells FRESH.json results/experiment/results.json \\
        --out results/experiment/reproduction.json

Per shared cell: whether the warm start's fingerprint is the same, both code commits, and for
each headline number and per-step series the largest absolute difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = (
    "zero_deviation",
    "zero_deviation_offpolicy",
    "final_eval_accuracy",
    "reward_first",
    "reward_last",
    "train_infer_kl",
)


def _key(c: dict) -> tuple:
    return (c["setting"], c["variant"], c["off_policy_steps"], c["seed"])


def compare(fresh: list[dict], committed: list[dict]) -> list[dict]:
    ref = {_key(c): c for c in committed}
    out = []
    for c in fresh:
        r = ref.get(_key(c))
        if r is None:
            continue
        row = {
            "cell": list(_key(c)),
            "same_warm_start": c.get("warm_start_sha256") == r.get("warm_start_sha256"),
            "commits": [c.get("code_commit"), r.get("code_commit")],
        }
        row["max_abs_diff"] = {k: abs(c[k] - r[k]) for k in KEYS if c.get(k) is not None}
        for name, series in c.get("series", {}).items():
            pairs = zip(series, r.get("series", {}).get(name, []), strict=False)
            diffs = [abs(x - y) for x, y in pairs if x is not None and y is not None]
            if diffs:
                row["max_abs_diff"][f"series:{name}"] = max(diffs)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fresh")
    ap.add_argument("committed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = compare(
        *(json.loads(Path(p).read_text())["cells"] for p in (args.fresh, args.committed))
    )
    for r in rows:
        worst = max(r["max_abs_diff"].values()) if r["max_abs_diff"] else None
        print(f"{r['cell']}: same warm start {r['same_warm_start']}, largest difference {worst}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
