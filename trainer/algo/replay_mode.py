"""The routing replay modes (``--replay``), and what each one does, asked once here.

=====  ====================================================  =======================
mode   the training forwards route with                      the servers serve
=====  ====================================================  =======================
none   the trainer's own router (natural routing)            a zero predictor
r2     the routes the trainer's old pass chose (recorded)    a zero predictor
r3     the routes the server chose in the rollout            a zero predictor
pr2    the routes the server chose, with its predictor       the policy's predictor
=====  ====================================================  =======================
"""

from __future__ import annotations

from enum import StrEnum


class ReplayMode(StrEnum):
    """A replay mode; a ``str`` (``ReplayMode.PR2 == "pr2"``), so configs and metrics files keep
    plain strings."""

    NONE = "none"
    R2 = "r2"
    R3 = "r3"
    PR2 = "pr2"

    @property
    def replays_server_routes(self) -> bool:
        """Training forwards are forced onto the routes the server returned with each sample."""
        return self in (ReplayMode.R3, ReplayMode.PR2)

    @property
    def records_old_routes(self) -> bool:
        """The old pass records its own routes, and the mini-steps replay those (R2)."""
        return self is ReplayMode.R2

    @property
    def serves_predictor(self) -> bool:
        """The servers route with the policy's evolution predictor (pushed with the weights)."""
        return self is ReplayMode.PR2
