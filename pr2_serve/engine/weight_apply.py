"""How :class:`~pr2_serve.engine.rollout_engine.RolloutEngine` applies weights on its engine
thread, between steps: the live, bucketed update every server transport uses
(:meth:`WeightApply.apply_live`, :mod:`pr2_serve.engine.live_apply`) and the whole-model reload
(in-process ``update_weights``, rollbacks)."""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

from pr2_serve.core.served_checkpoint import (
    CanaryError,
    WeightValidationError,
    require_newer,
)
from pr2_serve.core.types import UpdateResult
from pr2_serve.engine.jobs import Update, resolve
from pr2_serve.engine.live_apply import LiveJob, RestoreFailed, file_feed, run_canary, run_live

__all__ = ["WeightApply"]


class WeightApply:
    """The weight-applying half of the engine (its state lives on the engine: ``_llm``,
    ``_weights``, ``_files``, ``_base_files``, ``state_dir``, ``weight_version``,
    ``undo_limit``)."""

    def check_files(self, paths) -> dict[str, str]:
        """``{name: file}`` of safetensors files whose headers pass (names, shapes, floating
        dtypes; values are checked as they are applied): an update for :meth:`apply_live`."""
        files: dict[str, str] = {}
        for path in paths:
            path = str(Path(path).resolve())
            files.update(dict.fromkeys(self._weights.check_file(path), path))
        return files

    def apply_live(
        self,
        files: dict[str, str],
        version: int,
        *,
        feed=None,
        confirm=None,
        canary=None,
        bucket_bytes: int,
    ) -> cf.Future:
        """Apply an update to the live model bucket by bucket, checking each bucket's values
        as it goes (:mod:`pr2_serve.engine.live_apply`); future of :class:`UpdateResult`.

        ``files``: the update's ``{name: file}``, complete once ``feed(llm)`` has handed the
        workers every bucket (default: read ``files`` in buckets of ``bucket_bytes``);
        ``confirm(llm, ok)``: called after the canary (``ok``: it passed; raising undoes the
        update) or after a failure (``ok`` False: loose ends), for what the feed's source checks
        last (an upload's checksum, a transfer's file writes). On any failure (a non-finite
        bucket, a broken feed, ``canary``, ``confirm``) the model is restored and the previous
        version serves on.
        """
        require_newer(version, self.weight_version)
        job = LiveJob(dict(files), version, len(files), cf.Future())
        job.feed = feed or file_feed(dict(files), bucket_bytes)
        job.confirm = confirm
        job.canary, job.undo_limit = canary, self.undo_limit
        self._put(("update", job))
        return job.future

    def _apply_update(self, upd: Update) -> None:
        if isinstance(upd, LiveJob):
            return self._apply_live(upd)
        try:
            require_newer(upd.version, self.weight_version)
            base = self._base_files if upd.replace else self._files
            files = {**base, **upd.files}
            if upd.replace:  # predictors the set lacks are zero, not left as they are
                files = self._weights.with_zero_predictors(files, self.state_dir)
            reload_s = self._reload(files)
            problem = self._run_canary(upd.canary, upd.version) if upd.canary else None
            if problem is not None:  # back to the previous weights (a complete set)
                self._files = self._weights.with_zero_predictors(self._files, self.state_dir)
                self._reload(self._files)
                raise CanaryError(f"the canary generate failed on the new weights: {problem}")
            self._files = files
            self._served(upd, reload_s)
        except WeightValidationError as e:
            resolve(upd.future, error=e)

    def _apply_live(self, job: LiveJob) -> None:
        try:
            reload_s = run_live(self, job)
        except RestoreFailed:
            raise  # the engine no longer knows what it serves: it stops
        except Exception as e:  # restored: the previous version serves on
            resolve(job.future, error=e)
            return
        self._files = {**self._files, **job.files}
        self._served(job, reload_s)

    def _served(self, upd: Update, reload_s: float) -> None:
        self.weight_version = upd.version
        self._llm.set_weight_version(str(upd.version))
        seconds = time.perf_counter() - upd.submitted
        resolve(
            upd.future,
            UpdateResult(
                weight_version=upd.version,
                num_tensors=upd.num_tensors,
                seconds=seconds,
                reload_seconds=reload_s,
            ),
        )

    def _reload(self, files: dict[str, str]) -> float:
        """Reload every weight from ``files``, flush the prefix cache and zero the KV cache;
        the seconds it took."""
        t0 = time.perf_counter()
        self._llm.collective_rpc("pr2_reload_weights", args=(files,))
        self._flush_caches()
        return time.perf_counter() - t0

    def _flush_caches(self) -> None:
        """After a weight change: flush the prefix cache, zero the KV cache."""
        if not self._llm.reset_prefix_cache():
            # Never serve KV computed by the old weights; nothing runs now, so this is a bug.
            raise RuntimeError("prefix cache could not be flushed after a weight update")
        # Weights that made NaN/Inf leave them in KV slots; attention reads stale slots of a
        # reused block (masked, but NaN x 0 is NaN), so later requests would come out NaN.
        self._llm.collective_rpc("pr2_zero_kv_caches")

    def _run_canary(self, canary, version: int) -> str | None:
        return run_canary(self, canary, version)
