"""Trainer-side routing control on HF models: forced gating == the family's own gating when the
forced ids are the natural top-k (one test per family)."""

from __future__ import annotations

import pytest
import torch

from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model
from trainer.algo.replay import MoEReplay, RoutingControl


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_forced_natural_ids_reproduce_stock_forward(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model(tmp_path, seed=2, spec=TinySpec(arch=arch))
    stock = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    stock.set_experts_implementation("eager")
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    replay = MoEReplay(model)
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        ref = stock(x).logits
        ctl = RoutingControl(record=True)
        with replay.control(ctl):
            natural = model(x).logits
        with replay.control(RoutingControl(forced_ids=ctl.recorded_routes())):
            forced = model(x).logits
    torch.testing.assert_close(natural, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(forced, natural, atol=0, rtol=0)


def test_forcing_other_ids_changes_output_and_grads_reach_router(tmp_path):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model(tmp_path, seed=2)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    replay = MoEReplay(model)
    x = torch.randint(0, 256, (1, 9))
    ctl = RoutingControl(record=True)
    with torch.no_grad(), replay.control(ctl):
        natural = model(x).logits
    other = (ctl.recorded_routes() + 3) % replay.num_experts
    with replay.control(RoutingControl(forced_ids=other)):
        out = model(x).logits
    assert not torch.allclose(out, natural)
    out.sum().backward()
    assert replay.routers[0].weight.grad is not None
    assert replay.routers[0].weight.grad.abs().sum() > 0
