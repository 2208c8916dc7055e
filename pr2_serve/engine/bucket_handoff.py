"""Buckets handed from a receiver to the engine thread one at a time, and the live update's
``feed`` that applies them and ``confirm`` that waits for the receiver's verdict
(:mod:`pr2_serve.engine.live_apply`).

A weight upload is received on the server's event loop while the engine thread applies what has
arrived: the receiver :meth:`~BucketHandoff.put` s each complete bucket and waits until the
engine has taken it (so at most two buckets exist at once: the one being applied and the one
being received), then :data:`ALL_BUCKETS` once the last one is handed over, then :data:`END`
once the body is checked (its size and checksums) and its file complete, or, at any point, the
exception that ended it. The engine side loads each bucket into the live model
(:func:`handoff_feed`), finishes the update and runs the canary while the receiver checks, then
takes the verdict (:func:`handoff_confirm`); what the receiver reported is raised there and the
update is undone. If nothing comes for ``stall_s`` the engine gives up. Either side may
:meth:`~BucketHandoff.close` the handoff: the other is then released at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = [
    "ALL_BUCKETS",
    "END",
    "BucketHandoff",
    "UploadStalled",
    "handoff_confirm",
    "handoff_feed",
]

ALL_BUCKETS = object()
"""Every bucket of the upload has been handed over (its checks are still to come)."""
END = object()
"""The upload is complete and checked."""


class UploadStalled(RuntimeError):
    """Nothing arrived for the engine within its wait."""


class BucketHandoff:
    """One slot between a receiver and the engine thread (see module docstring)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._item: object = None
        self._full = False
        self._closed = False
        self._taken = 0  # items the engine has taken

    def put(self, item: object) -> bool:
        """Hand ``item`` over and wait until it is taken; False if the handoff is closed
        (the engine stopped taking: the receiver should drain and stop)."""
        with self._cv:
            if self._closed:
                return False
            self._item, self._full, ticket = item, True, self._taken + 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._taken >= ticket or self._closed)
            return self._taken >= ticket

    def get(self, timeout: float) -> object:
        """The next item; :class:`UploadStalled` after ``timeout`` seconds without one."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._full or self._closed, timeout):
                raise UploadStalled(f"no weights arrived for {timeout:g} s")
            if not self._full:
                raise UploadStalled("the upload was closed before it ended")
            item, self._item, self._full = self._item, None, False
            self._taken += 1
            self._cv.notify_all()
            return item

    def close(self) -> None:
        with self._cv:
            self._closed, self._item, self._full = True, None, False
            self._cv.notify_all()


def handoff_feed(handoff: BucketHandoff, stall_s: float) -> Callable:
    """A live update's ``feed``: apply each bucket ``[(name, tensor)]`` of ``handoff`` on the
    workers until :data:`ALL_BUCKETS`; raise an exception the receiver put, or
    :class:`UploadStalled`."""

    def feed(llm) -> None:
        try:
            while (item := _taken(handoff, stall_s)) is not ALL_BUCKETS:
                llm.collective_rpc(_apply_bucket, args=(item,))
                del item  # applied: let go before the next is taken (its buffer is reused)
        except BaseException:
            handoff.close()
            raise

    return feed


def handoff_confirm(handoff: BucketHandoff, stall_s: float) -> Callable:
    """A live update's ``confirm(llm, ok)``: with ``ok`` (the canary passed), wait for the
    receiver's :data:`END` (raise what it put instead); either way close the handoff."""

    def confirm(llm, ok: bool) -> None:
        try:
            if ok and (item := _taken(handoff, stall_s)) is not END:
                raise RuntimeError(f"the upload sent {item!r} after its last bucket")
        finally:
            handoff.close()

    return confirm


def _taken(handoff: BucketHandoff, stall_s: float) -> object:
    item = handoff.get(stall_s)
    if isinstance(item, BaseException):
        raise item
    return item


def _apply_bucket(worker, pairs: list) -> None:
    """(Inside the worker.) Check and load one bucket into the update in progress."""
    from pr2_serve.plugin.live_update import session_of

    session_of(worker.model_runner.get_model()).apply(pairs)
