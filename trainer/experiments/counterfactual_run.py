"""``make counterfactual``: record R3 runs' drift streams, then score every predictor on them.

    python -m trainer.experiments.counterfactual_run record --setting C B --off 8 4 2 \\
        --seeds 10 11 12 [--steps 40] [--out runs/counterfactual]
    python -m trainer.experiments.counterfactual_run score [--out runs/counterfactual] \\
        [--results results/counterfactual/results.json] [--doc docs/counterfactual.md]

``record`` runs each (setting, off-policy, seed) as an R3 cell of
:mod:`trainer.experiments.grid_run` (the setting's warm start and server) with a
:class:`~trainer.experiments.drift_record.DriftRecorder` attached, one stream file per cell (a
finished cell is not rerun: resumable); the cells' own online metrics go to ``record.json``. The
recording seeds are not the grid's (0-3): the defaults chosen here are then tested online on other
seeds. ``score`` replays the streams offline (:mod:`trainer.experiments.counterfactual`) and
writes the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from trainer.experiments.grid import SETTINGS, CellKey
from trainer.experiments.grid_run import ServerCache, run_cell


def record(out: Path, names: list[str], offs: list[int], seeds: list[int], steps: int) -> None:
    from trainer.experiments.drift_record import DriftRecorder

    log = out / "record.json"
    done = json.loads(log.read_text()) if log.exists() else []
    with ServerCache(out) as servers:
        for name in names:
            setting = dataclasses.replace(SETTINGS[name], steps=steps)
            for off in offs:
                for seed in seeds:
                    stream = out / "streams" / f"{name}-{off}-{seed}.npz"
                    if stream.exists() and any(
                        (c["setting"], c["off_policy_steps"], c["seed"]) == (name, off, seed)
                        for c in done
                    ):
                        continue
                    print(f"record {name} off-policy {off} seed {seed}", flush=True)
                    key = CellKey(name, "r3", off, seed)

                    def attach(learner, cell_dir, stream=stream):
                        learner.observers.append(DriftRecorder(learner, stream))

                    entry = run_cell(servers, out, setting, key, learner_hook=attach)
                    entry = {k: v for k, v in entry.items() if k != "series"}
                    done = [
                        c
                        for c in done
                        if (c["setting"], c["off_policy_steps"], c["seed"]) != (name, off, seed)
                    ]
                    done.append({**entry, "stream": stream.name})
                    log.write_text(json.dumps(done, indent=1))
                    print(
                        f"  zero-deviation {entry['zero_deviation']:.4f} "
                        f"(off-policy {entry['zero_deviation_offpolicy']:.4f}), final acc "
                        f"{entry['final_eval_accuracy']}, {entry['wall_time_s']:.0f} s",
                        flush=True,
                    )


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(prog="counterfactual", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--out", default="runs/counterfactual")
    rec.add_argument("--setting", nargs="+", default=["C", "B"], choices=list(SETTINGS))
    rec.add_argument("--off", nargs="+", type=int, default=[8, 4, 2])
    rec.add_argument("--seeds", nargs="+", type=int, default=[10, 11, 12])
    rec.add_argument("--steps", type=int, default=40)
    sc = sub.add_parser("score")
    sc.add_argument("--out", default="runs/counterfactual")
    sc.add_argument("--results", default="results/counterfactual/results.json")
    sc.add_argument("--doc", default="docs/counterfactual.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    if args.cmd == "record":
        record(out, args.setting, args.off, args.seeds, args.steps)
    else:
        from trainer.experiments.counterfactual_report import score_all

        score_all(out, Path(args.results), Path(args.doc))


if __name__ == "__main__":
    main()
