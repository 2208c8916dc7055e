"""Trainer precision and device: bf16 autocast over fp32 master weights, ``--device``, and the
start-up line comparing the server's and the trainer's precision."""

from __future__ import annotations

import pytest
import torch

from trainer.algo.train_step import Learner
from trainer.run.config import TrainConfig, parse_config
from trainer.run.distributed import synthetic_batch
from trainer.run.policy import Policy
from trainer.run.precision import autocast, precision_line, resolve_device


def test_flags_and_devices():
    cfg = parse_config(["--dtype", "bfloat16", "--device", "cpu"])
    assert (cfg.dtype, cfg.device) == ("bfloat16", "cpu")
    assert parse_config([]).dtype == "float32" and parse_config([]).device == "auto"
    with pytest.raises(ValueError, match="dtype"):
        parse_config(["--dtype", "float16"])
    with pytest.raises(ValueError, match="device"):
        parse_config(["--device", "tpu"])
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda"):
            resolve_device("cuda")
    assert isinstance(autocast("cpu", "bfloat16"), torch.autocast)
    with pytest.raises(ValueError, match="dtype"):
        autocast("cpu", "float64")


def test_precision_line():
    line = precision_line("bfloat16", "cpu", ["float32", "float32"])
    assert "server float32 vs trainer bfloat16" in line and "mismatch" in line
    assert "mismatch" not in precision_line("float32", "cpu", ["float32"])
    assert "server unknown vs trainer float32" in precision_line("float32", "cpu", [None])


def train_once(model_dir, dtype: str, mode: str) -> tuple[Policy, Learner, dict]:
    """One batch whose 'server' log-probs and routes are an fp32 policy's own."""
    batch = synthetic_batch(Policy(str(model_dir)))
    policy = Policy(str(model_dir), dtype=dtype, device="cpu")
    cfg = TrainConfig(
        replay=mode,
        predictor="learned",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        lr=1e-3,
        servers=["http://unused"],
        dtype=dtype,
    )
    learner = Learner(policy, cfg)
    return policy, learner, learner.train(batch)


@pytest.mark.parametrize("mode", ["r2", "pr2"])
def test_bf16_trainer_against_fp32_logprobs(tiny_random, mode):
    """bf16 autocast vs an fp32 'server': the train-infer KL and the R2-vs-R3 route gap appear;
    fp32 vs fp32 has neither. The weights and Adam's state stay fp32 (the master copy)."""
    _, _, fp32 = train_once(tiny_random, "float32", mode)
    assert fp32["train_infer_kl"] == 0.0
    assert sum(fp32["r2_vs_r3_deviation_hist"][1:]) == 0
    policy, learner, bf16 = train_once(tiny_random, "bfloat16", mode)
    assert bf16["train_infer_kl"] > 0
    assert sum(bf16["r2_vs_r3_deviation_hist"][1:]) > 0
    assert bf16["first_ratio_max_dev"] == 0.0  # old pass and mini-step 1 in the same precision
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    opts = [o for o in (learner.opt, learner.pred_opt) if o is not None]
    states = [s for o in opts for s in o.state.values()]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}
    if mode == "pr2":
        assert bf16["predictor_loss"] is not None
