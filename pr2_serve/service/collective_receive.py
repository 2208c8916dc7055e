"""The server side of a collective weight transfer: its requests, the group, one transfer.

``POST /v1/weights/transfer/init`` (:class:`TransferInitRequest`) makes the engine's workers
join the trainer's gloo group (vLLM's ``init_weight_transfer_engine``, through
``collective_rpc``); ``POST /v1/weights/transfer/{version}`` (:class:`TransferRequest`) checks
the announced names, shapes and dtypes against the model *before* joining the broadcast, then
runs ``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` on the engine thread
inside a live update (:meth:`TransferControl.feed`): the workers check and load each bucket into
the model as it arrives and write it into the version's file in the weight store; the canary
runs after the last one and the service commits the version like a push. Any failure (a bad
bucket, a peer gone, a timeout) is undone, so the old version serves on unchanged, and a broken
transfer closes the group: the trainer inits again. The gRPC
methods ``TransferInit`` / ``TransferWeights`` build the same requests and call the same
:class:`TransferControl` (through the service), so both answer alike.

On CUDA vLLM's upstream ``nccl`` engine is the transport by design; this server registers and
uses ``gloo``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pr2_serve.core.served_checkpoint import WeightValidationError
from pr2_serve.service.errors import ApiError
from pr2_serve.service.weight_store import storage_error
from pr2_serve.transfer import BACKEND
from pr2_serve.transfer.protocol import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    GlooInitInfo,
    GlooUpdateInfo,
)

__all__ = ["TransferControl", "TransferInitRequest", "TransferRequest"]


class TransferInitRequest(BaseModel):
    """Join the trainer's transfer group."""

    model_config = ConfigDict(extra="forbid")
    backend: str = Field(BACKEND, description="'gloo' (the CPU build; 'nccl' on CUDA by design)")
    master_address: str = Field(
        min_length=1, max_length=253, description="the trainer's TCPStore host (trainer = rank 0)"
    )
    master_port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=2, description="trainer + every server's workers")
    rank_offset: int = Field(ge=1, description="this server's first rank in the group")
    bucket_bytes: int = Field(DEFAULT_BUCKET_BYTES, ge=1, description="packed bucket size")
    timeout_s: float = Field(
        DEFAULT_TIMEOUT_S, gt=0, le=3600, description="rendezvous/collective limit"
    )


class TransferRequest(BaseModel):
    """The tensors the trainer is about to broadcast, in order (vLLM's update info)."""

    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(min_length=1)
    dtypes: list[str] = Field(description="torch dtype names: 'bfloat16', 'float32', ...")
    shapes: list[list[int]]


