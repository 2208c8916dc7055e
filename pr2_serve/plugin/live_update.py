"""Apply a weight update to the live model bucket by bucket, with an undo (inside the worker).

One update is one :class:`LiveUpdate` session, vLLM's layerwise reload lifecycle as its NCCL
receiver drives it: ``initialize_layerwise_reload`` (every layer's tensors kept aside, the layer
put on the meta device, its weight loaders deferred), then ``model.load_weights`` per bucket (a
layer whose tensors have all arrived is processed and put into its original tensors at once,
while the next bucket is on the wire; on the CPU each tensor is loaded as it arrives and the
processed data swapped in, not copied: :mod:`pr2_serve.plugin.swap_reload`), then the tensors
a partly updated unit still lacks (read from the files served now), ``finalize_layerwise_reload``
and the CPU MoE prepack of the layers it reloaded
(:func:`pr2_serve.plugin.weights.redo_cpu_moe_prepack`), one layer at a time, the undo letting go
of what each replaced right after it. Every bucket is checked before it is loaded: every value
finite, naming each bad tensor.

Undo: before a bucket touches a *unit* (the deepest model module whose name is a dotted prefix of
a tensor's checkpoint name: one layer's attention, its experts, the embedding...), the unit's
state is saved: each tensor's old values (up to ``undo_limit`` bytes: its old storage itself where
the new data is swapped in, else a copy of what the reload overwrites in place) and
its modules' other attributes (on the CPU build a linear layer's packed weights live in its
``cpu_linear`` closure, which a reload replaces; the saved closure keeps the old one). :meth:`abort`
puts the kept tensors back into the layers not yet processed and restores the saved units: the
model is bit for bit what it was. Past ``undo_limit`` nothing more is saved and ``abort`` returns
False: the caller reloads the files of the version served before (they are durable). Once the
update is committed, the old storage the undo kept is the next update's spare storage
(:mod:`pr2_serve.plugin.spare_storage`: its new tensors are made in it, no memory faulted in).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch

from pr2_serve.core.served_checkpoint import check_finite
from pr2_serve.plugin.spare_storage import SpareStorage
from pr2_serve.plugin.swap_reload import copies_in_place, install, process_partial
from pr2_serve.plugin.weights import quiet_live_logs, redo_cpu_moe_prepack
from pr2_serve.transfer.bucket_plan import grouped, pair_nbytes

__all__ = ["LiveUpdate", "unit_of"]

SKIPPED = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
FINISH_BUCKET_BYTES = 16 << 20  # the served tensors a touched unit lacks, loaded this many at once


def unit_of(name: str, modules: set[str]) -> str:
    """The deepest name in ``modules`` that is a dotted prefix of ``name`` ('' if none)."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in modules:
            return prefix
    return ""


def _kernel_tensors(module: torch.nn.Module) -> tuple[dict, dict]:
    """``(params, buffers)`` the module serves with: the ones the layerwise reload set aside
    while it runs, else the module's own."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    info = LAYERWISE_INFO.get(module)
    if info is not None and info.kernel_tensors is not None:
        params, buffers = info.kernel_tensors
        return dict(params), dict(buffers)
    return (
        {k: v for k, v in module._parameters.items() if v is not None},
        {k: v for k, v in module._buffers.items() if v is not None},
    )


class _Saved:
    """One module's state before the update (see module docstring)."""

    def __init__(self, module: torch.nn.Module, swapping: set[int]) -> None:
        self.module = module
        self.params, self.buffers = _kernel_tensors(module)
        self.attrs = {k: v for k, v in vars(module).items() if k not in SKIPPED}
        self.stand_ins: list[torch.Tensor] = []  # old values standing in for replaced tensors
        named = [*self.params.items(), *self.buffers.items()]
        # (tensor, its old values, whether those are a copy): a swapping layer's old data is
        # never written (its new data is swapped in), so keeping a reference to it is enough
        self.values = [
            (t, t.detach().clone(), True)
            if copies_in_place(module, n, swapping)
            else (t, t.detach(), False)
            for n, t in named
        ]

    @staticmethod
    def nbytes(module: torch.nn.Module) -> int:
        params, buffers = _kernel_tensors(module)
        return sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])

    def release_replaced(self) -> None:
        """Let go of the tensors processing replaced (the CPU MoE prepack registers new ones):
        their saved copy stands in for them, so the undo holds one copy of what it saves."""
        m, copies = self.module, {id(t): old for t, old, _ in self.values}
        for table, kept in ((m._parameters, self.params), (m._buffers, self.buffers)):
            for name, t in list(kept.items()):
                if table.get(name) is t or id(t) not in copies:
                    continue
                old = copies.pop(id(t))
                stand = torch.nn.Parameter(old, False) if isinstance(t, torch.nn.Parameter) else old
                vars(stand).update(vars(t))  # the loader and flags the old tensor carried
                kept[name] = stand
                self.stand_ins.append(stand)
        self.values = [v for v in self.values if id(v[0]) in copies]

    def restore(self) -> None:
        for t, old, copied in self.values:
            if copied and t.shape == old.shape and t.dtype == old.dtype:
                t.data.copy_(old)  # in place: the storage CUDA graphs captured
            else:  # the old data itself (swapped out, or replaced by processing)
                t.data = old
        m = self.module
        for table, kept in ((m._parameters, self.params), (m._buffers, self.buffers)):
            for name in [k for k, v in table.items() if v is not None and k not in kept]:
                del table[name]  # made while processing (e.g. a replaced parameter's twin)
            table.update(kept)
        vars(m).update(self.attrs)


