"""Asynchronous rollouts (``--max-staleness K``) without vLLM: the background requests, the
predictors kept by version, the diagnostics with each sample's own predictor, and a whole run
against a stubbed server (lags, a version that advanced by 2: stale groups dropped, counted)."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest
import torch

import trainer.run.loop as loop
from pr2_serve.core.routing import selection_scores
from tests.test_trainer_no_server import Flaky, trainer_on
from tests.test_trainer_no_server import config as no_server_config
from tests.test_trainer_rollouts import FakeServer
from trainer.algo.predictor import predicted_route_agreement
from trainer.algo.version_metrics import by_staleness
from trainer.checkpoint import checkpoints
from trainer.rollouts.async_rollouts import PredictorHistory, Prefetcher
from trainer.rollouts.server_pool import NoServerLeft
from trainer.run.config import TrainConfig


# -- the background requests -----------------------------------------------------------------------
def test_prefetcher_runs_ahead_in_order_and_raises_in_the_taker():
    ran: list[int] = []
    pf = Prefetcher(depth=2)

    def job(step):
        def run():
            ran.append(step)
            if step == 3:
                raise RuntimeError("server gone")
            return step * 10

        return run

    assert pf.take(1) is None  # nothing requested ahead: the step requests it itself
    pf.submit(2, "prompts-2", job(2))
    pf.submit(3, "prompts-3", job(3))
    assert pf.pending(2) and pf.pending(3)
    key, result, seconds = pf.take(2)
    assert (key, result) == ("prompts-2", 20) and seconds >= 0
    with pytest.raises(RuntimeError, match="server gone"):
        pf.take(3)
    assert ran == [2, 3] and not pf.pending(3)
    pf.close()


def test_prefetcher_close_cancels_what_has_not_started_and_waits_for_the_rest():
    started, release = threading.Event(), threading.Event()
    done: list[int] = []
    pf = Prefetcher(depth=2)

    def slow():
        started.set()
        release.wait(30)
        done.append(1)

    pf.submit(2, None, slow)
    pf.submit(3, None, lambda: done.append(2))
    assert started.wait(30)
    threading.Timer(0.2, release.set).start()
    pf.close()  # returns once the running request is over; the queued one never runs
    assert done == [1]
    assert not [t for t in threading.enumerate() if t.name.startswith("pr2-rollouts")]


def test_depth_zero_runs_nothing_ahead():
    pf = Prefetcher(depth=0)
    assert pf.take(1) is None
    with pytest.raises(RuntimeError):
        pf.submit(2, None, lambda: None)
    pf.close()


class DownInTheBackground(Flaky):
    """Goes down in its third generate (step 3's, requested ahead while step 2 trains), once
    step 2's push has landed: the failure happens in the background request only."""

    def __init__(self, model_dir) -> None:
        super().__init__(model_dir)
        self.generates, self.pushed_2 = 0, threading.Event()

    def generate(self, *a, **kw):
        self.generates += 1
        if self.generates == 3:
            assert self.pushed_2.wait(60)
            self.down = True
        return super().generate(*a, **kw)

    def push_weights(self, path, version: int) -> dict:
        out = super().push_weights(path, version)
        if version == 2:
            self.pushed_2.set()
        return out


@pytest.mark.timeout(300)
def test_a_background_no_server_left_checkpoints_in_the_trainers_thread(
    tiny_random, tmp_path, monkeypatch
):
    """No server left while a request made ahead runs: the trainer's loop catches it when step
    3 takes its rollouts and writes step 2's checkpoint, in the trainer's thread."""
    server, lines, threads = DownInTheBackground(tiny_random), [], []
    save = checkpoints.save_checkpoint

    def save_here(*a, **kw):
        threads.append(threading.current_thread() is threading.main_thread())
        return save(*a, **kw)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_here)
    cfg = no_server_config(tiny_random, tmp_path, max_staleness=1)
    t = trainer_on(server, cfg, monkeypatch, lines)
    with t, pytest.raises(NoServerLeft, match=r"checkpoint-2 \(step 2, weight version 2\)"):
        t.run()
    assert threads == [True] and server.version == 2
    assert checkpoints.read_state(tmp_path / "checkpoint-2")["weight_version"] == 2


# -- the predictors by version ---------------------------------------------------------------------
def test_predictor_history_keeps_the_last_k_plus_one_pushed():
    names = ["model.layers.0.mlp.predictor.weight"]
    hist = PredictorHistory(names, keep=2)
    for v in range(1, 5):
        hist.record(v, {names[0]: torch.full((2, 3), float(v)), "other": torch.zeros(1)})
    assert hist.versions() == [3, 4]
    by = hist.by_staleness(4)
    assert sorted(by) == [0, 1] and float(by[0][0][0, 0]) == 4.0 and float(by[1][0][0, 0]) == 3.0
    # a copy: the pushed tensors view the trainer's parameters, which move on
    t = torch.ones(2, 3)
    hist.record(5, {names[0]: t})
    t.zero_()
    assert float(hist.by_staleness(5)[0][0].sum()) == 6.0
    hist.record(6, {"model.embed_tokens.weight": torch.zeros(1)})  # pushed without predictor
    assert hist.by_staleness(6)[0] is None  # the servers route on zeros


