"""Checkpoints without a server: atomic write, keep-last-N, the save/load round trip (weights,
both Adam states, RNGs, counters), the server re-sync plan and the metrics cut."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pr2_serve.core.fingerprint import fingerprints, tensor_digest
from pr2_serve.tiny.tiny_model import make_tiny_model
from trainer.algo.train_step import Learner
from trainer.checkpoint import checkpoints as ck
from trainer.rollouts import weight_agreement as sync
from trainer.rollouts.server_pool import ServerPool
from trainer.run.config import TrainConfig, parse_config
from trainer.run.distributed import synthetic_batch
from trainer.run.policy import Policy
from trainer.run.progress import RunProgress


def fill(tmp: Path) -> None:
    (tmp / "a.json").write_text("{}")


# -- the directory ---------------------------------------------------------------------------------
def test_write_is_atomic(tmp_path):
    first = ck.write_atomically(tmp_path, 1, fill)
    assert first == tmp_path / "checkpoint-1" and (first / "a.json").exists()

    def crash(tmp: Path) -> None:
        fill(tmp)
        raise KeyboardInterrupt  # dies half-way

    with pytest.raises(KeyboardInterrupt):
        ck.write_atomically(tmp_path, 2, crash)
    assert ck.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    # a write killed before its rename (SIGKILL) leaves a temporary directory: never a
    # checkpoint, removed by the next write
    (tmp_path / f"{ck.TMP_PREFIX}3-x").mkdir()
    assert ck.latest_checkpoint(tmp_path) == first
    ck.write_atomically(tmp_path, 3, fill)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    # the same step again replaces it
    ck.write_atomically(tmp_path, 3, lambda t: (t / "b.json").write_text("{}"))
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == ["b.json"]


def test_keep_last_n(tmp_path):
    for step in (1, 2, 10, 3, 4):
        ck.write_atomically(tmp_path, step, fill)
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored, kept
    assert [s for s, _ in ck.checkpoint_dirs(tmp_path)] == [1, 2, 3, 4, 10]
    assert ck.prune(tmp_path, 0) == []
    gone = ck.prune(tmp_path, 2)
    assert [p.name for p in gone] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [s for s, _ in ck.checkpoint_dirs(tmp_path)] == [4, 10]
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_save_due():
    assert [s for s in range(1, 8) if ck.save_due(s, 3, 7)] == [3, 6, 7]
    assert not any(ck.save_due(s, 0, 7) for s in range(1, 8))


# -- the round trip --------------------------------------------------------------------------------
def make_trainer(model_dir, out: Path, replay: str = "pr2", **options) -> SimpleNamespace:
    options.setdefault("predictor", "learned")
    cfg = TrainConfig(
        servers=["http://unused"],
        model_dir=str(model_dir),
        replay=replay,
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        lr=1e-3,
        predictor_lr_ratio=10,
        output_dir=str(out),
        keep_checkpoints=2,
        **options,
    )
    policy = Policy(str(model_dir), seed=0)
    learner = Learner(policy, cfg)
    return SimpleNamespace(cfg=cfg, learner=learner, policy=policy, progress=RunProgress())


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def assert_same_weights(a: Policy, b: Policy) -> None:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        assert torch.equal(p, pb[name]), name


def test_round_trip(tiny_random, tmp_path):
    a = make_trainer(tiny_random, tmp_path)
    batch = synthetic_batch(a.policy)
    a.learner.train(batch)  # Adam moments, and a router update to remember (drift cosine)
    a.progress = RunProgress(version=7, dropped_stale=3, dropped_bad_routes=1)
    random.seed(1), np.random.seed(2), torch.manual_seed(3), draws()
    path = ck.save_checkpoint(a.learner, a.cfg, a.progress, step=2)
    assert path == tmp_path / "checkpoint-2"
    names = sorted(p.name for p in path.iterdir())
    want = {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json"}
    assert want | {"predictor_optimizer.safetensors"} <= set(names)
    expected = draws()

    b = make_trainer(tiny_random, tmp_path)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = ck.load_checkpoint(b.learner, b.progress, path)
    assert draws() == expected
    assert state["step"] == 2 and state["weight_version"] == 7
    assert (b.progress.dropped_stale, b.progress.dropped_bad_routes) == (3, 1)
    assert_same_weights(a.policy, b.policy)
    # the same next step from both: equal weights only if both Adam states came back
    ma, mb = a.learner.train(batch), b.learner.train(batch)
    assert_same_weights(a.policy, b.policy)
    assert ma["router_drift_cos_lag1"] == mb["router_drift_cos_lag1"] is not None
    assert ma["predictor_loss"] == mb["predictor_loss"]

    # a checkpoint of another replay mode does not fit (no predictor optimizer in r3)
    c = make_trainer(tiny_random, tmp_path / "r3", replay="r3")
    with pytest.raises(ck.CheckpointError, match=r"predictor_optimizer\.safetensors"):
        ck.load_checkpoint(c.learner, c.progress, path)


@pytest.mark.parametrize(
    "options",
    [{"predictor": "lookahead"}, {"predictor_scale": "auto"}, {"predictor": "ridge"}],
    ids=["lookahead", "auto-scale", "ridge"],
)
def test_round_trip_of_every_predictor_option(tiny_random, tmp_path, options):
    """The served predictor, its scale fit and the ridge sums come back: the resumed run
    serves what the uninterrupted one serves, and its model file is what the last push sent."""
    from safetensors.torch import load_file

    a = make_trainer(tiny_random, tmp_path, **options)
    batch = synthetic_batch(a.policy)
    a.learner.train(batch)
    a.learner.train(batch)
    served = a.learner.served_predictors()
    assert any(w.abs().max() > 0 for w in served) or options.get("predictor_scale")
    path = ck.save_checkpoint(a.learner, a.cfg, a.progress, step=2)
    saved = load_file(str(path / "model.safetensors"))
    for name, w in zip(a.policy.replay.predictor_state_dict(), served, strict=True):
        assert torch.equal(saved[name], w.cpu()), name
    b = make_trainer(tiny_random, tmp_path, **options)
    ck.load_checkpoint(b.learner, b.progress, path)
    for x, y in zip(served, b.learner.served_predictors(), strict=True):
        assert torch.equal(x, y)
    assert b.learner.scale.alpha == a.learner.scale.alpha
    a.learner.train(batch)
    b.learner.train(batch)
    assert_same_weights(a.policy, b.policy)
    for x, y in zip(a.learner.served_predictors(), b.learner.served_predictors(), strict=True):
        assert torch.equal(x, y)


def test_keeps_the_newest(tiny_zero, tmp_path):
    t = make_trainer(tiny_zero, tmp_path, replay="r3")
    for step in (1, 2, 3):
        t.progress.last_step = step
        ck.save_checkpoint(t.learner, t.cfg, t.progress)
    assert [s for s, _ in ck.checkpoint_dirs(tmp_path)] == [2, 3]
    assert not (tmp_path / "checkpoint-3" / "predictor_optimizer.safetensors").exists()
    assert json.loads((tmp_path / "checkpoint-3" / ck.STATE_JSON).read_text())["step"] == 3


# -- servers and metrics ---------------------------------------------------------------------------
def test_resync_plan():
    assert ck.resync_plan([4], 4) == (4, [])
    assert ck.resync_plan([2, 4, 0], 4) == (4, [0, 2])  # behind: get the checkpoint's number
    assert ck.resync_plan([5, 4], 4) == (6, [0, 1])  # one ahead: all to a new one
    assert ck.resync_plan([5, 5], 4) == (6, [0, 1])
    assert ck.resync_plan([4, 4], 4, same=[True, False]) == (5, [0, 1])  # other weights, same no.
    assert ck.resync_plan([4, 3], 4, same=[True, False]) == (4, [1])


def test_config_changes():
    saved = TrainConfig(servers=["http://a"], seed=1).to_dict()
    now = TrainConfig(servers=["http://b"], seed=2, steps=99, resume=True).to_dict()
    assert ck.config_changes(saved, now) == {"seed": (1, 2)}


class FakeClient:
    """A server that reports the fingerprints of what it was last pushed."""

    def __init__(self, version: int, fingerprints: dict) -> None:
        self.version, self.fps, self.pushed = version, fingerprints, []

    def info(self) -> dict:
        return {
            "weight_version": self.version,
            **{f"{k}_fingerprint": v for k, v in self.fps.items()},
        }

    def push_weights(self, tensors: dict, version: int) -> dict:
        self.fps = fingerprints({n: tensor_digest(n, t) for n, t in tensors.items()})
        self.pushed.append(version)
        self.version = version
        return {"weight_version": version}


def test_resync_servers_compares_content_not_only_versions(tmp_path):
    ckpt = make_tiny_model(tmp_path / "ckpt", seed=0)
    target = sync.starting_target(ckpt, "r3").fingerprints
    other = {"policy": "0" * 64, "predictor": target["predictor"]}
    clients = [FakeClient(4, target), FakeClient(2, target)]
    log = []
    pool = ServerPool(clients, ["a", "b"], 4, keep_dir=tmp_path / "keep", log=log.append)
    assert (
        ck.resync_servers(pool, ckpt, 4, "r3", log.append) == 4
    )  # the one behind gets the checkpoint's number
    assert clients[0].pushed == [] and clients[1].pushed == [4]
    assert pool.version == 4 and pool.weights.name == "weights-v4.safetensors"  # for re-syncs
    clients[0].version = 5  # the dead run got one more push in
    assert ck.resync_servers(pool, ckpt, 4, "r3", log.append) == 6
    assert [c.version for c in clients] == [6, 6] and pool.version == 6
    assert "version 6" in log[-1]
    clients[1].fps = other  # same version number, other weights (e.g. another run's push)
    assert ck.resync_servers(pool, ckpt, 6, "r3", log.append) == 7
    pool.close()
    assert [c.fps for c in clients] == [target, target]


def test_metrics_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn
    assert ck.cut_metrics(path, 2) == rows[:2]
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert ck.cut_metrics(tmp_path / "none.jsonl", 2) == []


# -- options ---------------------------------------------------------------------------------------
def test_options():
    assert parse_config(["--resume", "--save-every", "2"]).resume is True
    assert parse_config(["--no-resume"]).resume is False
    cfg = parse_config([])
    assert (cfg.resume, cfg.save_every, cfg.keep_checkpoints) == (False, 0, 2)
    ck.check_supported(cfg, distributed=True)
    ck.check_supported(parse_config(["--resume", "--save-every", "1"]), distributed=True)
    with pytest.raises(ValueError, match="save_every"):
        ck.check_supported(parse_config(["--save-every", "-1"]), distributed=False)


def test_resume_without_checkpoint(tmp_path):
    cfg = SimpleNamespace(output_dir=str(tmp_path))
    with pytest.raises(ck.CheckpointError, match="no checkpoint-<step> directory"):
        ck.resume(None, cfg, RunProgress(), None)


def test_a_checkpoints_weights_are_its_model_file_only(tmp_path):
    """The server (load-from-path, fingerprints) reads a trainer checkpoint as transformers
    does: ``model.safetensors``, not the optimizer states beside it."""
    from safetensors.torch import save_file

    from pr2_serve.core.served_checkpoint import checkpoint_files

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"0.exp_avg": torch.zeros(2)}, str(tmp_path / "optimizer.safetensors"))
    assert checkpoint_files(tmp_path) == {"w": str(tmp_path / "model.safetensors")}
    (tmp_path / "model.safetensors").unlink()  # no model.safetensors: every file, as before
    assert set(checkpoint_files(tmp_path)) == {"0.exp_avg"}
