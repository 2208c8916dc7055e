"""When a call to a rollout server is tried again, and how: one rule for every caller.

* :func:`is_transient` -- which failures a retry can outlive: the connection refused, reset or
  dropped before a response (a server restarting), HTTP 429/502/503/504, gRPC ``UNAVAILABLE``,
  a server that answers but is not ready (:class:`NotReady`), and a server serving an older
  version than the request needs (:func:`is_stale_server`: it restarted on an older state, a
  re-sync fixes it). A 4xx refusal is never retried.
* :class:`Backoff` -- exponential delays with jitter; :class:`RetryPolicy` -- a time budget
  (``pr2-train --server-timeout``) and an optional attempt cap.
* :func:`call` -- try ``fn`` until it succeeds, a failure is not transient, or the budget is
  spent (then :class:`ServerDown`); one log line when an outage starts and one when it ends.
  Each try has a deadline (:func:`within_deadline`): a server that shows no sign of life for
  the budget -- no answer, none to a liveness probe: a hung process, a black-holed network --
  counts as down from when it went silent, instead of holding the call for the client's own
  timeout (600 s); a slow answer from a live server is waited for.
* :func:`push_attempts` -- a weight push is re-sent only after the server says the version is
  not committed (a push whose answer was lost may have been applied).
* :class:`Retrying` -- a client whose ``info`` and ``push_weights`` follow these rules (the
  trainer's start-up and resume calls, made before its server pool exists).

Pure but for the clock, the sleep and the random source, all injectable (the tests use a
fake clock).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pr2_serve.client.common import PROBE_TIMEOUT_S, ServerError

T = TypeVar("T")

#: HTTP statuses and gRPC codes of a server that may answer later.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504, "UNAVAILABLE"})


class NotReady(RuntimeError):
    """The server answers but is not ready to serve (``/readyz`` is not 200)."""


class ServerDown(RuntimeError):
    """A server failed transiently for longer than the retry budget."""

    def __init__(self, what: str, seconds: float, attempts: int, last: BaseException):
        super().__init__(
            f"{what}: the server failed for {seconds:.1f} s ({attempts} attempts; "
            f"the budget is spent): last error {last!r}"
        )
        self.what, self.seconds, self.attempts, self.last = what, seconds, attempts, last


class Hung(TimeoutError):
    """A server showed no sign of life for a try's deadline; ``since``: when it last did (the
    outage starts there, not when the deadline ran out)."""

    def __init__(self, what: str, silent_s: float, since: float):
        super().__init__(f"{what}: no answer and no sign of life for {silent_s:.1f} s")
        self.since = since


def is_stale_server(exc: BaseException) -> bool:
    """The server refused ``min_weight_version``: it serves an older version (a restart on an
    older state) and must be re-synced before it is used."""
    return (
        isinstance(exc, ServerError)
        and exc.status in (409, "FAILED_PRECONDITION")
        and exc.field == "min_weight_version"
    )


def is_transient(exc: BaseException) -> bool:
    """Whether a retry (after a re-sync) may succeed where ``exc`` failed."""
    if isinstance(exc, (NotReady, ServerDown, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ServerError):
        return exc.status in TRANSIENT_STATUSES or is_stale_server(exc)
    try:
        import httpx
    except ImportError:  # pragma: no cover - httpx is a dependency
        return False
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.ProxyError)):
        return False  # a wrong address, not an outage
    return isinstance(exc, httpx.TransportError)  # refused, reset, dropped, timed out


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``attempt`` (1, 2, ...): ``first_s * factor ** (attempt - 1)``
    capped at ``max_s``, minus up to ``jitter`` of it at random (callers do not retry in
    lock-step)."""

    first_s: float = 0.5
    factor: float = 2.0
    max_s: float = 10.0
    jitter: float = 0.5

    def delay(self, attempt: int, u: float) -> float:
        """``u``: a uniform draw in [0, 1)."""
        base = min(self.max_s, self.first_s * self.factor ** (attempt - 1))
        return base * (1.0 - self.jitter * u)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures for up to ``budget_s`` seconds from the first failure (and at
    most ``max_attempts`` tries, when set)."""

    budget_s: float = 300.0
    backoff: Backoff = field(default_factory=Backoff)
    max_attempts: int | None = None
    transient: Callable[[BaseException], bool] = is_transient
    #: a try whose server is silent this long is given up (:func:`within_deadline`); None: the
    #: budget; 0: no deadline
    deadline_s: float | None = None

    @property
    def deadline(self) -> float:
        return self.budget_s if self.deadline_s is None else self.deadline_s


@dataclass
class RetryStats:
    """What retrying cost, summed over calls: outages, re-sent requests, seconds in outage."""

    outages: int = 0
    resent: int = 0
    outage_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"outages": self.outages, "resent": self.resent, "outage_s": self.outage_s}


@dataclass
class Clock:
    """Time, sleep and randomness of :func:`call` (a fake in the tests)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    uniform: Callable[[], float] = random.random


#: How often a try that has not answered yet probes its server's liveness (seconds, at most).
PROBE_EVERY_S = 2.0


