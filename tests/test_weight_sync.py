"""What the server says it serves (fingerprints, source, predictor norm) and the trainer's
start-up agreement with it, without vLLM: the real engine weight bookkeeping and service on a
stub vLLM, and :mod:`trainer.rollouts.weight_agreement` against fake clients."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.core.types import EngineInfo
from pr2_serve.engine import rollout_engine as engine_mod
from pr2_serve.service.readiness import Phase
from pr2_serve.service.rollout_service import MODEL_DIR_SOURCE, RolloutService
from trainer.rollouts import weight_agreement as sync

pytestmark = pytest.mark.vllm  # needs vLLM (imports it; starts no engine)


# -- the server side on a stub vLLM --------------------------------------------------------------
class _StubLLM:
    """What the engine thread calls between steps when it applies an update."""

    def collective_rpc(self, name, args=()):
        return [None]

    def reset_prefix_cache(self) -> bool:
        return True

    def set_weight_version(self, version: str) -> None:
        pass


class _NoCanary:
    seconds = 0.0

    def __bool__(self) -> bool:  # the engine runs a canary only if there is one
        return False


def _engine(model_dir: Path, state_dir: Path, monkeypatch):
    info = EngineInfo(
        model=str(model_dir),
        architecture="Qwen3MoeForCausalLM",
        num_moe_layers=2,
        num_experts=4,
        top_k=2,
        moe_layer_indices=(0, 1),
        route_dtype="uint8",
        vocab_size=300,
        max_model_len=64,
        dtype="float32",
    )
    monkeypatch.setattr(engine_mod, "build_llm_engine", lambda *a, **k: _StubLLM())
    monkeypatch.setattr(engine_mod, "engine_info", lambda *a, **k: info)
    return engine_mod.RolloutEngine(model_dir, state_dir=state_dir / "engine")


def _service(model_dir, state_dir, monkeypatch, fresh=False) -> tuple[RolloutService, str]:
    service = RolloutService(_engine(model_dir, state_dir, monkeypatch), state_dir, "key")
    service.updates.canary = _NoCanary
    said = service.restore_committed(fresh)
    service.readiness.phase = Phase.SERVING
    return service, said


def _push(service: RolloutService, tensors: dict, version: int, tmp: Path) -> None:
    path = tmp / f"push-{version}.safetensors"
    save_file(tensors, str(path))
    body = path.read_bytes()

    async def chunks():
        yield body

    sha = hashlib.sha256(body).hexdigest()
    asyncio.run(service.updates.push_weights(version, chunks(), sha, len(body), "http"))


def _fp(info: dict) -> tuple[str, str]:
    return info["policy_fingerprint"], info["predictor_fingerprint"]


def test_info_fingerprints_follow_commits_and_survive_a_restart(tmp_path, monkeypatch):
    from pr2_serve.tiny.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model", seed=0)
    state = tmp_path / "state"
    service, _ = _service(model, state, monkeypatch)
    info0 = service.info()
    assert info0["weight_source"] == MODEL_DIR_SOURCE and info0["dtype"] == "float32"
    assert not info0["predictor_active"] and info0["predictor_norm"] == 0.0
    # the trainer's fingerprint of the same weights, with the same function
    assert _fp(info0) == tuple(sync.starting_target(model, "pr2").fingerprints.values())

    weights = load_file(str(model / "model.safetensors"))
    router = "model.layers.0.mlp.gate.weight"
    seen = {_fp(info0)}
    for version in (1, 2, 3):  # every committed push changes what info reports
        weights[router] = weights[router] + 0.01
        pred = {"model.layers.1.mlp.predictor.weight": torch.full((8, 64), 0.1 * version)}
        _push(service, {**weights, **pred}, version, tmp_path)
        info = service.info()
        assert info["weight_version"] == version and info["weight_source"] == (
            f"pushed version {version}"
        )
        assert _fp(info) not in seen
        seen.add(_fp(info))
        target = sync.tensors_target({**weights, **pred}, model)
        assert _fp(info) == (target.fingerprints["policy"], target.fingerprints["predictor"])
        assert info["predictor_active"]
        assert info["predictor_norm"] == pytest.approx(0.1 * version * (8 * 64) ** 0.5)
    service.engine.close()

    again, said = _service(model, state, monkeypatch)  # a restart on the same state directory
    assert "restored weight version 3" in said
    info = again.info()
    assert _fp(info) == _fp(service.info()) and info["weight_version"] == 3
    assert info["weight_source"].startswith("version 3 restored from the state directory")
    again.engine.close()

    fresh, _ = _service(model, state, monkeypatch, fresh=True)
    assert _fp(fresh.info()) == _fp(info0) and fresh.info()["weight_source"] == MODEL_DIR_SOURCE
    fresh.engine.close()


def test_grpc_info_has_the_same_fields(tmp_path, monkeypatch):
    from pr2_serve.api.grpc_server import RolloutServicer, pb2
    from pr2_serve.client.grpc_client import _info
    from pr2_serve.tiny.tiny_model import make_tiny_model

    service, _ = _service(make_tiny_model(tmp_path / "m", seed=0), tmp_path / "s", monkeypatch)
    got = _info(asyncio.run(RolloutServicer(service).GetInfo(pb2.GetInfoRequest(), None)))
    assert got == service.info()  # predictor_norm 0.0 here: exact in a double
    assert isinstance(got["kept_versions"], list)
    service.engine.close()


# -- the trainer side ----------------------------------------------------------------------------
class _FakeClient:
    """A server that reports fingerprints and takes pushes (recording them)."""

    def __init__(self, fingerprints: dict, version: int, source="model directory") -> None:
        self.fps, self.version, self.source, self.pushed = dict(fingerprints), version, source, []

    def info(self) -> dict:
        return {
            "weight_version": self.version,
            "weight_source": self.source,
            "policy_fingerprint": self.fps["policy"],
            "predictor_fingerprint": self.fps["predictor"],
        }

    def push_weights(self, tensors, version: int) -> dict:
        self.pushed.append((version, set(tensors)))
        self.fps = sync.tensors_target(tensors, self.model).fingerprints
        self.version, self.source = version, f"pushed version {version}"
        return {"weight_version": version}


@pytest.fixture
def models(tmp_path_factory):
    from pr2_serve.tiny.tiny_model import make_tiny_model

    tmp = tmp_path_factory.mktemp("sync")
    return make_tiny_model(tmp / "zero", seed=0), make_tiny_model(
        tmp / "live", seed=0, predictor="random"
    )


def _clients(model, *states):
    out = []
    for fps, version in states:
        c = _FakeClient(fps, version)
        c.model = model
        out.append(c)
    return out


def test_matching_servers_are_left_alone(models):
    zero, _ = models
    target = sync.starting_target(zero, "pr2")
    clients = _clients(zero, (target.fingerprints, 4), (target.fingerprints, 4))
    lines: list[str] = []
    assert sync.agree(clients, ["a", "b"], target, "push", lines.append) == 4
    assert lines == [] and all(not c.pushed for c in clients)


def test_a_mismatch_pushes_the_start_to_every_server_as_the_next_version(models):
    zero, live = models
    target = sync.starting_target(zero, "r3")
    other = sync.starting_target(live, "pr2").fingerprints  # a previous PR2 run's predictor
    clients = _clients(zero, (target.fingerprints, 3), (other, 3))
    lines: list[str] = []
    assert sync.agree(clients, ["a", "b"], target, "push", lines.append) == 4
    assert (
        len(lines) == 1 and "as version 4" in lines[0] and "b serves weight version 3" in lines[0]
    )
    assert all(c.pushed and c.pushed[0][0] == 4 for c in clients)
    preds = {n for n in clients[0].pushed[0][1] if n.endswith(".mlp.predictor.weight")}
    assert len(preds) == 4  # zeros pushed explicitly: no stale predictor survives


def test_fail_names_the_server_its_version_source_and_the_reset(models):
    zero, live = models
    target = sync.starting_target(zero, "pr2")
    clients = _clients(zero, (sync.starting_target(live, "pr2").fingerprints, 7))
    clients[0].source = "version 7 restored from the state directory /s"
    with pytest.raises(sync.ServerMismatch) as e:
        sync.agree(clients, ["http://x:1"], target, "fail")
    msg = str(e.value)
    for words in ("http://x:1", "version 7", "restored from the state directory /s", "--fresh"):
        assert words in msg
    assert "the predictor fingerprint differs." in msg and not clients[0].pushed


def test_the_differing_fingerprints_are_named_in_plain_words():
    assert sync.fingerprints_differ(["predictor"]) == "predictor fingerprint differs"
    both = sync.fingerprints_differ(["policy", "predictor"])
    assert both == "policy and predictor fingerprints differ"


def test_the_predictor_follows_the_mode(models):
    _, live = models  # a checkpoint with a non-zero predictor
    pr2, r3 = sync.starting_target(live, "pr2"), sync.starting_target(live, "r3")
    assert pr2.fingerprints["policy"] == r3.fingerprints["policy"]
    assert pr2.fingerprints["predictor"] != r3.fingerprints["predictor"]
    for target in (pr2, r3):  # what would be pushed hashes to what is expected
        assert sync.tensors_target(target.tensors(), live).fingerprints == target.fingerprints
    assert all(not t.any() for n, t in r3.tensors().items() if ".predictor." in n)
