"""A weight update applied to the live model bucket by bucket, on the engine thread.

Every way weights arrive ends here (:meth:`RolloutEngine.apply_live`): the workers start an
update session (:mod:`pr2_serve.plugin.live_update`), the update's ``feed`` hands them its
buckets (a file read in buckets, or a collective transfer received bucket by bucket: each is
checked and loaded while the next one is read or on the wire), the session finishes, the caches
are flushed and the canary runs. On any failure (a bad bucket, a broken transfer, the canary) the
workers undo what was loaded (bit for bit) and the previous version serves on; past the undo's
bound the previous version's files are reloaded instead.

Running requests finish on the old weights first and new ones wait until the update is over (as
for every update): a sample never mixes versions, so generation pauses for the update, which now
costs one pass over the bytes (receive and apply overlap) instead of receive, check and reload.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pr2_serve.core.served_checkpoint import CanaryError, require_newer
from pr2_serve.engine.jobs import Job, Update
from pr2_serve.plugin.live_update import (
    live_abort,
    live_apply_files,
    live_begin,
    live_end,
    live_finish,
)

__all__ = ["DEFAULT_UNDO_LIMIT", "LiveJob", "RestoreFailed", "file_feed", "run_canary", "run_live"]

CANARY_MAX_STEPS = 256  # a canary job (a few short greedy prompts) finishes well within this
DEFAULT_UNDO_LIMIT = 8 << 30
"""Bytes of previous tensor values an update keeps to undo itself (past it: reload from disk)."""


class RestoreFailed(RuntimeError):
    """Undoing a failed update failed: the engine cannot tell what it serves and stops."""


@dataclass
class LiveJob(Update):
    """An update applied live: ``feed(llm)`` hands the workers its buckets; ``files`` are its
    ``{name: file}`` once complete (the served set for later updates and restarts)."""

    feed: Callable | None = None
    confirm: Callable | None = None  # confirm(llm, ok): after the canary (see run_live)
    canary: Any = None
    undo_limit: int = DEFAULT_UNDO_LIMIT


def file_feed(files: dict[str, str], bucket_bytes: int) -> Callable:
    """A ``feed`` reading ``{name: file}`` in buckets (inside each worker)."""

    def feed(llm) -> None:
        llm.collective_rpc(live_apply_files, args=(files, bucket_bytes))

    return feed


def run_live(engine, job: LiveJob) -> float:
    """Apply ``job`` with its canary on the engine thread; the seconds until the canary (see
    module docstring). Raises the update's error after the model is restored."""
    llm = engine._llm
    require_newer(job.version, engine.weight_version)
    t0 = time.perf_counter()
    llm.collective_rpc(live_begin, args=(job.undo_limit,))
    try:
        job.feed(llm)
        llm.collective_rpc(live_finish, args=(dict(engine._files),))
        engine._flush_caches()
        seconds = time.perf_counter() - t0
        problem = run_canary(engine, job.canary, job.version) if job.canary else None
        if problem is not None:
            raise CanaryError(f"the canary generate failed on the new weights: {problem}")
        if job.confirm is not None:  # what the feed's source still had to check (raises: undo)
            job.confirm(llm, True)
    except BaseException as e:
        if job.confirm is not None:
            with contextlib.suppress(Exception):
                job.confirm(llm, False)  # its loose ends, after a failure
        restore(engine, e)
        raise
    llm.collective_rpc(live_end)
    return seconds


def restore(engine, cause: BaseException) -> None:
    """Undo a failed live update on every worker; reload the served files if an undo passed
    its bound; flush the caches (the canary may have filled them)."""
    try:
        complete = all(engine._llm.collective_rpc(live_abort))
        if not complete:
            files = engine._weights.with_zero_predictors(engine._files, engine.state_dir)
            engine._llm.collective_rpc("pr2_reload_weights", args=(files,))
        engine._flush_caches()
    except BaseException as e:
        raise RestoreFailed(f"restoring the weights after {cause!r} failed: {e!r}") from e


def run_canary(engine, canary, version: int) -> str | None:
    """Generate the canary's prompts on the weights just loaded, before any other request
    starts (none is running); the problem ``canary.check`` finds, or None."""
    t0 = time.perf_counter()
    job = Job(list(canary.prompts), canary.sampling, True, True, cf.Future())
    engine._jobs.start(job, version)
    for _ in range(CANARY_MAX_STEPS):
        if job.future.done():
            break
        engine._step()
    if not job.future.done():
        engine._jobs.abort(job)
        problem = f"it did not finish in {CANARY_MAX_STEPS} steps"
    elif (exc := job.future.exception()) is not None:
        problem = f"generate failed: {exc}"
    else:
        problem = canary.check(job.future.result())
    canary.seconds = time.perf_counter() - t0
    return problem
