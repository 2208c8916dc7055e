"""Ridge predictor (``--predictor ridge``; beyond the paper): no optimiser, a closed form.

Per MoE layer the served offset should be the router's mean move over the next batch's
off-policy mini-steps. For a token of off-policy mini-step ``s`` (``s >= 2``: mini-step 1 runs
before any update) that move is observed as

    n = C (z_s - z_old)                     (C: centre over experts; top-k ignores a constant)

and ``W_p`` is the ridge least-squares map from ``h_old`` to it, fitted on the last batches with
exponentially decaying weight (each batch multiplies the earlier sums by ``memory``):

    A = sum h h^T / N,   B = sum h n^T / N,   W_p = ((A + lam I)^-1 B)^T      ([E, H])

``lam`` is per unit of the inputs' mean square (``trace(A) / H``), so one value suits any scale
of ``h``. It is what the learned predictor's KL fit aims at, solved exactly instead of chased by
Adam steps whose size is a hyper-parameter. Pure torch (float64 sums).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RidgeFit", "centred_move", "ridge_solve"]


def centred_move(z_old: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """``z_s - z_old`` centred over experts (last dim), float64."""
    n = z_s.double() - z_old.double()
    return n - n.mean(-1, keepdim=True)


def ridge_solve(a: torch.Tensor, b: torch.Tensor, strength: float) -> torch.Tensor:
    """``((A + lam I)^-1 B)^T`` with ``lam = strength x trace(A) / H``; ``A [H, H]`` and
    ``B [H, E]`` are the (weighted) means of ``h h^T`` and ``h n^T``. Returns ``[E, H]``."""
    a, b = a.double(), b.double()
    h = a.shape[0]
    lam = strength * torch.clamp(torch.trace(a) / h, min=1e-12)
    return torch.linalg.solve(a + lam * torch.eye(h, dtype=a.dtype, device=a.device), b).T


class RidgeFit:
    """The decayed sums of every MoE layer and the predictor they give.

    Use as a mini-step observer (:class:`trainer.algo.train_step.Learner`): :meth:`mini_step` adds
    an off-policy mini-step's tokens, :meth:`end_batch` folds the batch into the memory."""

    def __init__(self, strength: float, memory: float) -> None:
        self.strength, self.memory = strength, memory
        self.a: list[torch.Tensor] = []  # per layer, sum of h h^T (decayed)
        self.b: list[torch.Tensor] = []  # per layer, sum of h n^T (decayed)
        self.count = 0.0
        self._batch: list[list[torch.Tensor]] | None = None  # this batch's [A, B] per layer
        self._batch_count = torch.zeros((), dtype=torch.float64)

    def begin(self, batch, old) -> None:
        """Start a batch (the sums of its off-policy mini-steps accumulate apart)."""
        self._batch, self._batch_count = None, torch.zeros((), dtype=torch.float64)

    def mini_step(self, step: int, old, rows: torch.Tensor, z_s, valid: torch.Tensor) -> None:
        """Add mini-step ``step``'s tokens (``rows`` of the flat batch, ``valid`` real ones)."""
        if step < 2:
            return
        self.add([h[rows] for h in old.hidden], [z[rows] for z in old.logits], z_s, valid)

    def add(
        self,
        h_old: Sequence[torch.Tensor],
        z_old: Sequence[torch.Tensor],
        z_s: Sequence[torch.Tensor],
        valid: torch.Tensor,
    ) -> None:
        """Add tokens: per layer ``h_old [T, H]``, ``z_old``/``z_s [T, E]``; ``valid [T]``."""
        m = valid.bool()
        sums = []
        for h, z0, zs in zip(h_old, z_old, z_s, strict=True):
            hv = h.detach()[m].double()
            n = centred_move(z0.detach()[m], zs.detach()[m])
            sums.append([hv.T @ hv, hv.T @ n])
        if self._batch is None:
            self._batch = sums
        else:
            self._batch = [[a + sums[i][0], b + sums[i][1]] for i, (a, b) in enumerate(self._batch)]
        self._batch_count = self._batch_count + float(m.sum())

    def end_batch(self, world: int = 1) -> None:
        """Fold this batch's sums into the memory (summed over ranks first when ``world`` > 1)."""
        if self._batch is None:
            return
        if world > 1:
            import torch.distributed as dist

            for pair in self._batch:
                for t in pair:
                    dist.all_reduce(t)
            dist.all_reduce(self._batch_count)
        if not self.a:
            self.a = [torch.zeros_like(p[0]) for p in self._batch]
            self.b = [torch.zeros_like(p[1]) for p in self._batch]
        g = self.memory
        self.a = [g * a + p[0] for a, p in zip(self.a, self._batch, strict=True)]
        self.b = [g * b + p[1] for b, p in zip(self.b, self._batch, strict=True)]
        self.count = g * self.count + float(self._batch_count)
        self._batch = None

    def weights(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The fitted ``W_p`` per layer in ``like``'s dtype and device (zeros before any fit)."""
        if not self.a or self.count <= 0:
            return [torch.zeros_like(w) for w in like]
        return [
            ridge_solve(a / self.count, b / self.count, self.strength).to(w.device, w.dtype)
            for a, b, w in zip(self.a, self.b, like, strict=True)
        ]
