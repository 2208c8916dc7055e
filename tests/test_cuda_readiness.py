"""What the CUDA build does differently, checked on the CPU build by design (issue: CUDA
readiness). Each test would fail without its guard: runner check, fp32 gating, refusals by
config, router identity, deferred route copy, compiled routing == eager."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from pr2_serve.core.routing import compiled_pr2_route, gate_weights, pr2_route
from pr2_serve.plugin.compat import PR2ConfigError
from pr2_serve.plugin.refusals import SIMULATION_ENV, check_engine_config
from pr2_serve.plugin.step_rows import StepRows


# -- 1. the model runner -------------------------------------------------------------------------
def test_a_runner_without_v1_bookkeeping_is_refused_by_name():
    from pr2_serve.plugin.worker import check_runner

    class GPUModelRunner:  # Model Runner V2's shape: no input_batch / requests / positions
        def execute_model(self, *a): ...

    with pytest.raises(PR2ConfigError, match=r"GPUModelRunner.*VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(GPUModelRunner())
    v1 = types.SimpleNamespace(
        input_batch=1, requests={}, positions=1, query_start_loc=1, execute_model=print
    )
    check_runner(v1)


# -- 2. gating precision -------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [True, False])
def test_gating_of_bf16_logits_is_computed_in_fp32(renormalize):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(256, 128, generator=g) * 3).to(torch.bfloat16)  # Qwen3-30B-A3B: 128 experts
    ids = torch.topk(z.float(), 8, dim=-1).indices
    w = gate_weights(z, ids, renormalize)
    z64 = z.double()  # reference: the same bf16 values, float64 math
    chosen = z64.gather(-1, ids)
    ref = torch.softmax(chosen, -1) if renormalize else torch.softmax(z64, -1).gather(-1, ids)
    assert w.dtype == torch.float32
    assert float(((w.double() - ref).abs() / ref).max()) < 1e-5  # bf16 math: ~1e-2


# -- 3, 4. configurations that would give wrong routes --------------------------------------------
def _config(**parallel):
    base = dict(
        data_parallel_size=1,
        pipeline_parallel_size=1,
        enable_dbo=False,
        ubatch_size=0,
        prefill_context_parallel_size=1,
        decode_context_parallel_size=1,
        use_sequence_parallel_moe=False,
    )
    spec = parallel.pop("speculative_config", None)
    return types.SimpleNamespace(
        parallel_config=types.SimpleNamespace(**{**base, **parallel}), speculative_config=spec
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ({"speculative_config": object()}, "speculative decoding"),
        ({"data_parallel_size": 2}, "data parallel"),
        ({"pipeline_parallel_size": 2}, "pipeline parallel"),
        ({"enable_dbo": True}, "micro-batching"),
        ({"ubatch_size": 2}, "micro-batching"),
        ({"prefill_context_parallel_size": 2}, "prefill context parallel"),
        ({"decode_context_parallel_size": 2}, "decode context parallel"),
        ({"use_sequence_parallel_moe": True}, "sequence-parallel MoE"),
    ],
)
def test_configurations_that_break_routes_are_refused(change, words):
    check_engine_config(_config())  # the default passes
    with pytest.raises(PR2ConfigError, match=words):
        check_engine_config(_config(**change))


# -- 5. vLLM's routing simulator would bypass the PR2 router -------------------------------------
def test_a_layer_built_with_the_simulation_router_is_refused(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.router_factory import (
        create_fused_moe_router,
    )

    from pr2_serve.plugin.models import PR2Router, check_router_is_pr2

    ours = PR2Router(0)

    def layer_router():
        return create_fused_moe_router(
            top_k=2, global_num_experts=8, renormalize=True, custom_routing_function=ours
        )

    check_router_is_pr2(types.SimpleNamespace(router=layer_router()), ours, 0)
    monkeypatch.setenv(SIMULATION_ENV, "uniform_random")
    import vllm.envs

    if hasattr(vllm.envs, "disable_envs_cache"):
        vllm.envs.disable_envs_cache()
    runner = types.SimpleNamespace(router=layer_router())
    with pytest.raises(PR2ConfigError, match=r"not the PR2 router.*SIMULATION"):
        check_router_is_pr2(runner, ours, 0)
    with pytest.raises(PR2ConfigError, match=SIMULATION_ENV):
        check_engine_config(_config())


# -- 6. deferred route copy ------------------------------------------------------------------------
def test_step_rows_are_the_values_at_the_step_even_if_buffers_are_reused():
    capture = torch.arange(24, dtype=torch.int16).reshape(6, 2, 2)
    positions, slots = torch.arange(6), torch.arange(10, 16)
    rows = StepRows(6, capture)
    rows.record(capture, positions, slots, 4, np.array([0, 4]), ["k"], {0: np.array([7])})
    want = capture[:4].clone()
    capture.zero_()  # the next step overwrites the device buffer
    positions.zero_()
    got = {}

    class Store:
        def on_step(self, r, s, p, keys, bounds, block_row):
            got.update(rows=r.copy(), slots=s.copy(), pos=p.copy(), keys=keys, row=block_row(0))

    rows.flush(Store())
    assert torch.equal(torch.from_numpy(got["rows"]), want)
    assert got["pos"].tolist() == [0, 1, 2, 3] and got["slots"].tolist() == [10, 11, 12, 13]
    assert got["keys"] == ["k"] and got["row"].tolist() == [7]
    got.clear()
    rows.flush(Store())  # nothing pending: nothing handed over
    assert not got


# -- 7. compiled routing ---------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [True, False])
def test_compiled_routing_equals_eager(renormalize):
    g = torch.Generator().manual_seed(2)
    w_p = torch.randn(16, 32, generator=g) * 0.1
    route = compiled_pr2_route()  # fullgraph=True: a graph break would raise
    for tokens in (1, 7, 64, 200):  # dynamic shapes: one compiled graph
        h = torch.randn(tokens, 32, generator=g)
        z = torch.randn(tokens, 16, generator=g)
        w_c, ids_c = route(h, z, w_p, 4, renormalize)
        w_e, ids_e = pr2_route(h, z, w_p, 4, renormalize)
        assert torch.equal(ids_c.sort(-1).values, ids_e.sort(-1).values)
        order_c, order_e = ids_c.argsort(-1), ids_e.argsort(-1)
        torch.testing.assert_close(w_c.gather(-1, order_c), w_e.gather(-1, order_e))
