"""Two-process torchrun (gloo) training step == one process on the same data, for DDP and for
FSDP2 (parameters sharded per decoder layer; the pushed checkpoint is gathered from the shards).

Tolerance: the two runs sum gradients in a different order (per-rank shares, then an
all-reduce), so gradients agree to float32 rounding. Adam normalises each coordinate by its own
gradient size, which turns rounding on near-zero gradients into up to a few percent of one
step: updated weights agree within 2 % of an Adam step (lr 1e-3 -> 2e-5); losses within 1e-6.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_data_parallel_step_equals_single_process(tiny_random, tmp_path, parallel):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "trainer.run.distributed", "selftest", str(one), str(tiny_random)],
        check=True,
        timeout=300,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "trainer.run.distributed",
            "selftest",
            str(two),
            str(tiny_random),
            parallel,
        ],
        check=True,
        timeout=300,
    )
    w1 = load_file(f"{one}.safetensors")
    w2 = load_file(f"{two}.safetensors")
    base = load_file(str(tiny_random / "model.safetensors"))
    assert w1.keys() == w2.keys() == base.keys()  # the checkpoint the trainer pushes
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst <= 2e-5, worst
    moved = max(float((w1[k] - base[k]).abs().max()) for k in base if k in w1)
    assert moved > 1e-4  # the step really changed the weights
    l1 = json.loads((tmp_path / "one.json").read_text())
    l2 = json.loads((tmp_path / "two.json").read_text())
    assert abs(l1["loss"] - l2["loss"]) <= 1e-6
    # the predictor loss is the sum of the ranks' shares of each mini-step's tokens, its
    # target each rank's own forward logits: agrees to float32 rounding (relative)
    assert abs(l1["predictor_loss"] - l2["predictor_loss"]) <= 1e-5 * abs(l1["predictor_loss"])
    assert abs(l1["grad_norm"] - l2["grad_norm"]) <= 1e-5 * l1["grad_norm"]
    # teardown freed the gloo backend: no gloo thread runs into interpreter shutdown (the
    # flaky SIGABRT at exit, see trainer.run.distributed.teardown); FSDP2 still holds the group
    if parallel == "ddp" and sys.platform == "linux":
        for rank in (0, 1):
            names = json.loads((tmp_path / f"two.rank{rank}.threads.json").read_text())
            assert not [n for n in names if "gloo" in n], (rank, names)
