"""A deliberately imbalanced warm start (setting B): routers biased towards a few
experts, so that a load-balancing loss keeps pulling them the same way for many batches
(persistent router drift, the regime PR2's predictor is built for).

Qwen3-MoE routers have no bias term, so the bias goes into the weights along each layer's mean
router input ``h_mean`` (over the task's tokens): ``W_e += bias * h_mean / |h_mean|^2`` for each
favoured expert ``e`` raises its logit by exactly ``bias`` on a token whose input is ``h_mean``,
and by ``bias * <h, h_mean> / |h_mean|^2`` on any other.

    python -m trainer.experiments.imbalance WARM_DIR OUT_DIR --experts 0 1 --bias 3
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.algo.replay import MoEReplay, RoutingControl
from trainer.data.tasks import EOS, Task, encode

__all__ = ["bias_routers", "expert_load", "make_imbalanced", "mean_router_inputs", "measure"]


def bias_routers(
    weights: Sequence[torch.Tensor],
    h_mean: Sequence[torch.Tensor],
    experts: Sequence[int],
    bias: float,
) -> list[torch.Tensor]:
    """New router weights (``[E, H]`` per layer): ``W_e + bias * h_mean / |h_mean|^2`` for
    ``e`` in ``experts``, the other rows unchanged. Pure."""
    out = []
    for w, h in zip(weights, h_mean, strict=True):
        w = w.detach().clone()
        step = bias * h.to(w.dtype) / h.to(w.dtype).pow(2).sum().clamp(min=1e-12)
        for e in experts:
            if not 0 <= e < w.shape[0]:
                raise ValueError(f"expert {e} is not one of the router's {w.shape[0]}")
            w[e] += step
        out.append(w)
    return out


def expert_load(ids: Sequence[torch.Tensor], num_experts: int) -> list[list[float]]:
    """Per layer, the share of route entries (``[T, k]`` ids) that went to each expert."""
    return [
        (torch.bincount(i.reshape(-1).long(), minlength=num_experts).float() / i.numel()).tolist()
        for i in ids
    ]


def _task_tokens(task: Task, n: int, seed: int) -> torch.Tensor:
    seqs = [encode(p.prompt) + encode(p.answer) + [EOS] for p in task.batch(n, seed)]
    t = max(len(s) for s in seqs)
    return torch.tensor([s + [EOS] * (t - len(s)) for s in seqs])


@torch.no_grad()
def mean_router_inputs(model, replay: MoEReplay, tokens: torch.Tensor) -> tuple[list, list]:
    """Per MoE layer: the mean router input over ``tokens`` and the chosen ids."""
    ctl = RoutingControl(record=True)
    with replay.control(ctl):
        model(input_ids=tokens)
    return [h.mean(0) for h in ctl.hidden], ctl.ids


def measure(model_dir: str | Path, experts: Sequence[int], task: Task, seed: int = 0) -> dict:
    """The expert load (per layer) and greedy held-out accuracy of a checkpoint."""
    from transformers import AutoModelForCausalLM

    from trainer.experiments.warmup import greedy_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    replay = MoEReplay(model)
    _, ids = mean_router_inputs(model, replay, _task_tokens(task, 256, seed))
    return {
        "load_after": expert_load(ids, replay.num_experts),
        "eval_accuracy": greedy_accuracy(model, task, 128, seed, 8),
    }


def make_imbalanced(
    warm_dir: str | Path,
    out_dir: str | Path,
    experts: Sequence[int],
    bias: float,
    task: Task,
    seed: int = 0,
    n: int = 256,
) -> dict:
    """Write ``warm_dir`` with biased routers to ``out_dir``; the expert load before and after
    (per layer) and the greedy held-out accuracy after, also saved as ``imbalance.json``."""
    from transformers import AutoModelForCausalLM

    from trainer.experiments.warmup import greedy_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(warm_dir), dtype=torch.float32)
    model.eval()
    replay = MoEReplay(model)
    tokens = _task_tokens(task, n, seed)
    h_mean, ids_before = mean_router_inputs(model, replay, tokens)
    new = bias_routers([r.weight for r in replay.routers], h_mean, experts, bias)
    with torch.no_grad():
        for router, w in zip(replay.routers, new, strict=True):
            router.weight.copy_(w)
    _, ids_after = mean_router_inputs(model, replay, tokens)
    info = {
        "experts": list(experts),
        "bias": bias,
        "load_before": expert_load(ids_before, replay.num_experts),
        "load_after": expert_load(ids_after, replay.num_experts),
        "eval_accuracy": greedy_accuracy(model, task, 128, seed, 8),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if ".predictor." not in k}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    for f in Path(warm_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    (out / "imbalance.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pr2-imbalance", description=__doc__.split("\n")[0])
    ap.add_argument("warm_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--experts", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--bias", type=float, default=3.0)
    args = ap.parse_args(argv)
    info = make_imbalanced(
        args.warm_dir, args.out_dir, args.experts, args.bias, Task("addition", 2)
    )
    print(json.dumps({k: v for k, v in info.items() if k != "load_before"}, indent=1))


if __name__ == "__main__":
    main()