def _served_routes(h, z, w_p, k):
    return torch.topk(selection_scores(z, h, w_p), k, -1).indices


def test_route_agreement_uses_each_samples_own_predictor():
    """Two different pushed predictors: the samples of version v-1 were routed with A, those of
    version v with B; by staleness the agreement is exact, with either one alone it is not."""
    g = torch.Generator().manual_seed(0)
    b, t, hid, e, k = 4, 6, 16, 8, 2
    h = [torch.randn(b * t, hid, generator=g)]
    z = [torch.randn(b * t, e, generator=g)]
    a_pred = [torch.randn(e, hid, generator=g)]
    b_pred = [torch.randn(e, hid, generator=g)]
    staleness = torch.tensor([1.0, 0.0, 1.0, 0.0])  # samples 0, 2 one version old
    per_row = staleness.repeat_interleave(t)
    routes = torch.where(
        (per_row > 0)[:, None],
        _served_routes(h[0], z[0], a_pred[0], k),
        _served_routes(h[0], z[0], b_pred[0], k),
    )[:, None]  # [B * T, L=1, k]
    valid = torch.ones(b, t)
    valid[3, 4:] = 0

    def agreement(predictors):
        return by_staleness(
            lambda wp, mask: predicted_route_agreement(routes, h, z, wp, mask),
            staleness,
            valid,
            predictors,
        )

    assert agreement({0: b_pred, 1: a_pred}) == 1.0
    assert agreement({0: b_pred, 1: b_pred}) < 0.9  # the newest predictor for every sample
    assert agreement({0: a_pred, 1: a_pred}) < 0.9
    with pytest.raises(KeyError, match="1 version"):
        agreement({0: b_pred})


# -- a whole run against a stubbed server ----------------------------------------------------------
class GoodServer(FakeServer):
    """Every sample with good routes; remembers each request's min_weight_version."""

    def __init__(self) -> None:
        super().__init__()
        self.min_versions: list[int] = []

    def generate(self, prompts, n, seed, min_weight_version, **sampling):
        self.min_versions.append(min_weight_version)
        return super().generate(prompts, n, seed, min_weight_version, **sampling)

    def routes(self, kind):
        return super().routes(None)


@pytest.mark.timeout(300)
def test_async_run_lags_by_at_most_one_and_drops_what_is_older(tiny_random, tmp_path, monkeypatch):
    server = GoodServer().serve_start_of(tiny_random, monkeypatch)
    cfg = TrainConfig(
        servers=["http://fake"],
        model_dir=str(tiny_random),
        replay="pr2",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        max_tokens=4,
        lr=1e-3,
        steps=5,
        eval_every=0,
        output_dir=str(tmp_path),
        api_key="unused",
        max_staleness=1,
    )
    with loop.Trainer(cfg, log=lambda _: None) as trainer:
        server.shape = trainer.route_shape
        push = trainer.push

        def push_twice_at_step_3(state_dict=None):  # a version that advances by 2
            # (deterministic: the request made ahead reaches the server before the push)
            cf.wait([f for _, f in trainer.async_rollouts.prefetcher._pending.values()])
            seconds = push(state_dict)
            if trainer.version == 3:
                seconds += push(state_dict)
            return seconds

        trainer.push = push_twice_at_step_3
        rows = trainer.run()
        assert not trainer.async_rollouts.prefetcher.pending(cfg.steps + 1)  # none past the last
    # step s trains at version s - 1 (s = 1, 2, 3) then 4 (after the double push at step 3)
    assert [m["weight_version"] for m in rows] == [0, 1, 2, 4, 5]
    # batch s is requested while step s - 1 trains, at that step's version
    assert server.min_versions == [0, 0, 1, 2, 4]
    assert [m["rollout_versions"] for m in rows] == [[0], [0], [1], [], [4]]
    assert [m["rollout_lag_max"] for m in rows] == [0, 1, 1, None, 1]
    # step 4's batch (version 2) is 2 versions old at version 4: every group dropped, counted
    assert [m["dropped_stale"] for m in rows] == [0, 0, 0, 8, 8]
    assert "loss" not in rows[3] and rows[4]["loss"] is not None
    assert rows[0]["time_rollout_request"] is None and rows[1]["time_rollout_request"] >= 0
    assert server.pushes == [1, 2, 3, 4, 5, 6]
