"""``make experiment``: the grid of :mod:`trainer.experiments.grid`, resumable by cell.

Each setting has one warm start (A: the supervised warm-up; B: the same with routers biased
towards a few experts, :mod:`trainer.experiments.imbalance`; C: 32 experts top-4) and ONE
``pr2-serve`` on it, reused by every cell of the setting: a cell's trainer pushes its starting
weights (zero predictor outside pr2) when the server's fingerprints differ from them
(:mod:`trainer.rollouts.weight_agreement`), so each cell starts from the same served weights as on
a fresh server.
After each cell ``results.json`` is rewritten (``partial`` until every cell is done), so a run can
stop and resume in several sittings.

    python -m trainer.experiments.grid_run --out runs/experiment \
        --results results/experiment/results.json [--setting C B ...] [--variants ...]
        [--max-cells N] [--steps 40]
    python -m trainer.experiments.grid_run --tune results/experiment/tuning.json \
        --tune-runs "0.1 2" ...

then ``python -m trainer.experiments.report results/experiment/results.json docs/results.md``
(tables, goal lines and plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

from trainer.data.tasks import Task
from trainer.experiments.cell_summary import LAG_KEYS, aggregate, summarize_cell
from trainer.experiments.grid import (
    DEFAULT_SETTINGS,
    SETTINGS,
    VARIANTS,
    CellKey,
    MissingFeature,
    Setting,
    grid_cells,
    pending,
)
from trainer.run.config import TrainConfig

TASK = Task("addition", 2)


# -- warm starts and servers -----------------------------------------------------------------------
def warm_model(out: Path, setting: Setting, router_std: float = 0.02) -> Path:
    """The supervised warm start of ``setting``'s model shape (made once, then reused): exactly
    ``setting.warmup_steps`` steps, so the same code on the same machine makes the same bytes
    (each cell records its fingerprint)."""
    model_dir = out / f"model-{_shape(setting)}-w{setting.warmup_steps}"
    if not (model_dir / "model.safetensors").exists():
        from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model
        from trainer.experiments.warmup import warmup

        spec = TinySpec(
            router_std=router_std,
            num_experts=setting.experts,
            top_k=setting.top_k,
            moe_intermediate_size=setting.expert_size,
        )
        base = make_tiny_model(out / f"base-{_shape(setting)}", seed=0, spec=spec)
        warmup(base, model_dir, TASK, target_accuracy=None, max_steps=setting.warmup_steps)
    return model_dir


def setting_model(out: Path, setting: Setting) -> Path:
    """The warm start of a setting (made once): the warm model, or it with routers biased
    towards ``setting.imbalance_experts`` -- after the warm-up (``imbalance_stage="after"``),
    or before it (``"before"``: the base model is biased, then warmed up, so the experts learn
    the imbalanced routes)."""
    model_dir = warm_model(out, setting)
    experts, bias = setting.imbalance_experts, setting.imbalance_bias
    if not bias:
        return model_dir
    from trainer.experiments.imbalance import make_imbalanced

    name = f"{model_dir.name}-e{'-'.join(map(str, experts))}-b{bias:g}"
    if setting.imbalance_stage == "after":
        imb = out / f"{name}-imb"
        if not (imb / "model.safetensors").exists():
            make_imbalanced(model_dir, imb, experts, bias, TASK)
        return imb
    imb = out / f"{name}-pre-imb"
    if not (imb / "model.safetensors").exists():
        from trainer.experiments.warmup import warmup

        base = out / f"base-{name}"
        info = make_imbalanced(
            out / f"base-{_shape(setting)}",
            base,
            experts,
            bias,
            TASK,
        )
        warmup(base, imb, TASK, target_accuracy=None, max_steps=setting.warmup_steps)
        from trainer.experiments.imbalance import measure

        (imb / "imbalance.json").write_text(json.dumps({**info, **measure(imb, experts, TASK)}))
    return imb


def _shape(setting: Setting) -> str:
    return f"e{setting.experts}k{setting.top_k}i{setting.expert_size}"


def provenance(model_dir: Path) -> dict:
    """What a cell ran from: the warm start's fingerprint and the code's commit."""
    import hashlib
    import subprocess

    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"warm_start_sha256": digest[:16], "code_commit": commit}


class ServerCache:
    """One ``pr2-serve`` per model directory, started on first use, stopped on exit (or when
    another model's server is asked for: one at a time on this machine)."""

    def __init__(self, out: Path) -> None:
        self.out, self.model_dir, self.server, self.key = out, None, None, secrets.token_hex(16)
        self.starts = 0

    def get(self, model_dir: Path):
        if self.server is not None and self.model_dir != model_dir:
            self.close()
        if self.server is None:
            from pr2_serve.server.launch import start_server

            state = self.out / "server-state"
            for attempt in (1, 2):  # a start on this shared machine can stall: try twice
                shutil.rmtree(state, ignore_errors=True)
                try:
                    self.server = start_server(model_dir, state, api_key=self.key, timeout=600)
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
            self.model_dir, self.starts = model_dir, self.starts + 1
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.out / "server-state", ignore_errors=True)
        self.server = self.model_dir = None

    def __enter__(self) -> ServerCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cell_config(
    setting: Setting, key: CellKey, model_dir: Path, server_url: str, api_key: str, cell_dir: Path
) -> TrainConfig:
    """The trainer config of one cell (:class:`MissingFeature` if its variant needs a field
    this checkout lacks)."""
    available = {f.name for f in dataclasses.fields(TrainConfig)}
    steps = setting.steps
    fields = {
        "predictor_lr_ratio": setting.predictor_lr_ratio,
        # the grid's cells keep the reference experts (eager), whichever the trainer's default
        **({"experts_implementation": "eager"} if "experts_implementation" in available else {}),
        **VARIANTS[key.variant].config_fields(available),
    }
    return TrainConfig(
        servers=[server_url],
        model_dir=str(model_dir),
        task=TASK.name,
        task_digits=TASK.digits,
        off_policy_steps=key.off_policy_steps,
        prompts_per_batch=setting.prompts_per_batch,
        samples_per_prompt=setting.samples_per_prompt,
        max_tokens=6,
        lr=setting.lr,
        router_lr_multiplier=setting.router_lr_multiplier,
        load_balance_coef=setting.load_balance_coef,
        steps=steps,
        eval_every=max(1, steps // 4),
        eval_size=setting.eval_size,
        seed=key.seed,
        output_dir=str(cell_dir),
        api_key=api_key,
        **fields,
    )


def run_cell(
    servers: ServerCache,
    out: Path,
    setting: Setting,
    key: CellKey,
    model_dir: Path | None = None,
    learner_hook=None,
) -> dict:
    """Train one cell against the setting's (shared) server; its results entry. The cell's
    ``metrics.jsonl`` is in ``out/cells/<setting>-<variant>-<off>-<seed>/``.
    ``learner_hook(learner, cell_dir)``: called on the cell's learner before it trains (a
    study's recorder attaches itself there)."""
    from trainer.run.loop import Trainer

    if model_dir is None:
        model_dir = setting_model(out, setting)
    cell_dir = out / "cells" / "-".join(map(str, key))
    cfg = cell_config(setting, key, model_dir, "http://unused", servers.key, cell_dir)
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    server = servers.get(model_dir)
    cfg.servers = [server.http]
    t0 = time.perf_counter()
    with Trainer(cfg, log=lambda *a: None) as trainer:
        if learner_hook is not None:
            learner_hook(trainer.learner, cell_dir)
        rows = trainer.run()
    variant = VARIANTS[key.variant]
    return {
        **key._asdict(),
        "replay": variant.replay,
        "predictor": variant.predictor,
        "predictor_scale_option": variant.predictor_scale,
        "dtype": variant.dtype,
        "predictor_lr_ratio": cfg.predictor_lr_ratio if variant.replay == "pr2" else None,
        **provenance(model_dir),
        **summarize_cell(rows, time.perf_counter() - t0),
    }


# -- the grid --------------------------------------------------------------------------------------
def write_results(path: Path, settings: list[Setting], cells: list[dict], total: int) -> dict:
    """``results.json``: the settings, every finished cell, aggregates; ``partial`` until all
    ``total`` cells of the grid are in."""
    results = {
        "partial": len(cells) < total,
        "cells_done": len(cells),
        "cells_total": total,
        "task": "addition (2 digits)",
        "model": "tiny Qwen3-MoE (hidden 64, 4 MoE layers; 8 experts top-2, or setting C's 32 "
        "top-4), warmed up by a fixed number of supervised steps",
        "settings": {s.name: s.to_dict() for s in settings},
        "cells": cells,
        "aggregates": aggregate(cells),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return results


def run_grid(
    out: Path,
    results_path: Path,
    names: list[str],
    max_cells: int | None,
    steps: int,
    variants: list[str] | None = None,
):
    settings = [dataclasses.replace(SETTINGS[n], steps=steps) for n in names]
    by_name = {s.name: s for s in settings}
    shown = dict.fromkeys([*DEFAULT_SETTINGS, *names])  # the grid the results file is
    all_settings = [by_name.get(n, SETTINGS[n]) for n in shown]
    cells = json.loads(results_path.read_text())["cells"] if results_path.exists() else []
    total = len(grid_cells(all_settings))
    todo = pending(grid_cells(settings), cells)
    todo = [c for c in todo if not variants or c.variant in variants][:max_cells]
    skipped = []
    with ServerCache(out) as servers:
        for i, key in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] cell {key}", flush=True)
            try:
                cells.append(run_cell(servers, out, by_name[key.setting], key))
            except MissingFeature as e:
                skipped.append(str(e))
                continue
            write_results(results_path, all_settings, cells, total)
    for msg in dict.fromkeys(skipped):
        print(f"skipped: {msg}")
    return write_results(results_path, all_settings, cells, total)


# -- setting B's tuning ----------------------------------------------------------------------------
def tune(out: Path, path: Path, runs: list[tuple], steps: int, off: int) -> None:
    """Short runs ``(replay, load_balance_coef, imbalance_bias, router_lr_multiplier)`` at
    ``off``, seed 0, into ``path`` (kept: a finished run is not repeated)."""
    done = json.loads(path.read_text())["runs"] if path.exists() else []
    have = {_tune_key(r) for r in done}
    base = SETTINGS["B"]
    with ServerCache(out) as servers:
        for replay, coef, bias, router, stage in runs:
            if (replay, coef, bias, router, stage, steps) in have:
                continue
            s = dataclasses.replace(
                base,
                load_balance_coef=coef,
                imbalance_bias=bias,
                imbalance_stage=stage,
                router_lr_multiplier=router,
                steps=steps,
            )
            key = CellKey("tune", replay, off, 0)
            entry = run_cell(servers, out, s, key)
            imb = setting_model(out, s) / "imbalance.json"
            done.append(
                {
                    "replay": replay,
                    "load_balance_coef": coef,
                    "imbalance_bias": bias,
                    "router_lr_multiplier": router,
                    "imbalance_stage": stage,
                    "imbalance_experts": list(s.imbalance_experts),
                    "steps": steps,
                    "warm_start": json.loads(imb.read_text()) if imb.exists() else None,
                    **{k: v for k, v in entry.items() if k != "series"},
                    "series": {k: entry["series"][k] for k in (*LAG_KEYS, "load_balance")},
                }
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"off_policy_steps": off, "runs": done}, indent=1))


