"""A run without rollout servers, with a fake server and the real tiny policy: the
start-up outlives a server that is briefly down; with no server left the run writes a
checkpoint of the right step (also with ``--save-every 0``), names it in the
:class:`NoServerLeft` message, and ``--resume`` continues it, pushing the weights the server
lacks; a failed ``--weight-transfer gloo`` push is handled as a failed HTTP push."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import httpx
import pytest

import trainer.run.loop as loop
from tests.test_trainer_rollouts import FakeServer
from trainer.checkpoint import checkpoints
from trainer.rollouts import collective_push as transfer
from trainer.rollouts.no_server import stop_point
from trainer.rollouts.server_pool import NoServerLeft
from trainer.run.config import TrainConfig


class Flaky(FakeServer):
    """Refuses connections while ``down``, and the first ``refuse_info`` infos; goes down
    just before the push of version ``down_at_push``."""

    def __init__(self, model_dir) -> None:
        super().__init__()
        self.model_dir = model_dir
        self.down, self.refuse_info, self.down_at_push = False, 0, None

    def _gate(self) -> None:
        if self.down:
            raise httpx.ConnectError("refused")

    def ready(self) -> bool:
        return not self.down

    def info(self) -> dict:
        if self.refuse_info:
            self.refuse_info -= 1
            raise httpx.ConnectError("starting")
        self._gate()
        return super().info()

    def generate(self, *a, **kw):
        self._gate()
        return super().generate(*a, **kw)

    def push_weights(self, path, version: int) -> dict:
        if version == self.down_at_push:
            self.down, self.down_at_push = True, None
        self._gate()
        return super().push_weights(path, version)


def config(model_dir, out, **kw) -> TrainConfig:
    base = dict(
        servers=["http://fake"],
        model_dir=str(model_dir),
        replay="pr2",
        off_policy_steps=1,
        prompts_per_batch=8,
        samples_per_prompt=2,
        max_tokens=4,
        lr=1e-3,
        steps=3,
        eval_every=0,
        output_dir=str(out),
        api_key="unused",
        server_timeout=0.5,
    )
    return TrainConfig(**(base | kw))


def trainer_on(server, cfg, monkeypatch, lines: list[str]) -> loop.Trainer:
    server.serve_start_of(server.model_dir, monkeypatch)
    t = loop.Trainer(cfg, log=lines.append)
    server.shape = t.route_shape
    return t


def steps_in(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_stop_point():
    assert stop_point(2, None, 5) == (2, 5, None)
    assert stop_point(2, {"step": 2}, 5) == (2, 5, None)  # step 3 failed before training
    assert stop_point(2, {"step": 3}, 5) == (3, 6, {"step": 3, "pushed_version": 6})  # its push
    row = {"step": 3, "pushed_version": 6}  # pushed, then its eval failed
    assert stop_point(2, row, 6) == (3, 6, row)


@pytest.mark.timeout(300)
def test_start_up_waits_for_a_server_briefly_down(tiny_random, tmp_path, monkeypatch):
    server, lines = Flaky(tiny_random), []
    server.refuse_info = 2
    with trainer_on(server, config(tiny_random, tmp_path, server_timeout=30), monkeypatch, lines):
        pass
    assert lines[0].startswith("outage: info on http://fake failed")
    assert lines[1].startswith("outage over: info on http://fake succeeded")


@pytest.mark.timeout(300)
def test_no_server_during_rollouts_saves_the_step_before(tiny_random, tmp_path, monkeypatch):
    server, lines = Flaky(tiny_random), []
    with trainer_on(server, config(tiny_random, tmp_path), monkeypatch, lines) as t:

        def on_step(m):
            server.down = m["step"] == 2  # step 3's rollouts fail

        with pytest.raises(NoServerLeft, match=r"checkpoint-2 \(step 2, weight version 2\)"):
            t.run(on_step)
    state = checkpoints.read_state(tmp_path / "checkpoint-2")
    assert (state["step"], state["weight_version"]) == (2, 2) and server.version == 2
    assert [r["step"] for r in steps_in(tmp_path)] == [1, 2]
    assert checkpoints.checkpoint_dirs(tmp_path)[0][0] == 2  # --save-every 0: this one only


@pytest.mark.timeout(300)
def test_no_server_during_a_push_saves_that_step_and_resume_pushes_it(
    tiny_random, tmp_path, monkeypatch
):
    server, lines = Flaky(tiny_random), []
    server.down_at_push = 2
    t = trainer_on(server, config(tiny_random, tmp_path), monkeypatch, lines)
    with t, pytest.raises(NoServerLeft, match=r"checkpoint-2 .*--resume") as e:
        t.run()
    assert "weight version 2" in str(e.value) and server.version == 1  # the push never landed
    rows = steps_in(tmp_path)
    assert [(r["step"], r["pushed_version"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[1]["stopped"] == "no rollout server left" and "loss" in rows[1]
    state = checkpoints.read_state(tmp_path / "checkpoint-2")
    assert (state["step"], state["weight_version"]) == (2, 2)

    server.down = False  # a server is back: --resume continues the run
    with trainer_on(server, config(tiny_random, tmp_path, resume=True), monkeypatch, lines) as t:
        history = t.run()
    assert "resume: pushed checkpoint-2 as version 2" in "\n".join(lines)
    assert server.pushes == [1, 2, 3]
    assert [r["step"] for r in history] == [1, 2, 3] and history[2]["rollout_versions"] == [2]


class BrokenGroup:
    """A ``--weight-transfer gloo`` group whose every broadcast breaks (a server gone
    mid-push, a network fault): the pool must finish the push as an HTTP one."""

    def __init__(self, clients, **_) -> None:
        self.client = SimpleNamespace(clients=list(clients))

    def push(self, tensors, version: int):
        raise RuntimeError("gloo: Connection closed by peer")

    def close(self) -> None:
        pass


@pytest.mark.timeout(300)
def test_a_failed_gloo_push_is_handled_as_a_failed_http_push(tiny_random, tmp_path, monkeypatch):
    """Step 1's broken broadcast is finished over the server's own connection; step 2's, with
    the server gone, writes the push-phase checkpoint that ``--resume`` continues from."""
    monkeypatch.setattr(transfer, "CollectivePusher", BrokenGroup)
    server, lines = Flaky(tiny_random), []
    server.down_at_push = 2
    cfg = config(tiny_random, tmp_path, weight_transfer="gloo")
    t = trainer_on(server, cfg, monkeypatch, lines)
    with t, pytest.raises(NoServerLeft, match=r"checkpoint-2 .*--resume"):
        t.run()
    assert server.pushes == [1]  # version 1 over HTTP; version 2 never landed
    assert any("collective push of version 1 failed" in line for line in lines)
    rows = steps_in(tmp_path)
    assert [(r["step"], r["pushed_version"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[1]["stopped"] == "no rollout server left"
    state = checkpoints.read_state(tmp_path / "checkpoint-2")
    assert (state["step"], state["weight_version"]) == (2, 2)


@pytest.mark.timeout(300)
def test_close_closes_everything_the_trainer_opened(tiny_random, tmp_path, monkeypatch):
    """After a run with requests made ahead and a transfer group: the group, the clients and
    the request threads are all closed by ``Trainer.close`` (the context's exit)."""
    closed: list[str] = []

    class Group(BrokenGroup):
        def close(self) -> None:
            closed.append("group")

    class Server(Flaky):
        def close(self) -> None:
            closed.append("client")

    monkeypatch.setattr(transfer, "CollectivePusher", Group)
    server, lines = Server(tiny_random), []
    cfg = config(tiny_random, tmp_path, weight_transfer="gloo", max_staleness=1, steps=2)
    with trainer_on(server, cfg, monkeypatch, lines) as t:
        t.run()
        assert closed == [] and t.collective.pusher is not None
    assert closed == ["group", "client"] and t.collective.pusher is None
    assert not [x for x in threading.enumerate() if x.name.startswith("pr2-rollouts")]
