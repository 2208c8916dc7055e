"""The live, bucketed weight update (:mod:`pr2_serve.engine.live_apply`,
:mod:`pr2_serve.plugin.live_update`): equal to the whole-model reload it replaces, and a failed
update (a NaN in the last bucket, a canary that fails, an undo past its bound) leaves the
outputs bit for bit as they were. One engine for the module; each test leaves it serving."""

from __future__ import annotations

import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.core.served_checkpoint import CanaryError, NonFiniteWeightsError
from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.plugin.live_update import LiveUpdate, buckets_of, prefetched, unit_of
from pr2_serve.plugin.spare_storage import SpareStorage
from pr2_serve.tiny.tiny_model import make_tiny_model

PROMPTS = [[5, 6, 7], list(range(40, 80)), [200, 1, 2, 3, 4, 5, 6, 7, 8]]
GREEDY = Sampling(temperature=0.0, max_tokens=10)
SMALL_BUCKETS = 64 << 10  # many buckets on the tiny model


# -- pure helpers --------------------------------------------------------------------------------
def test_unit_of_is_the_deepest_module_prefix():
    modules = {"model", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp.experts"}
    assert unit_of("model.layers.0.self_attn.q_proj.weight", modules) == "model.layers.0.self_attn"
    assert unit_of("model.layers.0.mlp.experts.3.up_proj.weight", modules).endswith("experts")
    assert unit_of("model.layers.0.mlp.gate.weight", modules) == "model.layers.0"
    assert unit_of("lm_head.weight", modules) == ""
    assert unit_of("model.layers.01.x", modules) == "model"  # components, not characters


def test_buckets_of_closes_a_bucket_once_past_its_size():
    pairs = [(str(i), torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate([3, 3, 5, 1, 9])]
    got = [[n for n, _ in b] for b in buckets_of(iter(pairs), 6)]
    assert got == [["0", "1", "2"], ["3", "4"]]  # the transfers' rule (vLLM's pack_tensors)
    assert list(buckets_of(iter([]), 6)) == []


def test_prefetched_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bucket 2 is broken")

    seen = []
    with pytest.raises(ValueError, match="bucket 2"):
        for x in prefetched(failing()):
            seen.append(x)
    assert seen == [1]


def test_prefetched_stops_its_producer_when_the_consumer_leaves():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    for x in prefetched(items()):
        if x == 2:
            break
    time.sleep(0.2)
    assert len(produced) < 10
    assert not [t for t in threading.enumerate() if t.name == "pr2-prefetch"]


# -- on a toy model of CPU MoE layers -------------------------------------------------------------
def toy_moe_model(layers: int, seen: list, before: list, replace: bool = True) -> torch.nn.Module:
    """``layers`` MoE layers whose experts' prepack (as vLLM's CPU one: new tensors registered
    in place of the loaded ones; ``replace=False``: in place, as ours) appends to ``seen`` how
    many of ``before`` (weak references to the tensors the model had before the update) are
    still alive."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.utils import replace_parameter

    class Prepack(CPUUnquantizedExperts):
        def __init__(self) -> None:  # nothing of a real MoE config is used
            pass

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            seen.append(sum(r() is not None for r in before))
            for name in ("w13_weight", "w2_weight") if replace else ():
                replace_parameter(layer, name, getattr(layer, name).detach().clone())

    kernel = SimpleNamespace(fused_experts=Prepack())

    class MoE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w13_weight = torch.nn.Parameter(torch.randn(4, 8, 16), requires_grad=False)
            self.w2_weight = torch.nn.Parameter(torch.randn(4, 16, 4), requires_grad=False)
            self.quant_method = SimpleNamespace(moe_kernel=kernel)

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(MoE() for _ in range(layers))

        def load_weights(self, pairs) -> None:
            params = dict(self.named_parameters())
            for name, t in pairs:
                getattr(params[name], "weight_loader", default_weight_loader)(params[name], t)

    model = Toy()
    before.extend(weakref.ref(p) for p in model.parameters())
    return model


@pytest.mark.vllm
def test_finish_lets_go_of_each_layers_replaced_tensors_right_after_its_prepack():
    """The undo's copy stands in for the tensors a layer's prepack replaced as soon as that
    layer is done: the extra memory of an update's end is one layer's, not the model's."""
    from vllm.model_executor.model_loader.reload.layerwise import record_metadata_for_reloading

    seen, before = [], []
    model = toy_moe_model(3, seen, before)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    record_metadata_for_reloading(model)
    update = LiveUpdate(model, None, undo_limit=1 << 30)
    for name, t in new.items():  # one tensor a bucket
        update.apply([(name, t)])
    update.finish([])
    assert seen == [6, 4, 2]  # each prepack: the layers not yet done (2 tensors each)
    assert not any(r() for r in before)
    assert all(torch.equal(p, new[n]) for n, p in model.named_parameters())
    assert update.abort()
    assert all(torch.equal(p, old[n]) for n, p in model.named_parameters())


@pytest.mark.vllm
def test_a_bucket_is_let_go_once_loaded_and_the_undo_copies_nothing():
    """On the CPU a layer loads each tensor as it arrives (vLLM's reload would hold it until
    its layer is complete) and its new data is swapped in: the undo keeps the old storage
    itself, no copy of it."""
    from vllm.model_executor.model_loader.reload.layerwise import record_metadata_for_reloading

    model = toy_moe_model(2, [], [])
    old = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    record_metadata_for_reloading(model)
    update = LiveUpdate(model, None, undo_limit=1 << 30)
    first = "layers.0.w13_weight"  # its layer still waits for w2_weight
    t = torch.randn(model.layers[0].w13_weight.shape)
    gone = weakref.ref(t)
    update.apply([(first, t)])
    del t
    assert gone() is None
    for name, p in dict(model.named_parameters()).items():
        if name != first:
            update.apply([(name, torch.randn(p.shape))])
    update.finish([])
    kept = {t.data_ptr() for saved in update.undo.saved for t in saved.params.values()}
    assert kept == {ptr for ptr, _ in old.values()}  # the prepack's stand-ins: the old storage
    assert update.abort()
    assert all(torch.equal(p, old[n][1]) for n, p in model.named_parameters())


@pytest.mark.vllm
def test_an_update_is_made_in_the_storage_the_last_committed_one_let_go_of():
    """On the CPU the old data a committed update swapped out is where the next update's
    tensors are made (no new memory per update, none faulted in); the values are the update's,
    and an abort still restores the ones before."""
    from vllm.model_executor.model_loader.reload.layerwise import record_metadata_for_reloading

    model = toy_moe_model(2, [], [], replace=False)
    record_metadata_for_reloading(model)
    spare, first = SpareStorage(), {n: p.data_ptr() for n, p in model.named_parameters()}

    def update(seed: int) -> tuple[LiveUpdate, dict]:
        g = torch.Generator().manual_seed(seed)
        new = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        session = LiveUpdate(model, None, undo_limit=1 << 30, spare=spare)
        for name, t in new.items():
            session.apply([(name, t)])
        session.finish([])
        return session, new

    session, v1 = update(1)
    assert not set(first.values()) & {p.data_ptr() for p in model.parameters()}
    session.commit()
    assert spare.nbytes == sum(p.numel() * p.element_size() for p in model.parameters())
    session, v2 = update(2)
    assert {p.data_ptr() for p in model.parameters()} == set(first.values())  # any layer's
    assert all(torch.equal(p, v2[n]) for n, p in model.named_parameters())
    assert spare.nbytes == 0
    assert session.abort()
    assert all(torch.equal(p, v1[n]) for n, p in model.named_parameters())
    session, _ = update(3)
    spare.keep([torch.zeros(3)])  # left over (a layer this update did not touch): let go
    session.commit()
    assert spare.nbytes == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.vllm
def test_a_whole_reload_gives_the_spare_storage_back(monkeypatch):
    """vLLM's whole reload makes every tensor anew: the spare would only add to its peak."""
    from pr2_serve.plugin import live_update, weights

    model, reloaded = torch.nn.Linear(2, 2), []
    reload = lambda **kw: reloaded.append(1)  # noqa: E731
    runner = SimpleNamespace(get_model=lambda: model, reload_weights=reload)
    live_update._SPARES[model] = SpareStorage()
    monkeypatch.setattr(weights, "redo_cpu_moe_prepack", lambda m: None)
    weights.reload_all_weights(runner, {})
    assert reloaded == [1] and model not in live_update._SPARES


# -- on a real engine ----------------------------------------------------------------------------


class FailingCanary:
    """A canary whose check always finds a problem (after generating on the new weights)."""

    prompts = ([1, 2, 3],)
    sampling = Sampling(temperature=0.0, max_tokens=2)
    seconds = 0.0

    def check(self, rollouts) -> str:
        return "forced failure"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    model = make_tiny_model(root / "model", seed=0, predictor="random")
    base = load_file(str(model / "model.safetensors"))
    with RolloutEngine(model, dtype="float32", max_model_len=256, state_dir=root / "s") as e:
        yield e, base, root


def outputs(engine):
    rs = engine.generate(PROMPTS, GREEDY)
    return [(r.output_token_ids, list(r.logprobs), r.routes.tobytes()) for r in rs]


def write(root, name, tensors) -> dict[str, str]:
    path = root / f"{name}.safetensors"
    save_file(tensors, str(path))
    return dict.fromkeys(tensors, str(path))


def live(engine, files, version, **kw):
    kw.setdefault("bucket_bytes", SMALL_BUCKETS)
    return engine.apply_live(files, version, **kw).result(120)


def moved(base, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}


@pytest.mark.vllm
@pytest.mark.slow
def test_live_update_equals_the_whole_reload(setup):
    engine, base, root = setup
    files = write(root, "full", moved(base, 0.02, 1))
    v = engine.weight_version + 1
    res = live(engine, files, v)
    assert res.weight_version == v == engine.weight_version
    a = outputs(engine)
    engine.update_weights(next(iter(files.values())), v + 1)  # the reload of every weight
    b = outputs(engine)
    assert a == b


@pytest.mark.vllm
def test_the_cpu_moe_prepack_packs_each_expert_in_place():
    """:func:`prepack_in_place` is vLLM's prepack, bit for bit, written over the tensor it
    packs (vLLM's makes a new one: the layer's experts twice for a moment)."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    from pr2_serve.plugin.weights import prepack_in_place

    for shape, dtype in [((4, 64, 32), torch.float32), ((8, 256, 128), torch.bfloat16)]:
        w = torch.nn.Parameter(torch.randn(shape).to(dtype), requires_grad=False)
        whole, ptr = cpu_prepack_moe_weight(w.detach().clone(), "vec"), w.data_ptr()
        assert not torch.equal(whole, w)  # packing moves values
        packed = prepack_in_place(w, "vec")
        assert packed is w and w.data_ptr() == ptr and torch.equal(w, whole)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_live_update_prepacks_the_experts_in_place(setup, monkeypatch):
    """The live update's CPU MoE prepack goes through :func:`prepack_in_place` (w13 and w2 of
    each MoE layer), and serves as the whole reload does."""
    from pr2_serve.plugin import weights

    engine, base, root = setup
    calls, pack = [], weights.prepack_in_place
    monkeypatch.setattr(weights, "prepack_in_place", lambda w, isa: calls.append(1) or pack(w, isa))
    files = write(root, "in-place", moved(base, 0.02, 5))
    live(engine, files, engine.weight_version + 1)
    moe_layers = sum(".mlp.experts." in n and n.endswith(".0.down_proj.weight") for n in base)
    assert len(calls) == 2 * moe_layers > 0
    a = outputs(engine)
    monkeypatch.undo()
    engine.update_weights(next(iter(files.values())), engine.weight_version + 1)
    assert outputs(engine) == a


@pytest.mark.vllm
@pytest.mark.slow
def test_live_partial_update_equals_the_whole_reload(setup):
    """A subset (the predictors and one attention projection): the rest of a touched layer
    comes from the served files, untouched layers keep their tensors (and their prepack)."""
    engine, base, root = setup
    part = {n: 0.5 * t for n, t in moved(base, 0.02, 2).items() if "predictor" in n}
    part["model.layers.1.self_attn.q_proj.weight"] = base["model.layers.1.self_attn.q_proj.weight"]
    files = write(root, "part", part)
    live(engine, files, engine.weight_version + 1)
    a = outputs(engine)
    engine.update_weights(next(iter(files.values())), engine.weight_version + 1)
    assert outputs(engine) == a


@pytest.mark.vllm
@pytest.mark.slow
def test_nan_in_the_last_bucket_changes_nothing(setup):
    engine, base, root = setup
    before, version = outputs(engine), engine.weight_version
    bad = moved(base, 0.02, 3)
    last = list(bad)[-1]
    bad[last].view(-1)[-1] = float("nan")
    files = write(root, "nan-last", bad)
    with pytest.raises(NonFiniteWeightsError, match=last.replace(".", r"\.")):
        live(engine, files, version + 1)
    assert engine.weight_version == version
    assert outputs(engine) == before  # bit for bit: tokens, log-probs, routes


@pytest.mark.vllm
@pytest.mark.slow
def test_failed_canary_after_the_last_bucket_restores_everything(setup):
    engine, base, root = setup
    before, version = outputs(engine), engine.weight_version
    files = write(root, "canary", moved(base, 0.05, 4))
    with pytest.raises(CanaryError, match="forced failure"):
        live(engine, files, version + 1, canary=FailingCanary())
    assert engine.weight_version == version
    assert outputs(engine) == before


@pytest.mark.vllm
@pytest.mark.slow
def test_past_the_undo_bound_the_served_files_are_reloaded(setup):
    engine, base, root = setup
    before, version = outputs(engine), engine.weight_version
    bad = moved(base, 0.02, 5)
    bad[list(bad)[-1]].view(-1)[0] = float("inf")
    files = write(root, "inf-last", bad)
    engine.undo_limit, limit = 1, engine.undo_limit
    try:
        with pytest.raises(NonFiniteWeightsError):
            live(engine, files, version + 1)
    finally:
        engine.undo_limit = limit
    after = outputs(engine)
    for (t0, l0, r0), (t1, l1, r1) in zip(before, after, strict=True):
        assert t0 == t1 and r0 == r1
        assert np.abs(np.array(l0) - np.array(l1)).max() <= 1e-5


def test_prefetched_holds_at_most_the_consumers_item_and_the_next():
    made, alive = [], []

    def items():
        for i in range(20):
            made.append(i)
            alive.append(len(made) - len(seen))
            yield i

    seen = []
    for x in prefetched(items()):
        time.sleep(0.005)
        seen.append(x)
    assert seen == list(range(20))
    assert max(alive) <= 2
