"""Trainer and servers agree on the weights before step 1: compare content fingerprints, push on
a mismatch (or refuse).

A server reports what it serves in ``/v1/info`` (``policy_fingerprint``,
``predictor_fingerprint``, ``weight_source``), fingerprinted by :mod:`pr2_serve.core.fingerprint`;
the trainer fingerprints what it expects with the same function. A version number alone says
nothing: a restarted server restores its last pushed version from its state directory, which is
not what a new run starts from.

What a run expects served (:func:`starting_target`): the checkpoint's tensors (the policy starts
from them) and the predictor as the mode serves it -- the checkpoint's own (zeros where absent)
in ``pr2``, zeros in ``none``/``r2``/``r3``: routing there must be the plain top-k, never a
previous PR2 run's predictor. (Later pushes in those modes carry the policy only, so the zeros
stay.)

:func:`agree` compares every server with a :class:`Target`; on a mismatch it pushes the target
to every server as the next version and logs one line (``on_mismatch="push"``), or exits with a
message naming the server, its version, its weight source and how to reset it
(``on_mismatch="fail"``). :func:`serve_exactly` ("make these servers serve exactly these
weights, as this version, and check it") is the building block resume and fault tolerance
reuse: e.g. ``serve_exactly([client], [address], tensors_target(state, model_dir), version)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pr2_serve.core.fingerprint import FileDigests, is_predictor, tensor_digest
from pr2_serve.core.fingerprint import fingerprints as combine_fingerprints
from pr2_serve.core.served_checkpoint import WeightTable, checkpoint_files
from trainer.algo.replay_mode import ReplayMode

__all__ = [
    "OnMismatch",
    "ServerMismatch",
    "Target",
    "agree",
    "differences",
    "fingerprints_differ",
    "serve_exactly",
    "starting_target",
    "tensors_target",
]

OnMismatch = Literal["push", "fail"]
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ServerMismatch(SystemExit):
    """A server does not serve the trainer's weights and the run was told not to fix it
    (``--on-mismatch fail``): ``pr2-train`` exits non-zero with this message."""


@dataclass
class Target:
    """Weights the servers must serve: their fingerprints, the tensors to push (loaded only
    when a push is needed) and a description for messages."""

    fingerprints: dict[str, str]
    tensors: Callable[[], dict[str, torch.Tensor]]
    what: str


def _predictor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    return WeightTable.from_checkpoint(model_dir).predictor_shapes()


def starting_target(model_dir: str | Path, replay: str) -> Target:
    """What a run starting from ``model_dir`` in mode ``replay`` expects every server to serve
    (see module docstring). Fingerprinted straight from the checkpoint files, one tensor at a
    time, as the server does."""
    table = WeightTable.from_checkpoint(model_dir)
    files = checkpoint_files(model_dir)
    if not ReplayMode(replay).serves_predictor:  # predictors the files do not hold count as zeros
        files = {n: f for n, f in files.items() if not is_predictor(n)}
    fps = FileDigests().fingerprints(files, table.predictor_shapes())

    def tensors() -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for path in sorted(set(files.values())):
            out.update({n: t for n, t in load_file(path).items() if n in files})
        for name in table.predictor_names():  # explicit zeros: replace any stale predictor
            if name not in out:
                spec = table.specs[name]
                out[name] = torch.zeros(spec.shape, dtype=_ST_DTYPES.get(spec.dtype))
        return out

    predictor = "its predictor" if ReplayMode(replay).serves_predictor else "a zero predictor"
    return Target(fps, tensors, f"the trainer's starting weights ({model_dir}, {predictor})")


def tensors_target(
    tensors: Mapping[str, torch.Tensor], model_dir: str | Path, what: str = "the trainer's weights"
) -> Target:
    """A target from in-memory tensors in checkpoint names (e.g. a checkpoint to resume from).
    Predictors it lacks are pushed (and counted) as zeros, so none is left over from before."""
    shapes = _predictor_shapes(model_dir)
    full = dict(tensors)
    for name, shape in shapes.items():
        full.setdefault(name, torch.zeros(shape))
    digests = {n: tensor_digest(n, t) for n, t in full.items()}
    return Target(combine_fingerprints(digests), lambda: full, what)


def differences(info: Mapping, fingerprints: Mapping[str, str]) -> list[str]:
    """What differs between a server's ``/v1/info`` and the expected fingerprints: ``[]``,
    ``["policy"]``, ``["predictor"]`` or both (a server that reports none differs in both)."""
    return [
        part
        for part in ("policy", "predictor")
        if info.get(f"{part}_fingerprint") != fingerprints[part]
    ]


def _describe(address: str, info: Mapping) -> str:
    return (
        f"{address} serves weight version {info.get('weight_version')} "
        f"({info.get('weight_source', 'source not reported')})"
    )


def fingerprints_differ(diff: Sequence[str]) -> str:
    """``"policy fingerprint differs"``, ``"policy and predictor fingerprints differ"``;
    ``"fingerprints agree"`` for none (the versions alone differ)."""
    if not diff:
        return "fingerprints agree"
    return " and ".join(diff) + (
        " fingerprints differ" if len(diff) > 1 else " fingerprint differs"
    )


def mismatch_message(address: str, info: Mapping, target: Target) -> str:
    """The ``--on-mismatch fail`` message: the server, its version and weight source, what
    differs, how to reset it."""
    diff = fingerprints_differ(differences(info, target.fingerprints))
    return (
        f"pr2-train: server {_describe(address, info)}, not {target.what}: the {diff}. "
        "Restart that server with `pr2-serve --fresh` (it then serves its "
        "model directory and forgets its state directory) or run with --on-mismatch push "
        "(the trainer pushes its weights as the next version)"
    )


def serve_exactly(clients: Sequence, addresses: Sequence[str], target: Target, version: int):
    """Push ``target``'s tensors to every client as ``version``, then check each one serves
    exactly them (fingerprints in ``/v1/info``); ``RuntimeError`` naming a server that does
    not."""
    tensors = target.tensors()
    for client in clients:
        client.push_weights(tensors, version)
    for address, client in zip(addresses, clients, strict=True):
        info = client.info()
        diff = differences(info, target.fingerprints)
        if info["weight_version"] != version or diff:
            raise RuntimeError(
                f"after pushing {target.what} as version {version}, server "
                f"{_describe(address, info)}; differs in: {', '.join(diff) or 'version'}"
            )


def agree(
    clients: Sequence,
    addresses: Sequence[str],
    target: Target,
    on_mismatch: OnMismatch = "push",
    log: Callable[[str], None] = print,
) -> int:
    """Make every server serve ``target`` at one version before training; return that version.

    All servers matching at one version: nothing to do. Otherwise ``push``: push ``target`` to
    every server as the next version (one log line); ``fail``: :class:`ServerMismatch`."""
    infos = [c.info() for c in clients]
    versions = {int(i["weight_version"]) for i in infos}
    pairs = list(zip(addresses, infos, strict=True))
    off = [(a, i) for a, i in pairs if differences(i, target.fingerprints)]
    if not off and len(versions) == 1:
        return versions.pop()
    if on_mismatch == "fail":
        if off:
            raise ServerMismatch(mismatch_message(*off[0], target))
        seen = ", ".join(_describe(a, i) for a, i in pairs)
        raise ServerMismatch(f"pr2-train: servers disagree on the weight version: {seen}")
    version = max(versions) + 1
    serve_exactly(clients, addresses, target, version)
    why = (
        "; ".join(
            f"{_describe(a, i)}, {fingerprints_differ(differences(i, target.fingerprints))}"
            for a, i in off
        )
        or f"versions differ ({sorted(versions)})"
    )
    log(f"pr2-train: pushed {target.what} to every server as version {version} ({why})")
    return version