class Undo:
    """The saved state of every unit an update touched, up to ``limit`` bytes of old values."""

    def __init__(self, limit: int, swapping: set[int]) -> None:
        self.limit, self.swapping = limit, swapping
        self.nbytes = 0
        self.complete = True
        self.saved: list[_Saved] = []
        self._seen: set[int] = set()

    def save(self, unit: torch.nn.Module) -> None:
        for module in unit.modules():
            if id(module) in self._seen:
                continue
            self._seen.add(id(module))
            size = _Saved.nbytes(module)
            if self.complete and self.nbytes + size > self.limit:
                self.complete, self.saved = False, []  # past the bound: the caller reloads
            if self.complete:
                self.nbytes += size
                self.saved.append(_Saved(module, self.swapping))

    def release_replaced(self, module: torch.nn.Module | None = None) -> None:
        """:meth:`_Saved.release_replaced` of ``module``'s saved state (default: every one)."""
        for saved in self.saved:
            if module is None or saved.module is module:
                saved.release_replaced()

    def restore(self) -> bool:
        for saved in reversed(self.saved):
            saved.restore()
        return self.complete

    def old_values(self) -> list[torch.Tensor]:
        """Every old value kept (once the update is committed, no longer the model's)."""
        return [
            old
            for saved in self.saved
            for old in [*(old for _, old, _ in saved.values), *saved.stand_ins]
        ]


