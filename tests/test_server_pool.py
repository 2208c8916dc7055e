"""The trainer's server pool (``trainer/rollouts/server_pool.py``) with fake clients: rollouts
spread over
live servers, outages outlived with the same request, a restarted server re-synced before use,
a dead server dropped (its prompts go to the others) and taken back -- by version and content
fingerprints --, no server left, and a failed collective push finished server by server."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from pr2_serve.client import GenerateResult, ServerError
from pr2_serve.client.retry import Backoff, RetryPolicy
from tests.test_retry_policy import FakeClock
from trainer.rollouts.server_pool import RESPREAD_SEED, NoServerLeft, ServerPool
from trainer.run.config import parse_config


class FakeServer:
    """A rollout server in memory: ``down`` refuses connections; ``fail`` refuses the next
    ``fail`` calls; ``restart_at`` (a version) is where it comes back after its next failure."""

    def __init__(self, name: str, version: int = 0):
        self.name, self.version = name, version
        self.down, self.fail, self.restart_at = False, 0, None
        self.generates: list[tuple] = []  # (prompts, seed) of every generate that answered
        self.uploads: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def _gate(self) -> None:
        with self.lock:
            if self.down or self.fail:
                self.fail = max(0, self.fail - 1)
                if self.restart_at is not None:
                    self.version, self.restart_at = self.restart_at, None
                raise httpx.ConnectError(f"{self.name}: refused")

    def info(self) -> dict:
        self._gate()
        return {"weight_version": self.version}

    def ready(self) -> bool:
        return not self.down

    def generate(self, prompts, n=2, seed=None, min_weight_version=0, **_) -> GenerateResult:
        self._gate()
        if min_weight_version > self.version:
            raise ServerError(409, "older", "min_weight_version")
        self.generates.append(([list(p) for p in prompts], seed))
        samples = [
            SimpleNamespace(prompt_index=i, sample_index=k, weight_version=self.version, p=p)
            for i, p in enumerate(prompts)
            for k in range(n)
        ]
        return GenerateResult(self.version, samples)

    def push_weights(self, path: str, version: int) -> dict:
        self._gate()
        if version <= self.version:
            raise ServerError(409, "stale version", "version")
        self.version = version
        self.uploads.append((path, version))
        return {"weight_version": version}


def make_pool(servers, tmp_path, **kw) -> tuple[ServerPool, list[str], FakeClock]:
    lines: list[str] = []
    clock = FakeClock()
    policy = RetryPolicy(budget_s=10, backoff=Backoff(first_s=1, jitter=0))
    pool = ServerPool(
        servers,
        [s.name for s in servers],
        servers[0].version,
        policy=policy,
        keep_dir=tmp_path / "keep",
        log=lines.append,
        clock=clock,
        **kw,
    )
    return pool, lines, clock


def weights(tmp_path, v: int) -> str:
    path = tmp_path / f"w{v}.safetensors"
    path.write_bytes(b"weights %d" % v)
    return path


PROMPTS = [[i, i + 1] for i in range(5)]


def check_groups(groups, n=2):
    assert [g[0].p for g in groups] == PROMPTS
    assert all([s.sample_index for s in g] == list(range(n)) for g in groups)


def test_prompts_are_spread_over_the_servers_with_a_seed_per_part(tmp_path):
    a, b = FakeServer("a"), FakeServer("b")
    pool, _, _ = make_pool([a, b], tmp_path)
    check_groups(pool.generate(PROMPTS, seed=100))
    assert a.generates == [([PROMPTS[0], PROMPTS[2], PROMPTS[4]], 100)]
    assert b.generates == [([PROMPTS[1], PROMPTS[3]], 101)]
    assert pool.metrics()["live_servers"] == 2 and pool.metrics()["resent_requests"] == 0


def test_a_short_outage_resends_the_same_request(tmp_path):
    a = FakeServer("a")
    a.fail = 2
    pool, lines, _clock = make_pool([a], tmp_path)
    check_groups(pool.generate(PROMPTS, seed=7))
    assert a.generates == [(PROMPTS, 7)]  # answered once, with the first request's seed
    m = pool.metrics()
    assert m["resent_requests"] == 2 and m["server_outages"] == 1 and m["outage_seconds"] == 3
    assert any("outage over: generate on a" in line for line in lines)


def test_a_server_restarted_on_an_older_state_is_resynced_before_use(tmp_path):
    a = FakeServer("a")
    pool, _lines, _ = make_pool([a], tmp_path)
    pool.push(weights(tmp_path, 1), 1)
    pool.push(weights(tmp_path, 2), 2)
    a.fail, a.restart_at = 1, 1  # killed; back on version 1 (its state restored from a backup)
    groups = pool.generate(PROMPTS, seed=0, min_weight_version=2)
    assert {s.weight_version for g in groups for s in g} == {2}
    kept = tmp_path / "keep" / "weights-v2.safetensors"
    assert a.uploads[-1] == (str(kept), 2) and kept.read_bytes() == b"weights 2"
    assert not (tmp_path / "keep" / "weights-v1.safetensors").exists()
    assert pool.metrics()["resync_pushes"] == 1
    assert len(a.generates) == 1  # nothing was generated on the old version


def test_a_silently_older_server_is_resynced_on_its_refusal(tmp_path):
    a = FakeServer("a")
    pool, _, _ = make_pool([a], tmp_path)
    pool.push(weights(tmp_path, 1), 1)
    a.version = 0  # a 409 on min_weight_version: stale, re-synced, asked again
    groups = pool.generate(PROMPTS, seed=0, min_weight_version=1)
    assert {s.weight_version for g in groups for s in g} == {1}


def test_a_dead_server_is_dropped_its_prompts_go_to_the_others_and_it_is_taken_back(tmp_path):
    a, b = FakeServer("a"), FakeServer("b")
    pool, lines, clock = make_pool([a, b], tmp_path)
    pool.push(weights(tmp_path, 1), 1)
    a.down = True
    check_groups(pool.generate(PROMPTS, seed=100))
    assert b.generates[-1] == ([PROMPTS[0], PROMPTS[2], PROMPTS[4]], 100 + RESPREAD_SEED)
    assert pool.metrics()["live_servers"] == 1 and clock.t >= 10
    assert any("server a dropped from the rotation" in line for line in lines)
    pool.push(weights(tmp_path, 2), 2)  # only b
    assert pool.take_back() == [] and b.version == 2 and a.version == 1
    a.down = False  # back on its state: version 1
    assert pool.take_back() == ["a"]
    assert a.version == 2 and pool.metrics()["live_servers"] == 2
    pool.generate(PROMPTS, seed=5, min_weight_version=2)
    assert a.generates[-1][1] == 5


def test_no_server_left_raises_naming_the_servers_and_the_timeout(tmp_path):
    a = FakeServer("a")
    pool, lines, _ = make_pool([a], tmp_path)
    a.down = True
    with pytest.raises(NoServerLeft, match="no rollout server left: a failed for more than 10 s"):
        pool.generate(PROMPTS, seed=0)
    with pytest.raises(NoServerLeft, match=r"--server-timeout\) at weight version 0"):
        pool.push(weights(tmp_path, 1), 1)
    assert sum("no rollout server left" in line for line in lines) == 2


def test_a_push_whose_answer_was_lost_is_not_uploaded_twice(tmp_path):
    a = FakeServer("a")
    pool, _, _ = make_pool([a], tmp_path)
    real = a.push_weights

    def lose_answer(path, version):
        real(path, version)
        a.push_weights = real
        raise httpx.RemoteProtocolError("no response")

    a.push_weights = lose_answer
    assert pool.push(weights(tmp_path, 1), 1) == [{"weight_version": 1}]
    assert len(a.uploads) == 1 and pool.version == 1


def test_a_refusal_is_not_retried_and_a_newer_server_is_an_error(tmp_path):
    a = FakeServer("a")
    pool, _, _ = make_pool([a], tmp_path)
    with pytest.raises(ServerError, match="stale version"):
        pool.push(weights(tmp_path, 0), 0)
    a.version, a.fail = 5, 1
    with pytest.raises(RuntimeError, match="newer than this run's 0"):
        pool.generate(PROMPTS, seed=0)


def test_server_timeout_flag():
    assert parse_config([]).server_timeout == 300.0
    assert parse_config(["--server-timeout", "5"]).server_timeout == 5.0
    with pytest.raises(ValueError, match="server_timeout"):
        parse_config(["--server-timeout", "-1"])


def test_pr2_train_exits_non_zero_with_the_message_when_no_server_is_left(monkeypatch):
    import trainer.run.cli as cli

    def no_server(cfg):
        raise NoServerLeft("no rollout server left: a failed for more than 5 s")

    monkeypatch.setattr(cli, "train", no_server)
    with pytest.raises(SystemExit) as e:  # a string code: printed, exit status 1
        cli.main([])
    assert e.value.code == "pr2-train: no rollout server left: a failed for more than 5 s"


# -- fingerprints: the server at an address may be another one ------------------------------------
class PrintedServer(FakeServer):
    """A :class:`FakeServer` that reports content fingerprints: the policy's is the pushed
    file's content, the predictor's what it started with (a policy-only push keeps it)."""

    def __init__(self, name: str, version: int = 0):
        super().__init__(name, version)
        self.fps = {"policy": "start", "predictor": "zero"}

    def info(self) -> dict:
        return {**super().info(), **{f"{k}_fingerprint": v for k, v in self.fps.items()}}

    def push_weights(self, path, version: int) -> dict:
        out = super().push_weights(path, version)
        self.fps = {**self.fps, "policy": Path(path).read_text()}
        return out


def test_a_server_taking_a_dead_servers_address_is_taken_back_only_with_the_runs_weights(
    tmp_path,
):
    a, b = PrintedServer("a"), PrintedServer("b")
    pool, lines, _ = make_pool([a, b], tmp_path, fingerprints=dict(a.fps))
    pool.push(weights(tmp_path, 1), 1)
    assert pool.fingerprints == {"policy": "weights 1", "predictor": "zero"}  # asked of a server
    a.down = True
    pool.generate(PROMPTS, seed=0)  # a is dropped
    pool.push(weights(tmp_path, 2), 2)  # b only
    # another server on a's address: the run's version number, another run's weights
    a.down, a.version, a.fps = False, 2, {"policy": "other run", "predictor": "zero"}
    assert pool.take_back() == [] and len(a.uploads) == 1  # (version 1's): nothing pushed
    assert "policy fingerprint differs" in lines[-1] and "--fresh" in lines[-1]
    # a fresh one whose model directory has a trained predictor: a policy push leaves it
    a.version, a.fps = 0, {"policy": "model dir", "predictor": "trained"}
    assert pool.take_back() == [] and a.uploads[-1][1] == 2
    assert "predictor fingerprint differs" in lines[-1]
    a.version, a.fps = 0, {"policy": "model dir", "predictor": "zero"}  # fresh, no predictor
    assert pool.take_back() == ["a"] and a.fps == b.fps and a.version == 2
    pool.close()


def broken_group(commit_on=(), error: Exception | None = None):
    """A collective push that commits the version on the servers in ``commit_on``, then
    fails with ``error`` (a broken group by default)."""

    def send(clients, version):
        for c in clients:
            if c in commit_on:
                c.version = version
        raise error or RuntimeError("gloo: Connection closed by peer")

    return send


def test_a_failed_collective_push_is_finished_by_the_per_server_push(tmp_path):
    a, b = FakeServer("a"), FakeServer("b")
    pool, lines, _ = make_pool([a, b], tmp_path)
    w = weights(tmp_path, 1)
    ok = pool.push(w, 1, collective=lambda clients, v: [{"weight_version": v} for _ in clients])
    assert ok == [{"weight_version": 1}] * 2 and a.uploads == b.uploads == []
    results = pool.push(weights(tmp_path, 2), 2, collective=broken_group(commit_on=[a]))
    assert results == [{"weight_version": 2}] * 2
    assert a.uploads == [] and b.uploads[-1][1] == 2  # a had committed it: not sent twice
    assert any("collective push of version 2 failed" in line for line in lines)
    refused = ServerError(403, "weight transfer is not enabled")
    with pytest.raises(ServerError, match="not enabled"):  # a setup mistake is not hidden
        pool.push(weights(tmp_path, 3), 3, collective=broken_group(error=refused))
    pool.close()


def test_a_failed_collective_push_with_no_server_left_raises(tmp_path):
    a = FakeServer("a")
    pool, _, _ = make_pool([a], tmp_path)
    a.down = True
    with pytest.raises(NoServerLeft, match="no rollout server left"):
        pool.push(weights(tmp_path, 1), 1, collective=broken_group())
    assert a.version == 0
