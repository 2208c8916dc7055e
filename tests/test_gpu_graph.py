"""The PR2 router and its capture buffer as vLLM's CUDA build runs them: captured once in a CUDA
graph at a padded batch size and replayed with fewer real tokens (real rows first, padding
after). The rows read back must equal the eager routing of the real tokens. On the CPU the same
calls run without a graph (the smoke run of ``benchmarks/gpu_check.sh --cpu``)."""

from __future__ import annotations

import pytest
import torch

from pr2_serve.core.routing import pr2_route
from pr2_serve.plugin.router import PR2Predictor, PR2Router, RouteCapture
from tests.devices import DEVICES


def _router(device, experts, hidden, k, dtype):
    g = torch.Generator().manual_seed(0)
    router = PR2Router(0)
    router.moe_layer = 0
    router.predictor = PR2Predictor(experts, hidden, dtype).to(device)
    router.predictor.weight.data = (torch.randn(experts, hidden, generator=g) * 0.05).to(
        device, dtype
    )
    router.capture = RouteCapture(64, 1, k, experts)
    router.capture.buffer = router.capture.buffer.to(device)
    return router


@pytest.mark.parametrize("device", DEVICES)
def test_router_and_capture_replayed_at_padded_batch_sizes(device):
    experts, hidden, k, padded = 128, 256, 8, 32
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    router = _router(device, experts, hidden, k, dtype)
    w_r = (torch.randn(experts, hidden) * 0.05).to(device, dtype)
    static_h = torch.zeros(padded, hidden, device=device, dtype=dtype)
    static_z = torch.zeros(padded, experts, device=device, dtype=dtype)

    def step():
        return router(static_h, static_z, k, True)

    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (and compile) outside the graph
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()  # static output tensors, refilled by every replay

        def run():
            graph.replay()
            return out
    else:
        run = step
    for real in (1, 5, 17, padded):
        h = torch.randn(real, hidden).to(device, dtype)
        static_h.normal_()  # padding rows hold garbage, as in a padded vLLM batch
        static_h[:real] = h
        static_z.copy_(static_h @ w_r.T)
        weights, ids = run()
        want_w, want_ids = pr2_route(h, h @ w_r.T, router.predictor.weight, k, True)
        captured = router.capture.buffer[:real, 0].long().sort(-1)
        assert torch.equal(captured.values, want_ids.long().sort(-1).values), real
        assert torch.equal(ids[:real].long().sort(-1).values, captured.values)
        got_w = weights[:real].gather(-1, ids[:real].long().argsort(-1))
        torch.testing.assert_close(got_w, want_w.gather(-1, want_ids.long().argsort(-1)))
