"""Whether the service serves, in one place: its phase (loading, restoring, warming up,
serving), whether the served weights pass the canary, and the engine's health.

Every question about it is asked here: ``/readyz`` and gRPC health (:meth:`Readiness.serving`,
:meth:`Readiness.reason`), admission of a generate (:meth:`Readiness.admit`), of a weight change
(:meth:`Readiness.require_loaded`) and of ``/v1/info`` (:meth:`Readiness.require_info`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from pr2_serve.service.errors import ApiError

__all__ = ["Phase", "Readiness"]


class Phase(Enum):
    LOADING = "loading"  # no engine yet
    RESTORING = "restoring"  # re-applying the committed weights: no version to report yet
    WARMING = "warming up"  # engine and weights there, the first canary not answered
    SERVING = "serving"  # warmed up; generates are taken while fit and healthy


class Readiness:
    """The service's one readiness state. ``on_fitness(fit)`` is called when fitness changes
    (gRPC health)."""

    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.unfit: str | None = None  # why the served weights fail the canary
        self.on_fitness: Callable[[bool], object] | None = None

    def set_fitness(self, problem: str | None, version: int) -> None:
        """The canary's verdict on weight ``version`` (None: it passed)."""
        was = self.unfit is None
        self.unfit = None if problem is None else f"weight version {version}: {problem}"
        if self.on_fitness is not None and was != (self.unfit is None):
            self.on_fitness(self.unfit is None)

    def loaded(self, engine) -> bool:
        """An engine is attached and warmed up (whatever its fitness and health)."""
        return self.phase is Phase.SERVING and engine is not None

    def reason(self, engine) -> str | None:
        """Why generates are refused now, or None: serving."""
        if not self.loaded(engine):
            return "loading"
        if not engine.healthy():
            return "the engine has failed"
        if self.unfit is not None:
            return f"the served weights fail the canary ({self.unfit}): push or roll back"
        return None

    def serving(self, engine) -> bool:
        """Loaded, warmed up, healthy and the served weights pass the canary."""
        return self.reason(engine) is None

    def require_loaded(self, engine) -> None:
        """Weight changes need a warmed-up engine (fitness aside: an unfit server takes them)."""
        if not self.loaded(engine):
            raise ApiError(503, "unavailable", "the engine is not ready")

    def admit(self, engine) -> None:
        """A generate is taken only while serving."""
        self.require_loaded(engine)
        why = self.reason(engine)
        if why is not None:
            raise ApiError(503, "unavailable", why)

    def require_info(self, engine) -> None:
        """``/v1/info`` needs the engine and a settled weight version."""
        if engine is None:
            raise ApiError(503, "unavailable", "the model is still loading")
        if self.phase is Phase.RESTORING:
            raise ApiError(503, "unavailable", "restoring the committed weights")
