"""A training run survives its rollout servers: real ``pr2-serve`` processes on
loopback, the in-process :class:`~trainer.run.loop.Trainer`, tiny model, few steps.

(1) one server SIGKILLed mid-run and restarted on its state directory: the run finishes;
(2) two servers, one killed for good: the run finishes on the other;
(3) the only server killed for good: the trainer stops with :class:`NoServerLeft` after the
    timeout with a checkpoint named in its message (``pr2-train`` exits non-zero with it);
    once the server is started again, ``--resume`` continues the run to its last step;
(4) a server restarted on an older state (its state directory restored from a copy): re-synced
    before use.

Each records steps done, outage seconds and re-sent requests in the reliability figures file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pr2_serve.client import HttpClient
from pr2_serve.server.launch import Server, server_command, wait_ready
from pr2_serve.tiny.tiny_model import make_tiny_model
from reliability.test_reliability import record
from tests.helpers import API_KEY
from trainer.rollouts.server_pool import NoServerLeft
from trainer.run.config import TrainConfig
from trainer.run.loop import Trainer

pytestmark = pytest.mark.vllm

#: Generous bounds: on a loaded machine (2 cores, other servers starting) a restart of the
#: tiny model's server took over 4 minutes; unloaded it takes well under one.
START_TIMEOUT_S = 600.0
RESTART_BUDGET_S = 600.0


def free_port(avoid: tuple[int, ...] = ()) -> int:
    """A free loopback port below the kernel's ephemeral range: no process binding port 0
    (other servers on this machine) can take it while the server is down."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20000, min(low, 32768))
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Restartable:
    """A ``pr2-serve`` on fixed loopback ports, so that it can be killed and started again
    (on its state directory) at the same address; its process is known from its launch on
    (:meth:`stop` ends it even while it loads)."""

    def __init__(self, model: Path, state: Path):
        self.model, self.state = model, state
        http = free_port()
        self.ports = (http, free_port(avoid=(http,)))
        self.address = f"http://127.0.0.1:{self.ports[0]}"
        self.server: Server | None = None
        self.restarts: list[float] = []  # seconds each restart took to be ready
        self.errors: list[BaseException] = []  # of restarts in the background
        self.thread: threading.Thread | None = None

    def start(self) -> Restartable:
        http, grpc = self.ports
        cmd = server_command(
            self.model, self.state, "float32", "--http-port", str(http), "--grpc-port", str(grpc)
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PR2_API_KEY": API_KEY}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.server = Server(proc, self.address, f"127.0.0.1:{grpc}", self.state)
        wait_ready(proc, self.server.log, START_TIMEOUT_S)
        return self

    def kill(self) -> None:
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait()

    def restart_in_background(self, before=None) -> None:
        """Kill now; ``before()`` (e.g. restore a state copy), then start again, in a thread."""
        self.kill()

        def restart():
            try:
                if before is not None:
                    before()
                t = time.perf_counter()
                self.start()
                self.restarts.append(round(time.perf_counter() - t, 1))
            except BaseException as e:
                self.errors.append(e)

        self.thread = threading.Thread(target=restart, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.thread is not None:
            self.thread.join(START_TIMEOUT_S)
            if self.server is not None:
                self.server.stop()  # a restart that became ready meanwhile


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("fault-model"), seed=0, predictor="zero")


@pytest.fixture(scope="module")
def main(model, tmp_path_factory):
    srv = Restartable(model, tmp_path_factory.mktemp("fault-state")).start()
    yield srv
    srv.stop()


def align(model: Path, servers: list[Restartable]) -> int:
    """Every server serves the model's weights at one new version (the runs start equal)."""
    clients = [HttpClient(s.address, api_key=API_KEY) for s in servers]
    version = 1 + max(c.info()["weight_version"] for c in clients)
    for c in clients:
        c.push_weights(str(model / "model.safetensors"), version)
        c.close()
    return version


def config(model: Path, servers: list[Restartable], out: Path, **kw) -> TrainConfig:
    base = dict(
        servers=[s.address for s in servers],
        model_dir=str(model),
        replay="pr2",
        off_policy_steps=1,
        prompts_per_batch=4,
        samples_per_prompt=2,
        max_tokens=4,
        steps=6,
        eval_every=0,
        output_dir=str(out),
        api_key=API_KEY,
        lr=1e-3,
        server_timeout=240.0,
    )
    return TrainConfig(**(base | kw))


def during_next_generate(trainer: Trainer, srv: Restartable, fault) -> None:
    """Run ``fault()`` (a kill) as the trainer's next generate on ``srv`` is sent, before it
    leaves: that call finds the server dead and is re-sent once the server is back. The fault
    lands in that generate on any machine: a timer racing the request (it used to fire 50 ms
    after the send) landed in the step's push instead wherever the generate took less."""
    entry = next(s for s in trainer.servers.servers if s.address == srv.address)
    real = entry.client.generate
    fired = threading.Event()  # once: a retry may call this same function again

    def generate(*a, **kw):
        if not fired.is_set():
            fired.set()
            entry.client.generate = real
            fault()
        return real(*a, **kw)

    entry.client.generate = generate


def check_versions(rows: list[dict], start: int) -> None:
    """Pushed versions go up by one per step; each step trained on one version: its own."""
    assert [r["pushed_version"] for r in rows] == list(range(start + 1, start + 1 + len(rows)))
    for r in rows:
        assert r["rollout_versions"] == [r["weight_version"]], r


def figures(trainer: Trainer, rows: list[dict], t0: float, **extra) -> dict:
    m = trainer.servers.metrics()
    return {
        "steps_done": len(rows),
        "outage_seconds": m["outage_seconds"],
        "resent_requests": m["resent_requests"],
        "outages": m["server_outages"],
        "resync_pushes": m["resync_pushes"],
        "live_servers_at_end": m["live_servers"],
        "run_seconds": round(time.perf_counter() - t0, 1),
    } | extra


def test_server_sigkilled_mid_run_and_restarted(main, model, tmp_path):
    start = align(model, [main])
    t0 = time.perf_counter()
    cfg = config(model, [main], tmp_path, server_timeout=RESTART_BUDGET_S)
    with Trainer(cfg) as trainer:

        def on_step(m):
            if m["step"] == 2:
                during_next_generate(trainer, main, main.restart_in_background)

        rows = trainer.run(on_step)
        fig = figures(trainer, rows, t0, restart_seconds=main.restarts[-1:])
    assert not main.errors and len(rows) == 6
    check_versions(rows, start)
    assert fig["outages"] >= 1 and fig["resent_requests"] >= 1
    assert fig["resync_pushes"] == 0  # back on its committed state: nothing to push again
    record("fault_training_server_restarted", fig)


def test_two_servers_one_killed_for_good(main, model, tmp_path):
    other = Restartable(model, tmp_path / "other-state").start()
    try:
        start = align(model, [main, other])
        t0 = time.perf_counter()
        cfg = config(model, [main, other], tmp_path / "run", server_timeout=8.0)
        with Trainer(cfg) as trainer:

            def on_step(m):
                if m["step"] == 2:
                    during_next_generate(trainer, other, other.kill)

            rows = trainer.run(on_step)
            fig = figures(trainer, rows, t0)
    finally:
        other.stop()
    assert len(rows) == 6
    check_versions(rows, start)
    assert [r["live_servers"] for r in rows[:2]] == [2, 2]
    assert rows[-1]["live_servers"] == 1 and fig["live_servers_at_end"] == 1
    assert fig["outage_seconds"] >= 8.0
    record("fault_training_one_of_two_killed", fig)


def test_server_restarted_on_an_older_state_is_resynced(main, model, tmp_path):
    start = align(model, [main])
    backup = tmp_path / "backup"

    def restore():
        shutil.rmtree(main.state)
        shutil.copytree(backup, main.state)

    t0 = time.perf_counter()
    cfg = config(model, [main], tmp_path / "run", server_timeout=RESTART_BUDGET_S)
    with Trainer(cfg) as trainer:

        def on_step(m):
            if m["step"] == 2:  # the server's state at version start + 2
                shutil.copytree(main.state, backup)
            if m["step"] == 4:  # killed at start + 4, back on start + 2
                during_next_generate(
                    trainer, main, lambda: main.restart_in_background(before=restore)
                )

        rows = trainer.run(on_step)
        fig = figures(trainer, rows, t0, restart_seconds=main.restarts[-1:])
    assert not main.errors and len(rows) == 6
    check_versions(rows, start)
    assert fig["resync_pushes"] == 1
    record("fault_training_restarted_on_older_state", fig)


def before_next_push(trainer: Trainer, srv: Restartable, fault) -> None:
    """Run ``fault()`` (a kill) just before the trainer's next push to ``srv`` is sent: the step
    is trained, its weights never reach the server."""
    client = next(s for s in trainer.servers.servers if s.address == srv.address).client
    real = client.push_weights

    def push_weights(*a, **kw):
        client.push_weights = real  # once: the retries call the real one
        fault()
        return real(*a, **kw)

    client.push_weights = push_weights


def test_only_server_killed_for_good_stops_with_a_checkpoint_that_resumes(main, model, tmp_path):
    """The only server killed before the push of step 3: the run stops after --server-timeout
    with a checkpoint of step 3 (never pushed); the server is started again on its state
    directory (version start + 2) and --resume pushes the checkpoint and runs steps 4 to 6."""
    start = align(model, [main])
    lines = []
    t0 = time.perf_counter()
    cfg = config(model, [main], tmp_path, server_timeout=5.0)
    with Trainer(cfg, log=lines.append) as trainer:

        def on_step(m):
            if m["step"] == 2:
                before_next_push(trainer, main, main.kill)

        with pytest.raises(NoServerLeft, match=r"checkpoint-3 .*--resume") as e:
            trainer.run(on_step)
        stop_seconds = round(time.perf_counter() - t0, 1)
        first = figures(trainer, steps_in(tmp_path), t0)
    said = [x for x in lines if x.startswith("no rollout server left")]
    assert len(said) == 1 and "--server-timeout" in said[0] and said[0] in str(e.value)
    assert f"weight version {start + 3}" in str(e.value)
    assert [r["step"] for r in steps_in(tmp_path)] == [1, 2, 3]
    assert first["outage_seconds"] >= 5.0

    t = time.perf_counter()
    main.start()  # on its state directory: it comes back on version start + 2
    restart_seconds = round(time.perf_counter() - t, 1)
    with Trainer(replace(cfg, resume=True), log=lines.append) as trainer:
        history = trainer.run()
    rows = steps_in(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and len(history) == 6
    check_versions(rows, start)  # step 3's weights pushed by the resume as start + 3
    [pushed] = [x for x in lines if x.startswith("resume: pushed")]
    assert f"checkpoint-3 as version {start + 3}" in pushed and f"[{start + 2}]" in pushed
    record(
        "fault_training_only_server_killed",
        {
            "steps_before_stop": first["steps_done"],
            "outage_seconds": first["outage_seconds"],
            "resent_requests": first["resent_requests"],
            "stop_seconds": stop_seconds,
            "restart_seconds": restart_seconds,
            "resume_pushed": pushed,
            "steps_after_resume": len(rows) - first["steps_done"],
            "run_seconds": round(time.perf_counter() - t0, 1),
        },
    )


def steps_in(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
