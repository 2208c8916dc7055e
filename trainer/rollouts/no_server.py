"""What a run does when no rollout server is left
(:class:`trainer.rollouts.server_pool.NoServerLeft`): write
a checkpoint at a step boundary, so that ``pr2-train --resume`` continues the run once a server
is back, and name it in the exit message. Also with ``--save-every 0``.

Which step (:func:`stop_point`):

* the failure came before step ``s`` was trained (its rollouts, a re-sync): the state after
  step ``s - 1`` is saved, with the version the servers last committed; ``--resume`` redoes
  step ``s``;
* it came after (the push of step ``s``, its eval): step ``s`` itself is saved, its metrics
  row written first (marked ``stopped``), with the version its weights were pushed as -- the
  current one + 1 when the push did not get through. ``--resume`` then pushes them to every
  server behind that version and skips one that had committed them
  (:func:`trainer.checkpoint.checkpoints.resync_plan`).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.checkpoint import checkpoints
from trainer.run.progress import RunProgress


def stop_point(last_step: int, trained: dict | None, version: int) -> tuple[int, int, dict | None]:
    """``(step, weight version, metrics row to write first or None)`` of the checkpoint of a run
    that stopped after finishing ``last_step``, ``trained`` the metrics row of the last step
    trained (None: none yet), at weight ``version`` (the last the servers committed)."""
    if trained is None or trained["step"] <= last_step:  # step last_step + 1 not trained
        return last_step, version, None
    row = dict(trained)
    row.setdefault("pushed_version", version + 1)  # (set: the push got through)
    return row["step"], row["pushed_version"], row


def checkpoint_on_no_server(learner, cfg, progress: RunProgress, message: str, log=print) -> str:
    """What :meth:`trainer.run.loop.Trainer.run` does on ``NoServerLeft(message)``: the
    checkpoint (see the module docstring); what the exit message adds: where it is and how to
    go on."""
    if learner.shard[1] > 1:
        return "no checkpoint written (not supported under torchrun yet)"
    step, version, row = stop_point(progress.last_step, progress.trained, progress.version)
    try:
        if row is not None:
            row["stopped"] = "no rollout server left"
            with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        progress.version = version
        path = checkpoints.save_checkpoint(learner, cfg, progress, step)
    except Exception as e:  # the exit message says so; the run is lost past its last save
        log(f"could not write a checkpoint: {e!r}")
        return f"could not write a checkpoint: {e!r}"
    log(f"wrote {path} (step {step}, weight version {version})")
    return (
        f"wrote {path} (step {step}, weight version {version}): once a server answers again, "
        "run the same command with --resume to continue"
    )
