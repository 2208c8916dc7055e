"""The experiment's plots (matplotlib, headless), from ``results.json``: zero-deviation per
mini-step, the predictor scale α over steps, router drift cosines at lag 1-3; one panel per
setting."""

from __future__ import annotations

from pathlib import Path

LAGS = (1, 2, 3)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(results: dict):
    plt = _plt()
    names = list(results["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 3.8), squeeze=False)
    return plt, fig, dict(zip(names, axes[0], strict=True))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(ax, title: str, xlabel: str) -> None:
    """Title, x label, and a legend of the panel's lines (or a "not logged yet" note)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "not logged yet", ha="center", transform=ax.transAxes)


def plot_mini_steps(results: dict, path: Path) -> Path:
    """Zero-deviation % at each mini-step, per variant and off-policy level (seed mean)."""
    plt, fig, axes = _panels(results)
    for name, ax in axes.items():
        for a in results["aggregates"]:
            if a["setting"] != name or not a.get("zero_deviation_per_mini_step"):
                continue
            ys = [100 * y if y is not None else None for y in a["zero_deviation_per_mini_step"]]
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                marker="o",
                ms=3,
                label=f"{a['variant']} off {a['off_policy_steps']}",
                linestyle="-" if a["off_policy_steps"] > 2 else "--",
            )
        _label(ax, f"setting {name}: zero-deviation per mini-step", "mini-step")
        ax.set_ylabel("zero-deviation %")
    return _save(plt, fig, path)


def plot_alpha(results: dict, path: Path) -> Path:
    """The predictor scale α per step of every cell that logs it."""
    plt, fig, axes = _panels(results)
    for name, ax in axes.items():
        for c in results["cells"]:
            ys = (c.get("series") or {}).get("predictor_scale") or []
            if c["setting"] != name or not any(y is not None for y in ys):
                continue
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                lw=1,
                label=f"{c['variant']} off {c['off_policy_steps']} s{c['seed']}",
            )
        _label(ax, f"setting {name}: predictor scale α", "step")
    return _save(plt, fig, path)


def plot_drift(results: dict, path: Path) -> Path:
    """Mean router drift cosine at lag 1, 2, 3 per variant and off-policy level."""
    plt, fig, axes = _panels(results)
    for name, ax in axes.items():
        aggs = [a for a in results["aggregates"] if a["setting"] == name]
        width = 0.8 / len(LAGS)
        for i, lag in enumerate(LAGS):
            key = f"router_drift_cos_lag{lag}"
            ax.bar(
                [j + i * width for j in range(len(aggs))],
                [a.get(key) or 0.0 for a in aggs],
                width,
                yerr=[(a.get(key + "_spread") or 0.0) / 2 for a in aggs],
                capsize=2,
                label=f"lag {lag}",
            )
        ax.set_xticks([j + width for j in range(len(aggs))])
        ax.set_xticklabels(
            [f"{a['variant']}\noff {a['off_policy_steps']}" for a in aggs], fontsize=7
        )
        ax.axhline(0.7, color="grey", lw=0.8, ls=":")
        ax.set_title(f"setting {name}: router drift cosine")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_mini_steps(results, out_dir / "zero_deviation_per_mini_step.png"),
        plot_alpha(results, out_dir / "predictor_scale.png"),
        plot_drift(results, out_dir / "drift_cosines.png"),
    ]
