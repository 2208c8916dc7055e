"""Where a run is: the counters a checkpoint saves and the no-server stop reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunProgress:
    version: int = 0
    """The weight version every live server serves (the last push committed)."""
    last_step: int = 0
    """The last step finished (trained, pushed, its metrics row written)."""
    trained: dict | None = None
    """The metrics row of the last step trained: ahead of ``last_step`` when its push failed."""
    dropped_stale: int = 0
    """Samples dropped so far for being too many versions old (whole groups)."""
    dropped_bad_routes: int = 0
    """Samples dropped so far for routes that cannot be trained on (whole groups)."""