def _tune_key(r: dict) -> tuple:
    return (
        r["replay"],
        r["load_balance_coef"],
        r["imbalance_bias"],
        r.get("router_lr_multiplier", 30.0),
        r.get("imbalance_stage", "after"),
        r["steps"],
    )


def _tune_run(text: str) -> tuple[str, float, float, float, str]:
    """``"REPLAY COEF BIAS [ROUTER_LR_X [after|before]]"`` (router lr x 30, bias after the
    warm-up by default)."""
    replay, coef, bias, *rest = text.split()
    router = float(rest[0]) if rest else 30.0
    return replay, float(coef), float(bias), router, rest[1] if len(rest) > 1 else "after"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pr2-experiment", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--results", default=None, help="default: <out>/results.json")
    ap.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=list(DEFAULT_SETTINGS))
    ap.add_argument("--max-cells", type=int, default=None, help="stop after this many cells")
    ap.add_argument("--variants", nargs="+", default=None, help="only these variants' cells")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="trainer torch threads")
    ap.add_argument("--tune", metavar="PATH", default=None, help="run setting B's tuning runs")
    ap.add_argument(
        "--tune-runs",
        nargs="+",
        type=_tune_run,
        default=[],
        metavar='"REPLAY COEF BIAS [ROUTER_LR_X [STAGE]]"',
        help="tuning runs (off-policy 8, seed 0, --steps each)",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    import torch

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)  # 2 shared cores: more threads only spin
    # killed (SIGTERM) between cells: unwind, so the ServerCache stops its server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    if args.tune:
        tune(out, Path(args.tune), args.tune_runs, args.steps, 8)
        return
    results_path = Path(args.results or out / "results.json")
    res = run_grid(out, results_path, args.setting, args.max_cells, args.steps, args.variants)
    state = "partial" if res["partial"] else "complete"
    print(
        f"wrote {results_path} ({res['cells_done']}/{res['cells_total']} cells, {state}); "
        "regenerate docs/results.md and the plots: python -m trainer.experiments.report "
        f"{results_path} docs/results.md"
    )


if __name__ == "__main__":
    main()
