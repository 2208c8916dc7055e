"""The retry rule of every trainer -> server call (``pr2_serve/client/retry.py``): which
failures are transient, the backoff schedule, the budget (a fake clock), and when a push is
re-sent."""

from __future__ import annotations

import httpx
import pytest

from pr2_serve.client import ServerError
from pr2_serve.client.retry import (
    Backoff,
    Clock,
    NotReady,
    RetryPolicy,
    RetryStats,
    ServerDown,
    call,
    is_transient,
    push_attempts,
)


class FakeClock(Clock):
    """Time moves only when the code under test sleeps; jitter draws are 0."""

    def __init__(self) -> None:
        self.t, self.sleeps = 0.0, []
        super().__init__(now=lambda: self.t, sleep=self._sleep, uniform=lambda: 0.0)

    def _sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def failing(n: int, exc: Exception, value="ok"):
    """A callable failing ``n`` times with ``exc``, then returning ``value``; its call count."""
    calls = [0]

    def fn():
        calls[0] += 1
        if calls[0] <= n:
            raise exc
        return value

    return fn, calls


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("dropped"),
        httpx.ReadError("reset"),
        httpx.ReadTimeout("slow"),
        ServerError(503, "loading"),
        ServerError(502, "bad gateway"),
        ServerError("UNAVAILABLE", "connection refused"),
        ServerError(409, "serving 1 < 2", "min_weight_version"),
        ServerError("FAILED_PRECONDITION", "serving 1 < 2", "min_weight_version"),
        NotReady("loading"),
        ConnectionRefusedError(),
        ServerDown("generate", 3.0, 2, httpx.ConnectError("x")),
    ],
)
def test_transient_failures(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ServerError(400, "bad prompt", "prompts[0]"),
        ServerError(401, "unauthenticated"),
        ServerError(409, "stale version", "version"),
        ServerError("INVALID_ARGUMENT", "bad"),
        ServerError(500, "engine error"),
        httpx.UnsupportedProtocol("ftp://"),
        ValueError("a bug"),
    ],
)
def test_refusals_and_bugs_are_not_retried(exc):
    assert not is_transient(exc)


def test_backoff_doubles_up_to_its_cap_and_jitter_shortens_it():
    b = Backoff(first_s=0.5, factor=2.0, max_s=4.0, jitter=0.5)
    assert [b.delay(a, 0.0) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay(3, 1.0) == 1.0  # at most half of it taken off


def test_a_short_outage_is_outlived_with_one_line_at_each_end():
    clock, lines, stats = FakeClock(), [], RetryStats()
    fn, calls = failing(3, httpx.ConnectError("refused"))
    policy = RetryPolicy(budget_s=60, backoff=Backoff(first_s=1, jitter=0))
    assert call(fn, "generate", policy, log=lines.append, clock=clock, stats=stats) == "ok"
    assert calls[0] == 4 and clock.sleeps == [1, 2, 4]
    assert stats.as_dict() == {"outages": 1, "resent": 3, "outage_s": 7.0}
    assert len(lines) == 2 and "outage: generate failed" in lines[0]
    assert "outage over: generate" in lines[1] and "3 re-sent" in lines[1]


def test_the_budget_bounds_the_outage():
    clock, lines = FakeClock(), []
    fn, _calls = failing(10**6, httpx.ConnectError("refused"))
    policy = RetryPolicy(budget_s=10, backoff=Backoff(first_s=1, jitter=0))
    with pytest.raises(ServerDown) as e:
        call(fn, "push", policy, log=lines.append, clock=clock)
    assert clock.sleeps == [1, 2, 4, 3]  # the last wait ends at the budget
    assert e.value.seconds == 10 and e.value.attempts == 5
    assert isinstance(e.value.last, httpx.ConnectError)
    assert "giving up after 10.0 s" in lines[-1]


def test_a_refusal_is_raised_at_once():
    clock = FakeClock()
    fn, calls = failing(1, ServerError(400, "bad"))
    with pytest.raises(ServerError):
        call(fn, "generate", RetryPolicy(), log=lambda _: None, clock=clock)
    assert calls[0] == 1 and clock.sleeps == []


def test_attempt_cap_and_on_failure():
    seen = []
    fn, calls = failing(5, NotReady("loading"))
    policy = RetryPolicy(budget_s=1e9, max_attempts=2)
    with pytest.raises(ServerDown):
        call(fn, "x", policy, log=lambda _: None, clock=FakeClock(), on_failure=seen.append)
    assert calls[0] == 2 and len(seen) == 2


class Pushes:
    """A server for push_attempts: the first upload is applied (or not) but its answer lost."""

    def __init__(self, apply_lost: bool, serving: int = 3):
        self.serving, self.apply_lost, self.uploads = serving, apply_lost, 0

    def send(self, version: int) -> dict:
        self.uploads += 1
        if self.uploads == 1:
            if self.apply_lost:
                self.serving = version
            raise httpx.RemoteProtocolError("no response")
        self.serving = version
        return {"weight_version": version, "num_tensors": 1}


@pytest.mark.parametrize("committed", [True, False])
def test_a_push_is_sent_again_only_when_not_committed(committed):
    srv = Pushes(apply_lost=committed)
    attempt = push_attempts(lambda: srv.send(4), lambda: srv.serving, 4)
    policy = RetryPolicy(budget_s=10, backoff=Backoff(first_s=0))
    out = call(attempt, "push", policy, log=lambda _: None, clock=FakeClock())
    assert out["weight_version"] == 4 and srv.serving == 4
    assert srv.uploads == (1 if committed else 2)


def test_a_push_overtaken_by_a_newer_version_is_refused():
    attempt = push_attempts(lambda: (_ for _ in ()).throw(httpx.ConnectError("x")), lambda: 9, 4)
    with pytest.raises(httpx.ConnectError):
        attempt()
    with pytest.raises(ServerError, match="newer than the push 4"):
        attempt()


def test_a_retrying_client_outlives_a_start_up_outage_and_pushes_once():
    from pr2_serve.client.retry import Retrying

    class Client:
        def __init__(self):
            self.info_calls, self.pushes, self.serving = 0, [], 2

        def info(self):
            self.info_calls += 1
            if self.info_calls <= 2:  # still starting: refused twice
                raise httpx.ConnectError("refused")
            return {"weight_version": self.serving}

        def push_weights(self, weights, version):
            self.pushes.append(version)
            self.serving = version
            raise httpx.RemoteProtocolError("answer lost")  # committed all the same

        def close(self):
            return "closed"

    lines, clock = [], FakeClock()
    c = Client()
    r = Retrying(
        c,
        "a",
        RetryPolicy(budget_s=10, backoff=Backoff(first_s=1, jitter=0)),
        log=lines.append,
        clock=clock,
    )
    assert r.info() == {"weight_version": 2} and clock.sleeps == [1, 2]
    assert r.push_weights("w", 3) == {"weight_version": 3} and c.pushes == [3]
    assert r.close() == "closed"  # other calls: the client's own
    assert lines[0].startswith("outage: info on a failed") and len(lines) == 4
    c.info_calls = -10
    with pytest.raises(ServerDown, match="info on a"):
        Retrying(c, "a", RetryPolicy(budget_s=3), log=lines.append, clock=FakeClock()).info()
