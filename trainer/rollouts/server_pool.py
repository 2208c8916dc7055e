"""The trainer's rollout servers: which are live, spreading rollouts over them, and carrying on
when one fails.

* every call to a server is retried on transient failures (:mod:`pr2_serve.client.retry`)
  for up to ``--server-timeout`` seconds; a generate is re-sent as it was (same seed), a push
  only after the server says the version is not committed; a server silent for that long
  (hung: no answer, none to a liveness probe) fails the call as a dead one does;
* a server that failed transiently is *stale* until re-synced: before it is used again the
  ``resync(client)`` hook makes it serve the trainer's weights (default
  :meth:`ServerPool.push_current`: judged by version *and* content fingerprints, since another
  server may have taken the address; one on an older version is pushed the kept weights of the
  current version again and checked). A request that died with the server is sent again whole:
  no sample of it is used;
* a push over a collective (``--weight-transfer gloo|nccl``: the ``collective`` argument of
  :meth:`ServerPool.push`) that fails for any reason but a server's refusal is completed by the
  pool's own per-server push, with its retries, drops and no-server checkpoint;
* a server still failing after the budget is dropped from the rotation (its prompts go to the
  others) and taken back, after a re-sync, when it answers ready again
  (:meth:`ServerPool.take_back`, between steps);
* with no server left :class:`NoServerLeft` is raised, naming the servers and the timeout (the
  trainer catches it at its loop, writes a checkpoint, :mod:`trainer.rollouts.no_server`, and
  ``pr2-train`` exits non-zero with both).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pr2_serve.client import ServerError, retry
from pr2_serve.client.payload import weights_payload
from pr2_serve.client.retry import Clock, RetryPolicy, RetryStats, ServerDown
from trainer.rollouts.weight_agreement import differences, fingerprints_differ

T = TypeVar("T")

#: Seeds of re-spread parts: ``seed + round * RESPREAD_SEED + part`` (round 0 is the first).
RESPREAD_SEED = 100_003


class NoServerLeft(RuntimeError):
    """Every rollout server failed for longer than ``--server-timeout``."""


@dataclass(eq=False)
class Server:
    address: str
    client: Any
    live: bool = True  # in the rotation
    stale: bool = False  # failed since it was last known in sync: re-sync before use


def probe(client) -> bool:
    """Whether the server answers ready (``/readyz``, gRPC health; a client without
    ``ready()``: ``info()`` answers)."""
    try:
        ready = getattr(client, "ready", None)
        return bool(ready()) if ready is not None else bool(client.info())
    except Exception:
        return False


class ServerPool:
    """The live servers of a run, all serving weight ``version`` (the trainer's).

    ``keep_dir``: where the file of the current version is kept for re-syncs (a hard link of
    each pushed file; None: the pushed path itself is kept, the caller keeps it alive).
    ``fingerprints``: ``{"policy", "predictor"}`` as ``/v1/info`` reports ``version`` (asked
    of a server after each push)."""

    def __init__(
        self,
        clients: Sequence,
        addresses: Sequence[str],
        version: int,
        *,
        policy: RetryPolicy | None = None,
        keep_dir: Path | None = None,
        resync: Callable[[Any], None] | None = None,
        log: Callable[[str], None] = print,
        clock: Clock | None = None,
        fingerprints: dict[str, str] | None = None,
    ) -> None:
        self.servers = [Server(a, c) for a, c in zip(addresses, clients, strict=True)]
        self.version = version
        self.weights: Any = None  # what was pushed as `version` (file or payload), once pushed
        self.fingerprints = fingerprints  # what the servers serve as `version` (None: unknown)
        self.policy = policy or RetryPolicy()
        self.keep_dir = keep_dir
        self.resync = resync or self.push_current
        self.log, self.clock = log, clock
        self.stats = RetryStats()
        self.resync_pushes = 0
        self._lock = threading.Lock()
        # a push to every server while a rollout (requested ahead: --max-staleness) runs on each
        self._executor = cf.ThreadPoolExecutor(max_workers=2 * max(1, len(self.servers)))

    # -- the rotation --------------------------------------------------------------------------
    @property
    def live(self) -> list[Server]:
        return [s for s in self.servers if s.live]

    def _live(self) -> list[Server]:
        """The live servers; none: :class:`NoServerLeft`."""
        live = self.live
        if live:
            return live
        msg = (
            f"no rollout server left: {', '.join(s.address for s in self.servers)} failed for "
            f"more than {self.policy.budget_s:g} s (--server-timeout) at weight version "
            f"{self.version}"
        )
        self.log(msg)
        raise NoServerLeft(msg)

    def _drop(self, srv: Server, err: ServerDown) -> None:
        srv.live, srv.stale = False, True
        self.log(
            f"server {srv.address} dropped from the rotation ({err}); "
            f"{len(self.live)} live server(s) left"
        )

    def take_back(self) -> list[str]:
        """Take back every dropped server that answers ready again, once re-synced (between
        steps); the addresses taken back."""
        back = []
        for srv in self.servers:
            if srv.live or not probe(srv.client):
                continue
            try:
                self._bounded(srv, partial(self.resync, srv.client))
            except Exception as e:  # still dropped; tried again at the next step
                self.log(f"server {srv.address} answers again but its re-sync failed: {e!r}")
                continue
            srv.live, srv.stale = True, False
            back.append(srv.address)
            self.log(f"server {srv.address} re-synced and back in the rotation")
        return back

    def metrics(self) -> dict:
        return {
            "live_servers": len(self.live),
            "server_outages": self.stats.outages,
            "resent_requests": self.stats.resent,
            "outage_seconds": round(self.stats.outage_s, 2),
            "resync_pushes": self.resync_pushes,
        }

    # -- one call on one server ------------------------------------------------------------------
    def _bounded(self, srv: Server, fn: Callable[[], T]) -> T:
        """``fn()`` on ``srv`` without retries, given up once the server is silent for the
        retry deadline (a hung server must not hold the run)."""
        alive = getattr(srv.client, "alive", None)
        now = (self.clock or Clock()).now
        return retry.within_deadline(fn, self.policy.deadline, alive, what=srv.address, now=now)

    def _call(self, srv: Server, what: str, fn: Callable[[], T], resync_first: bool = True) -> T:
        """``fn()`` on ``srv`` with retries; a stale server is re-synced before each try."""

        def attempt() -> T:
            if srv.stale and resync_first:
                if not probe(srv.client):  # loading: its version is not yet the restored one
                    raise retry.NotReady(f"{srv.address} is not ready")
                self.resync(srv.client)
            out = fn()
            srv.stale = False
            return out

        def failed(_: BaseException) -> None:
            srv.stale = True

        stats = RetryStats()
        try:
            return retry.call(
                attempt,
                f"{what} on {srv.address}",
                self.policy,
                log=self.log,
                clock=self.clock,
                stats=stats,
                on_failure=failed,
                alive=getattr(srv.client, "alive", None),
            )
        finally:
            with self._lock:
                self.stats.outages += stats.outages
                self.stats.resent += stats.resent
                self.stats.outage_s += stats.outage_s

    # -- what the trainer calls ------------------------------------------------------------------
    def generate(self, prompts: Sequence, seed: int, **sampling) -> list[list]:
        """Every prompt's samples (a group, in sample order), spread over the live servers;
        part ``j`` has seed ``seed + j``. A part whose server is dropped is spread again over
        the others."""
        todo, by_prompt = list(range(len(prompts))), {}
        rnd = 0
        while todo:
            live = self._live()
            parts = [todo[j :: len(live)] for j in range(len(live))]
            jobs = [
                (
                    srv,
                    part,
                    self._submit_generate(
                        srv, prompts, part, seed + rnd * RESPREAD_SEED + j, sampling
                    ),
                )
                for j, (srv, part) in enumerate(zip(live, parts, strict=True))
                if part
            ]
            todo, rnd = [], rnd + 1
            for srv, part, fut in jobs:
                try:
                    res = fut.result()
                except ServerDown as e:
                    self._drop(srv, e)
                    todo += part
                    continue
                for s in res.samples:
                    by_prompt.setdefault(part[s.prompt_index], []).append(s)
            todo.sort()
        return [sorted(by_prompt[i], key=lambda s: s.sample_index) for i in range(len(prompts))]

    def _submit_generate(self, srv: Server, prompts, part, seed: int, sampling) -> cf.Future:
        fn = partial(srv.client.generate, [prompts[i] for i in part], seed=seed, **sampling)
        return self._executor.submit(self._call, srv, "generate", fn)

    def generate_one(self, prompts: Sequence, **sampling):
        """One request on the first live server (the next one if it is dropped)."""
        while True:
            srv = self._live()[0]
            try:
                return self._call(
                    srv, "generate", partial(srv.client.generate, prompts, **sampling)
                )
            except ServerDown as e:
                self._drop(srv, e)

    def push(
        self, weights, version: int, collective: Callable[[list, int], list[dict]] | None = None
    ) -> list[dict]:
        """Push ``weights`` (a file path, or what ``push_weights`` takes: e.g. an in-memory
        payload) as ``version`` to every live server; the servers' results (a server dropped
        meanwhile has none). They are kept for re-syncs: an in-memory payload views the
        policy's tensors, which equal ``version``'s until the next training step, and re-syncs
        only run before rollouts (a push needs none: it sends every policy tensor).

        ``collective(clients, version)``: one push to all the live servers at once (a transfer
        group), tried first; if it fails, each server without ``version`` gets ``weights``."""
        live = self._live()
        if collective is not None:
            results = self._push_collective(collective, live, version)
            if results is not None:
                self._keep(weights, version, self._served_fingerprints())
                return results
            weights = weights_payload(weights) if isinstance(weights, dict) else weights
        sent = collective is not None  # (some servers may have committed it)
        futures = [
            self._executor.submit(self._push_on, srv, weights, version, sent) for srv in live
        ]
        results = []
        for srv, fut in zip(live, futures, strict=True):
            try:
                results.append(fut.result())
            except ServerDown as e:
                self._drop(srv, e)
        self._live()
        self._keep(weights, version, self._served_fingerprints())
        return results

    def _push_collective(self, collective, live: list[Server], version: int) -> list | None:
        """The servers' results of a collective push, or None when it failed and the per-server
        push must finish it. A server's refusal (bad weights, transfers not enabled) is raised:
        a per-server push would be refused the same way or hide a setup mistake."""
        try:
            return collective([s.client for s in live], version)
        except ServerError as e:
            if not retry.is_transient(e):
                raise
            err: Exception = e
        except Exception as e:  # a broken group, a dead server mid-broadcast
            err = e
        self.log(
            f"the collective push of version {version} failed ({err!r}); pushing it to "
            "each server over its own connection"
        )
        return None

    def _push_on(self, srv: Server, weights, version: int, maybe_sent: bool = False) -> dict:
        c = srv.client
        attempt = retry.push_attempts(
            partial(c.push_weights, _pushable(weights), version),
            lambda: c.info()["weight_version"],
            version,
            maybe_sent=maybe_sent,
        )
        return self._call(srv, f"push of version {version}", attempt, resync_first=False)

    def _served_fingerprints(self) -> dict[str, str] | None:
        """What a live server reports serving now (for re-syncs); None: none answers."""
        for srv in self.live:
            try:
                return _fingerprints(self._bounded(srv, srv.client.info))
            except Exception:
                continue
        return None

    def pushed(self, weights, version: int, fingerprints: dict[str, str] | None = None) -> None:
        """Record that ``weights`` reached every live server as ``version`` by another path
        (a start-up or resume re-sync) with these ``fingerprints`` (None: asked of a server):
        kept for re-syncs as a push's are."""
        self._keep(weights, version, fingerprints or self._served_fingerprints())

    def _keep(self, weights, version: int, fingerprints: dict[str, str] | None) -> None:
        """Remember ``weights`` as those of ``version`` (a file: linked into ``keep_dir``) with
        their ``fingerprints``; they change at once for a re-sync in another thread (a rollout
        requested ahead)."""
        if not isinstance(weights, (str, os.PathLike)) or self.keep_dir is None:
            with self._lock:
                self.weights, self.version = weights, version
                self.fingerprints = fingerprints
            return
        path = Path(weights)
        self.keep_dir.mkdir(parents=True, exist_ok=True)
        dst = self.keep_dir / f"weights-v{version}.safetensors"
        dst.unlink(missing_ok=True)
        try:
            os.link(path, dst)
        except OSError:
            shutil.copyfile(path, dst)
        with self._lock:
            old, self.weights, self.version = self.weights, dst, version
            self.fingerprints = fingerprints
        if isinstance(old, Path) and old != dst and old.parent == self.keep_dir:
            old.unlink(missing_ok=True)

    def push_current(self, client) -> None:
        """The default re-sync, by version and content (the server at an address may be another
        one now): the current version with the current fingerprints: nothing to do; an older
        version: the kept weights of the current one are pushed again, then checked; a newer
        version, or the current number with other weights (another run's state): an error
        naming the reset (the server stays out of the rotation)."""
        with self._lock:
            version, weights, fps = self.version, self.weights, self.fingerprints
        info = client.info()
        serving, diff = info["weight_version"], differences(info, fps) if fps else []
        if serving == version and not diff:
            return
        if serving >= version:
            what = (
                f"weight version {serving}, newer than this run's {version}"
                if serving > version
                else f"this run's weight version {version} with other weights ("
                f"{fingerprints_differ(diff)})"
            )
            raise RuntimeError(
                f"a server serves {what}: it was restarted on another run's state directory "
                "(restart it with `pr2-serve --fresh`)"
            )
        if weights is None:
            raise RuntimeError(
                f"a server restarted on weight version {serving} < {version} and no "
                f"file of version {version} was kept to re-sync it"
            )
        self.log(f"re-sync: a server serves version {serving}: pushing version {version}")
        client.push_weights(_pushable(weights), version)
        with self._lock:
            self.resync_pushes += 1
        _check_served(client.info(), version, fps)

    def close(self) -> None:
        """Stop the request threads (the clients are the caller's)."""
        self._executor.shutdown()


def _pushable(weights):
    """A path as the string the clients take; anything else as it is."""
    return str(weights) if isinstance(weights, os.PathLike) else weights


def _fingerprints(info: dict) -> dict[str, str]:
    return {part: info.get(f"{part}_fingerprint") for part in ("policy", "predictor")}


def _check_served(info: dict, version: int, fingerprints: dict[str, str] | None) -> None:
    """A re-synced server must serve ``version`` with ``fingerprints`` (e.g. a re-sync push of
    the policy alone leaves the predictor the server started with)."""
    diff = differences(info, fingerprints) if fingerprints else []
    if info["weight_version"] != version or diff:
        raise RuntimeError(
            f"after a re-sync push of version {version} a server serves version "
            f"{info['weight_version']} ({fingerprints_differ(diff)} from the other servers'); "
            "restart it with `pr2-serve --fresh`"
        )