def within_deadline(
    fn: Callable[[], T],
    deadline_s: float,
    alive: Callable[[float], bool] | None = None,
    *,
    what: str = "call",
    now: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, given up with :class:`Hung` once its server has shown no sign of life for
    ``deadline_s``: neither the answer nor an answer to ``alive(timeout)`` (probed while ``fn``
    runs). A long call on a live server is waited for; without ``alive`` (a client that cannot
    be probed cannot tell hung from slow) or with ``deadline_s <= 0`` there is no deadline.

    ``fn`` runs in a daemon thread; a given-up one is left to end with its client's own
    timeout (its result is dropped)."""
    if deadline_s <= 0 or alive is None:
        return fn()
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e
        finally:
            done.set()

    threading.Thread(target=run, name=f"pr2-call {what}", daemon=True).start()
    last = now()
    while not done.wait(min(PROBE_EVERY_S, deadline_s / 4)):
        left = deadline_s - (now() - last)
        if alive(max(0.05, min(PROBE_TIMEOUT_S, left))):
            last = now()
        elif now() - last >= deadline_s and not done.is_set():
            raise Hung(what, now() - last, last)
    if "err" in box:
        raise box["err"]
    return box["out"]


def call(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy,
    *,
    log: Callable[[str], None] = print,
    clock: Clock | None = None,
    stats: RetryStats | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    alive: Callable[[float], bool] | None = None,
) -> T:
    """``fn()``, tried again on transient failures until ``policy``'s budget is spent.

    ``on_failure(exc)`` runs after each transient failure (e.g. to mark the server for a
    re-sync that ``fn`` does before its next try). Each try has ``policy.deadline``
    (:func:`within_deadline`, ``alive``: the server's liveness probe). Raises the first
    non-transient error, or :class:`ServerDown` once the budget is spent."""
    clock = clock or Clock()
    stats = stats if stats is not None else RetryStats()
    start, attempts = None, 0
    while True:
        try:
            out = within_deadline(fn, policy.deadline, alive, what=what, now=clock.now)
        except Exception as e:
            if not policy.transient(e):
                raise
            attempts += 1
            now = clock.now()
            if start is None:
                start = e.since if isinstance(e, Hung) else now
                stats.outages += 1
                log(f"outage: {what} failed ({e!r}); retrying for up to {policy.budget_s:g} s")
            if on_failure is not None:
                on_failure(e)
            spent = now - start
            if spent >= policy.budget_s or attempts == policy.max_attempts:
                stats.outage_s += spent
                log(f"outage: {what}: giving up after {spent:.1f} s and {attempts} attempts")
                raise ServerDown(what, spent, attempts, e) from e
            wait = policy.backoff.delay(attempts, clock.uniform())
            clock.sleep(min(wait, policy.budget_s - spent))
            stats.resent += 1
            continue
        if start is not None:
            spent = clock.now() - start
            stats.outage_s += spent
            log(f"outage over: {what} succeeded after {spent:.1f} s ({attempts} re-sent)")
        return out


def push_attempts(
    send: Callable[[], dict],
    served_version: Callable[[], int],
    version: int,
    maybe_sent: bool = False,
) -> Callable[[], dict]:
    """A push as repeatable attempts: the first sends; each later one first asks the server
    which version it serves -- ``version`` already: the lost push was committed, done (no
    second upload); older: send again; newer: a :class:`ServerError` (someone else pushed).
    ``maybe_sent``: the version may already have arrived by another path (a failed collective
    push): the first attempt asks too."""
    sent = maybe_sent

    def attempt() -> dict:
        nonlocal sent
        if sent:
            serving = served_version()
            if serving == version:
                return {"weight_version": version}
            if serving > version:
                raise ServerError(
                    409, f"server serves version {serving}, newer than the push {version}"
                )
        sent = True
        return send()

    return attempt


class Retrying:
    """``client`` with its ``info`` and ``push_weights`` tried again by :func:`call` under
    ``policy`` (a push by the :func:`push_attempts` rule); its other attributes as they are.

    What the trainer calls at start-up (data source, weight agreement, resume): a server that
    is briefly down or still loading then is waited for, up to ``--server-timeout``."""

    def __init__(self, client, address: str, policy: RetryPolicy, *, log=print, clock=None):
        self.client, self.address, self.policy = client, address, policy
        self.log, self.clock = log, clock

    def _call(self, fn: Callable[[], T], what: str) -> T:
        what = f"{what} on {self.address}"
        alive = getattr(self.client, "alive", None)
        return call(fn, what, self.policy, log=self.log, clock=self.clock, alive=alive)

    def info(self) -> dict:
        return self._call(self.client.info, "info")

    def push_weights(self, weights, version: int, *args, **kwargs) -> dict:
        c = self.client
        send = partial(c.push_weights, weights, version, *args, **kwargs)
        attempt = push_attempts(send, lambda: c.info()["weight_version"], version)
        return self._call(attempt, f"push of version {version}")

    def __getattr__(self, name: str):
        return getattr(self.client, name)