class TransferControl:
    """The engine's transfer group and one transfer at a time (see module docstring)."""

    def __init__(self, engine, enabled: bool = False) -> None:
        self.engine = engine
        self.enabled = enabled  # pr2-serve --enable-weight-transfer
        self.info: GlooInitInfo | None = None

    def require_enabled(self) -> None:
        """403 unless the server was started to join transfer groups (it connects out to the
        address a request names, so it is opt-in, like --weights-dir for loads)."""
        if not self.enabled:
            raise ApiError(
                403,
                "forbidden",
                "collective weight transfer is disabled: start pr2-serve with "
                "--enable-weight-transfer (the server then joins the group at the trainer "
                "address the request names)",
            )

    def init(self, req: TransferInitRequest) -> dict:
        """Join the group (blocks until every rank has, or the timeout); the group's facts."""
        self.require_enabled()
        served = served_backend()
        if req.backend != served:
            raise ApiError(
                400,
                "invalid_argument",
                f"backend {req.backend!r} is not served here: this server takes {served!r} "
                "('gloo' on the CPU build, 'nccl' on CUDA)",
                "backend",
            )
        fields = req.model_dump(exclude={"backend"})
        try:
            info = GlooInitInfo(**fields)
        except ValueError as e:
            raise ApiError(400, "invalid_argument", str(e), "world_size") from None
        if served == "nccl":  # vLLM's NCCL init info, packed buckets of the trainer's size
            fields = nccl_worker_init(fields)
        self.close()
        try:
            workers = self.engine.call(
                lambda llm: llm.collective_rpc("init_weight_transfer_engine", args=(fields,))
            )
        except Exception as e:
            self.close()
            what = (
                f"joining the group of world_size {info.world_size} as rank {info.rank_offset}"
                f" (the trainer + every server's workers must all join within "
                f"{info.timeout_s:g} s)"
            )
            raise _failed(what, e) from e
        self.info = info
        return {"backend": served, "world_size": info.world_size, "workers": len(workers)}

    def check(self, req: TransferRequest) -> GlooUpdateInfo:
        """The update info of ``req`` once every tensor is one the model takes (400 naming it);
        409 without a group."""
        self.require_enabled()
        if self.info is None:
            raise ApiError(
                409,
                "failed_precondition",
                "no transfer group: POST /v1/weights/transfer/init first (a failed transfer "
                "closes the group)",
            )
        try:
            info = GlooUpdateInfo(names=req.names, dtype_names=req.dtypes, shapes=req.shapes)
            for name, shape, dtype in zip(info.names, info.shapes, info.dtypes(), strict=True):
                self.engine.check_tensor(name, shape, dtype)
        except (WeightValidationError, ValueError) as e:
            self.close()  # the trainer is broadcasting to nobody: its side fails and re-inits
            raise ApiError(400, "invalid_argument", str(e), "names") from None
        return info

    def feed(self, info: GlooUpdateInfo, part: Path, final: Path, reuse=lambda part: None):
        """The live update's ``(feed, confirm)`` (:meth:`RolloutEngine.apply_live`, on the
        engine thread): the workers receive the broadcast into the model, bucket by bucket, and
        into ``part`` (``reuse(part)`` first: a spare file put there to write over), complete
        when the receive ends, which ``confirm`` renames ``final``. A bucket that fails its
        check raises its :class:`WeightValidationError` once the broadcast is over, a full disk
        507; a broken transfer closes the group and raises 502. On any failure no file
        is left."""
        payload = {
            "names": info.names,
            "dtype_names": info.dtype_names,
            "shapes": info.shapes,
            "path": str(part),
        }

        def run(llm) -> None:
            try:
                reuse(part)
                llm.collective_rpc("start_weight_update")
                llm.collective_rpc("update_weights", args=(payload,))
            except WeightValidationError:
                part.unlink(missing_ok=True)
                raise
            except OSError as e:  # writing the file (the broadcast was received: group kept)
                part.unlink(missing_ok=True)
                raise storage_error(e) from e
            except Exception as e:
                part.unlink(missing_ok=True)
                self.info = None  # on the engine thread: leave the group here, not via call()
                with contextlib.suppress(Exception):
                    llm.collective_rpc("shutdown_weight_transfer_engine")
                raise _failed("receiving the tensors", e) from e

        def confirm(llm, ok: bool) -> None:
            try:
                llm.collective_rpc("finish_weight_update")  # the file's writes are done
                if ok:
                    part.replace(final)
            except OSError as e:
                raise storage_error(e) from e
            finally:
                if not ok or not final.exists():
                    part.unlink(missing_ok=True)

        return run, confirm

    def close(self) -> None:
        """Leave the group (idempotent; the engine thread runs it between steps)."""
        self.info = None
        if self.engine is not None and self.engine.healthy():
            self.engine.call(lambda llm: llm.collective_rpc("shutdown_weight_transfer_engine"))


def served_backend() -> str:
    """The transfer backend this server joins: ``gloo`` on the CPU build, ``nccl`` on CUDA
    (the workers' :mod:`pr2_serve.transfer.nccl_receiver`)."""
    import torch

    return "nccl" if torch.cuda.is_available() else BACKEND


def nccl_worker_init(fields: dict) -> dict:
    """The init request as vLLM's ``NCCLWeightTransferInitInfo`` (packed buckets)."""
    keys = ("master_address", "master_port", "rank_offset", "world_size")
    return {
        **{k: fields[k] for k in keys},
        "packed": True,
        "packed_buffer_size_bytes": fields["bucket_bytes"],
    }


def _failed(what: str, e: BaseException) -> ApiError:
    return ApiError(
        502,
        "transfer_failed",
        f"weight transfer failed while {what}: {type(e).__name__}: {e}"[:2000]
        + " (nothing was applied; the group is closed: init it again)",
    )
