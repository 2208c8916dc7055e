"""The trainer's precision and device: ``--dtype float32|bfloat16``, ``--device auto|cpu|cuda``.

``bfloat16`` is **autocast**, not bf16 weights: the parameters stay fp32 and are themselves the
master copy (Adam's moments are fp32 too), and each training forward runs under
``torch.autocast(dtype=torch.bfloat16)``, so matmuls (attention and expert projections, the
router logits, the LM head) compute in bf16 while norms, softmaxes, the residual stream and
the log-probs stay fp32. Why autocast: the same code path trains under DDP and FSDP2 with no
separate master copy to keep in sync, the optimizer needs nothing special, and the pushed
weights are the fp32 master weights (the server casts them to its own ``--dtype`` on load), so a
bf16 trainer never loses precision in what it pushes. The cost is memory: fp32 weights and
optimizer state, plus the bf16 copies autocast makes during a forward; bf16-weight training
(half the weight memory) would need a hand-kept fp32 copy for every optimizer.

Pure torch: importable without vLLM.
"""

from __future__ import annotations

import contextlib
from typing import get_args

import torch

from trainer.run.config import TrainDevice, TrainDtype

__all__ = ["TrainDevice", "TrainDtype", "autocast", "precision_line", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``, ``cuda`` and
    ``cuda:N`` as they are, but CUDA without a GPU is an error naming the flag."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in get_args(TrainDevice):
        raise ValueError(f"device must be one of {get_args(TrainDevice)}, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device (use cpu or auto)")
    return device


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """The context a training forward runs in: bf16 autocast on ``device``'s type, or nothing
    (``float32``)."""
    if dtype not in get_args(TrainDtype):
        raise ValueError(f"dtype must be one of {get_args(TrainDtype)}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def precision_line(trainer_dtype: str, device: str, server_dtypes: list[str | None]) -> str:
    """One start-up line: the servers' serving dtype(s) vs the trainer's precision (a mismatch
    is legitimate -- it is the train/inference gap R3 closes -- but it must be visible)."""
    served = sorted({d or "unknown" for d in server_dtypes})
    trainer = "float32"
    if trainer_dtype == "bfloat16":
        trainer = "bfloat16 autocast (fp32 master weights)"
    known = [d for d in served if d != "unknown"]
    note = ""
    if known and any(d != trainer_dtype for d in known):
        note = " (mismatch: trainer and server log-probs and routes will differ; R3 replays them)"
    return f"precision: server {'/'.join(served)} vs trainer {trainer} on {device}{note}"
