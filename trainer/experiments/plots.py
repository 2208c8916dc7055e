"""PNG plots of training metrics (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def load_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(
    rows: list[dict], out: str | Path, title: str = "", eval_baseline: float | None = None
) -> Path:
    """Reward (and eval accuracy), zero-deviation % and train-infer KL over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    rewards = [r.get("reward_mean") or 0.0 for r in rows]
    ax.plot(steps, rewards, marker="o", ms=2, alpha=0.35, label="reward (train batch)")
    w = max(1, len(rows) // 20)
    smooth = [
        sum(rewards[max(0, i - w + 1) : i + 1]) / len(rewards[max(0, i - w + 1) : i + 1])
        for i in range(len(rewards))
    ]
    ax.plot(steps, smooth, label=f"reward ({w}-step mean)")
    ev = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    if eval_baseline is not None:
        ev.insert(0, (0, eval_baseline))
    if ev:
        ax.plot(*zip(*ev, strict=True), marker="s", label="eval accuracy (held-out)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title("reward")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, [100 * r["zero_deviation"] for r in rows], marker="o", ms=3, label="all")
    off = [
        (r["step"], 100 * r["zero_deviation_offpolicy"])
        for r in rows
        if r.get("zero_deviation_offpolicy") is not None
    ]
    if off:
        ax.plot(*zip(*off, strict=True), marker="o", ms=3, label="off-policy mini-steps")
    ax.set_xlabel("step")
    ax.set_title("zero routing deviation (%)")
    ax.legend()
    ax = axes[2]
    kl = [r["train_infer_kl"] for r in rows]
    ax.plot(steps, kl, marker="o", ms=3)
    ax.set_xlabel("step")
    if min(kl) > 0:
        ax.set_yscale("log")
    ax.set_title("train-infer KL (server vs old pass)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