class LiveUpdate:
    """One update of the live model (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_config,
        undo_limit: int,
        spare: SpareStorage | None = None,
    ) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self.model, self.model_config = model, model_config
        self.modules = dict(model.named_modules())
        self._module_names = set(self.modules)
        self.units: set[str] = set()
        self.loaded: set[str] = set()
        initialize_layerwise_reload(model)
        self.spare = spare or SpareStorage()
        self.swapping = install(model, self.spare)
        self.undo = Undo(undo_limit, self.swapping)

    def apply(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Check one bucket (every value finite) and load it into the model."""
        check_finite(pairs)
        self._save_units(name for name, _ in pairs)
        with quiet_live_logs():
            self.model.load_weights(pairs)
        self.loaded.update(name for name, _ in pairs)

    def _save_units(self, names: Iterable[str]) -> None:
        for name in names:
            unit = unit_of(name, self._module_names)
            if unit not in self.units:
                self.units.add(unit)
                self.undo.save(self.modules[unit] if unit else self.model)

    def missing(self, current: Mapping[str, str]) -> dict[str, str]:
        """``{name: file}`` of the served tensors the update did not bring whose unit it
        touched: a layer must get all of its tensors."""
        names = self._module_names
        return {
            n: f
            for n, f in current.items()
            if n not in self.loaded and unit_of(n, names) in self.units
        }

    def finish(self, rest: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load ``rest`` (the served tensors of the touched units the update lacked), finish the
        layerwise reload and redo the CPU MoE prepack. The undo lets go of what each layer's
        prepack replaced as soon as it is done (its copy stands in): the extra memory is the
        undo copy and one layer, never the model's pre-prepack tensors all at once."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with quiet_live_logs():
            for bucket in buckets_of(rest, FINISH_BUCKET_BYTES):
                self.model.load_weights(bucket)
            process_partial(self.model, self.swapping)
            finalize_layerwise_reload(self.model, self.model_config)
        roots = [self.modules[u] if u else self.model for u in self.units]
        redo_cpu_moe_prepack(self.model, roots, then=self.undo.release_replaced)
        self.undo.release_replaced()  # any other tensor processing replaced

    def abort(self) -> bool:
        """Put the model back as it was before the update; False if the undo passed its bound
        (the caller must reload the previous version's files)."""
        _abort_layerwise(self.model)
        return self.undo.restore()

    def commit(self) -> None:
        """The update stays: the old values the undo kept are the next update's spare storage
        (only they: what this update did not use goes, so the spare is at most one undo)."""
        self.spare.clear()
        self.spare.keep(self.undo.old_values())
        self.undo = Undo(0, self.swapping)


def _abort_layerwise(model: torch.nn.Module) -> None:
    """Stop a layerwise reload half-way: every layer not yet processed gets its own tensors
    back (they were never written), nothing is processed."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        LAYERWISE_INFO,
        LOADING_LAYERS,
        _place_kernel_tensors,
    )

    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            _place_kernel_tensors(layer, info)
            info.reset()
    LOADING_LAYERS.clear()


# -- the worker's side of an update (``collective_rpc`` with these functions: ``worker`` first) --
_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its LiveUpdate
_SPARES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its SpareStorage


def live_begin(worker, undo_limit: int) -> None:
    """Start an update session on this worker's model."""
    runner = worker.model_runner
    model = runner.get_model()
    spare = _SPARES.setdefault(model, SpareStorage())
    _SESSIONS[model] = LiveUpdate(model, runner.model_config, undo_limit, spare)


def live_session(model: torch.nn.Module | None) -> LiveUpdate | None:
    """The update in progress on ``model`` (a weight-transfer engine applies into it)."""
    return None if model is None else _SESSIONS.get(model)


def session_of(model: torch.nn.Module) -> LiveUpdate:
    session = live_session(model)
    if session is None:
        raise RuntimeError("no weight update in progress on this worker")
    return session


def live_apply_files(worker, files: dict[str, str], bucket_bytes: int) -> int:
    """Apply ``{name: file}`` in buckets of about ``bucket_bytes`` (the next bucket is read while
    one is applied); the bytes applied."""
    from pr2_serve.core.tensor_files import iter_tensors

    session, total = session_of(worker.model_runner.get_model()), 0
    for bucket in prefetched(buckets_of(iter_tensors(files), bucket_bytes)):
        session.apply(bucket)
        total += sum(t.numel() * t.element_size() for _, t in bucket)
    return total


def live_finish(worker, current: dict[str, str]) -> None:
    """Finish the update (``current``: ``{name: file}`` served now, for the tensors a touched
    unit still lacks); the routes kept per KV slot belong to the old weights and are dropped."""
    from pr2_serve.core.tensor_files import iter_tensors

    session = session_of(worker.model_runner.get_model())
    session.finish(iter_tensors(session.missing(current)))
    store = getattr(worker, "_pr2_store", None)
    if store is not None:
        worker._pr2_rows.flush(store)
        store.slots[:] = 0


def live_abort(worker) -> bool:
    """Undo the update in progress or finished (the canary failed); False if the undo passed
    its bound."""
    session = _SESSIONS.pop(worker.model_runner.get_model(), None)
    return True if session is None else session.abort()


def drop_spare(model: torch.nn.Module) -> None:
    """Give ``model``'s spare storage back: a whole reload makes every tensor anew (vLLM's
    reload), so kept it would only add to that reload's peak."""
    _SPARES.pop(model, None)


def live_end(worker) -> None:
    """The update is committed: its undo becomes the next update's spare storage."""
    session = _SESSIONS.pop(worker.model_runner.get_model(), None)
    if session is not None:
        session.commit()


def buckets_of(pairs: Iterable, bucket_bytes: int):
    """``(name, tensor)`` pairs in buckets (the rule: :mod:`pr2_serve.transfer.bucket_plan`)."""
    return grouped(pairs, pair_nbytes, bucket_bytes)


def prefetched(items: Iterable):
    """``items``, the next one produced on a thread while the consumer works on one (I/O
    overlaps with the consumer's work; at most two items exist at once: the consumer's and the
    next); the producer's error is raised where it happened in the sequence."""
    import contextlib
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=1)
    taken = threading.Semaphore(0)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                q.put((item, None))
                taken.acquire()  # the consumer holds it: make the next one
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))

    thread = threading.Thread(target=produce, name="pr2-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            taken.release()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        taken.release()
        while thread.is_alive():  # unblock a producer waiting to hand over an item
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)
                taken.release()
