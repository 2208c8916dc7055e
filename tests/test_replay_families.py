"""Trainer-side routing control on the HF models of the grouped (GLM-4.5, DeepSeek-V3,
DeepSeek-V2) and GPT-OSS families: the natural and forced routes reproduce the stock forward,
the predictor moves the selection only, the correction bias is used but never trained."""

from __future__ import annotations

import pytest
import torch

from pr2_serve.core.routing import deviation_counts, route_misses
from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model
from trainer.algo.replay import MoEReplay, RoutingControl, router_kind

FAMILIES = ["glm4_moe", "deepseek_v3", "deepseek_v2", "gpt_oss"]
KINDS = {"gpt_oss": "biased", "deepseek_v2": "grouped_softmax"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    return arch, make_tiny_model(d, seed=2, predictor="random", spec=TinySpec(arch=arch))


def _load(d):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def _with_predictors(d):
    from safetensors.torch import load_file

    model = _load(d)
    replay = MoEReplay(model)
    assert replay.load_predictors(load_file(str(d / "model.safetensors"))) == 3 + (
        "gpt_oss" in str(d)
    )
    return model, replay


def test_forced_natural_routes_reproduce_the_stock_forward(family_dir):
    arch, d = family_dir
    stock = _load(d)
    model, replay = _with_predictors(d)
    assert {router_kind(r) for r in replay.routers} == {KINDS.get(arch, "grouped")}
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        ref = stock(x).logits
        ctl = RoutingControl(record=True)
        with replay.control(ctl):
            natural = model(x).logits
        with replay.control(RoutingControl(forced_ids=ctl.recorded_routes())):
            forced = model(x).logits
    # the grouped routers are computed op for op as HF does: bitwise. GPT-OSS's HF router sorts
    # its top-k (ours does not, as vLLM's), so the softmax sums in another order: ~1 ulp
    tol = 1e-6 if arch == "gpt_oss" else 0
    torch.testing.assert_close(natural, ref, atol=tol, rtol=0)
    torch.testing.assert_close(forced, natural, atol=0, rtol=0)


def test_the_predictor_moves_the_selection_only(family_dir):
    """With the checkpoint's random predictor some routes move; the forward is then exactly
    the forward with those routes forced (gating from the plain router)."""
    _, d = family_dir
    model, replay = _with_predictors(d)
    x = torch.randint(0, 256, (2, 29))
    with torch.no_grad():
        plain, pred = RoutingControl(record=True), RoutingControl(record=True, use_predictor=True)
        with replay.control(plain):
            model(x)
        with replay.control(pred):
            out = model(x).logits
        with replay.control(RoutingControl(forced_ids=pred.recorded_routes())):
            forced = model(x).logits
    moved = plain.recorded_routes().sort(-1).values != pred.recorded_routes().sort(-1).values
    assert 0 < int(moved.any(-1).sum()) < moved.shape[0] * moved.shape[1]
    torch.testing.assert_close(out, forced, atol=0, rtol=0)


def test_forced_routes_train_the_router_not_the_correction_bias(family_dir):
    arch, d = family_dir
    model, replay = _with_predictors(d)
    x = torch.randint(0, 256, (1, 11))
    ctl = RoutingControl(record=True)
    with torch.no_grad(), replay.control(ctl):
        natural = model(x).logits
    other = (ctl.recorded_routes() + 5) % replay.num_experts
    with replay.control(RoutingControl(forced_ids=other)):
        out = model(x).logits
    assert not torch.allclose(out, natural)
    out.sum().backward()
    router = replay.routers[0]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    params = dict(model.named_parameters())
    if arch == "gpt_oss":  # the router's bias is a trained parameter of GPT-OSS
        assert router.bias.grad is not None and router.bias.grad.abs().sum() > 0
    elif arch != "deepseek_v2":  # DeepSeek-V2 has no correction bias
        assert not any("e_score_correction_bias" in n for n in params)
        assert router.e_score_correction_bias.abs().sum() > 0  # non-zero, and used


def test_fresh_routes_are_the_family_selection(family_dir):
    """``MoEReplay.select`` re-selects the recorded natural routes from the recorded ``h`` and
    ``z`` (no misses), with and without the predictor; plain ``topk(z)`` does not for the
    grouped routers (their correction bias and groups take part)."""
    arch, d = family_dir
    model, replay = _with_predictors(d)
    x = torch.randint(0, 256, (2, 17))
    plain_misses = 0
    for use_predictor in (False, True):
        ctl = RoutingControl(record=True, use_predictor=use_predictor)
        with torch.no_grad(), replay.control(ctl):
            model(x)
        for layer, (h, z, ids) in enumerate(zip(ctl.hidden, ctl.logits, ctl.ids, strict=True)):
            w_p = replay.predictors[layer].weight if use_predictor else None
            assert int(route_misses(ids, replay.select(layer, z, h, w_p)).sum()) == 0
            if not use_predictor:
                plain_misses += int(deviation_counts(ids, z).sum())
    assert (plain_misses > 0) == (arch != "gpt_oss")


def test_trainer_metrics_use_the_family_selection(family_dir):
    """Replaying a batch's own natural routes (r2 at theta_old): mini-step 1 deviates nowhere,
    R2 = R3 everywhere and the zero predictor's served routes agree, for every family (ranked
    by plain top-k, a grouped router's natural routes would look like deviations)."""
    from trainer.algo.train_step import Learner
    from trainer.run.config import TrainConfig
    from trainer.run.distributed import synthetic_batch
    from trainer.run.policy import Policy

    arch, d = family_dir
    policy = Policy(str(d))
    with torch.no_grad():
        for w in policy.predictor_parameters():
            w.zero_()
    cfg = TrainConfig(
        replay="r2", off_policy_steps=2, prompts_per_batch=4, samples_per_prompt=2,
        lr=1e-3, servers=["http://unused"],
    )  # fmt: skip
    m = Learner(policy, cfg).train(synthetic_batch(policy))
    assert m["zero_deviation_per_mini_step"][0] == 1.0, (arch, m["zero_deviation_per_mini_step"])
    assert sum(m["r2_vs_r3_deviation_hist"][1:]) == 0, (arch, m["r2_vs_r3_deviation_hist"])
    assert m["server_route_agreement"] == 1.0, arch


def test_route_deviation_ranks_by_the_family_selection(family_dir):
    """A forward's own natural routes deviate nowhere when measured with the family's selection
    (what the trainer's metrics use); plain top-k of a grouped router's logits would count
    most of them as deviations."""
    from trainer.algo.step_metrics import route_deviation
    from trainer.run.distributed import synthetic_batch
    from trainer.run.policy import Policy

    arch, d = family_dir
    policy = Policy(str(d))
    batch = synthetic_batch(policy)
    ctl = RoutingControl(record=True)
    with torch.no_grad(), policy.replay.control(ctl):
        policy.model(input_ids=batch.input_ids)
    routes, k = ctl.recorded_routes(), policy.replay.top_k
    valid = torch.ones(routes.shape[0], dtype=torch.bool)
    family = route_deviation(routes, ctl.logits, valid, k, policy.replay.select)
    assert family[1:].sum() == 0, (arch, family.tolist())
    if router_kind(policy.replay.routers[0]).startswith("grouped"):
        assert route_deviation(routes, ctl.logits, valid, k)[1:].sum() > 0


def test_predictor_loss_scores_as_the_family_ranks(family_dir):
    """The learned predictor's loss compares sigmoid scores for the sigmoid routers and the
    softmax for the others (:func:`trainer.algo.predictor.predictor_loss`)."""
    arch, d = family_dir
    _, replay = _with_predictors(d)
    kind = "sigmoid" if arch in ("glm4_moe", "deepseek_v3") else "softmax"
    assert replay.scoring() == [kind] * replay.num_moe_layers


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", *FAMILIES])
def test_grouped_experts_train_as_eager_under_forced_routes(tmp_path, arch):
    """The trainer's experts (``--experts-implementation``, default transformers' grouped_mm)
    against the eager reference, both under the same forced routes: the log-probs and every
    gradient (experts, attention, routers) agree to fp32 rounding, and ``Policy`` takes the
    config's choice."""
    from trainer.algo.ppo import token_logprobs
    from trainer.run.config import TrainConfig
    from trainer.run.policy import Policy

    d = make_tiny_model(tmp_path, seed=4, predictor="random", spec=TinySpec(arch=arch))
    x = torch.randint(0, 256, (3, 17))
    runs = {}
    for impl in ("eager", "grouped_mm"):
        cfg = TrainConfig(servers=["http://x"], model_dir=str(d), experts_implementation=impl)
        policy = Policy.from_config(cfg, device="cpu")
        assert policy.model.config._experts_implementation == impl
        ctl = RoutingControl(record=True)
        with policy.replay.control(ctl), torch.no_grad():
            policy.model(x)
        forced = runs["eager"][2] if runs else ctl.recorded_routes()
        with policy.replay.control(RoutingControl(forced_ids=forced)):
            lp = token_logprobs(policy.model(x).logits, x)
        lp.sum().backward()
        grads = {
            n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None
        }
        runs[impl] = (lp.detach(), grads, forced)
    (lp_e, g_e, _), (lp_g, g_g, _) = runs["eager"], runs["grouped_mm"]
    torch.testing.assert_close(lp_g, lp_e, rtol=0, atol=1e-5)
    assert g_g.keys() == g_e.keys() and any(".gate." in n or ".router." in n for n in g_e)
    for name, g in g_e.items():
        torch.testing.assert_close(g_g[name], g, rtol=1e-4, atol=1e-5, msg=name)
