"""``pr2-train``: PPO/GRPO with routing replay against pr2 rollout servers.

    pr2-train --servers http://127.0.0.1:8000 --model-dir runs/demo/model --replay pr2 \\
        --off-policy-steps 2 --steps 20 --output-dir runs/train

Under ``torchrun --nproc_per_node N`` the training step runs data-parallel (DDP, or FSDP2 with
``--parallel fsdp2``; gloo on CPU, nccl on GPU): rank 0 requests rollouts, evaluates and
pushes; every rank trains on its share.
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.table import Table

from trainer.run.config import parse_config

COLUMNS = [
    ("step", "{:d}"),
    ("weight_version", "{:d}"),
    ("reward_mean", "{:.3f}"),
    ("zero_deviation", "{:.3f}"),
    ("train_infer_kl", "{:.2e}"),
    ("predictor_hit_rate", "{:.3f}"),
    ("clip_fraction", "{:.3f}"),
    ("grad_norm", "{:.2f}"),
    ("eval_accuracy", "{:.3f}"),
]


def format_row(m: dict) -> list[str]:
    out = []
    for key, fmt in COLUMNS:
        v = m.get(key)
        out.append("" if v is None else fmt.format(v))
    return out


def format_line(m: dict) -> str:
    """One step's metrics as ``name=value`` pairs (the table's columns that have a value)."""
    return "  ".join(f"{c}={v}" for (c, _), v in zip(COLUMNS, format_row(m), strict=True) if v)


def main(argv: list[str] | None = None) -> None:
    from trainer.data.prompt_data import DatasetError
    from trainer.data.rewards import RewardError, user_traceback

    try:
        _main(argv)
    except (DatasetError, RewardError) as e:  # bad data or a failing reward: its message
        if isinstance(e, RewardError) and (tb := user_traceback(e)):
            sys.stderr.write(tb)  # the user's own frames: where in their code it raised
        raise SystemExit(f"pr2-train: {e}") from e


def _main(argv: list[str] | None) -> None:
    cfg = parse_config(argv)
    from pr2_serve.client.retry import ServerDown
    from trainer.rollouts.server_pool import NoServerLeft
    from trainer.run.distributed import run_distributed

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            run_distributed(cfg)  # (torchrun stops the other ranks when rank 0 exits)
        else:
            train(cfg)
    except (NoServerLeft, ServerDown) as e:  # a clear message and a non-zero exit, no traceback
        raise SystemExit(f"pr2-train: {e}") from None


def train(cfg) -> None:
    """One process: the run, a line per step, a table and a summary."""
    from trainer.run.loop import Trainer

    console = Console()
    console.print(f"[bold]pr2-train[/bold] {json.dumps(cfg.to_dict())}")
    table = Table(
        *[c for c, _ in COLUMNS], title=f"replay={cfg.replay} off-policy={cfg.off_policy_steps}"
    )
    with Trainer(cfg) as trainer, console.status("training...") as status:

        def on_step(m: dict) -> None:
            status.update(f"step {m['step']}/{cfg.steps}  reward {m.get('reward_mean', 0):.3f}")
            console.print(format_line(m))
            table.add_row(*format_row(m))

        history = trainer.run(on_step)
    console.print(table)
    first, last = history[0], history[-1]
    console.print(
        f"reward {first.get('reward_mean')} -> {last.get('reward_mean')}; "
        f"metrics in {cfg.output_dir}/metrics.jsonl"
    )


if __name__ == "__main__":
    main()
