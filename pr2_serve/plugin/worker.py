"""Worker extension (``worker_extension_cls``): route bookkeeping and weight reloads in workers.

vLLM mixes this class into its worker class; the engine calls the ``pr2_*`` methods through
``collective_rpc``, which works the same with in-process and multi-process executors.

- :meth:`pr2_setup` wraps the model runner's ``execute_model`` so that after each step the rows
  captured by the PR2 routers are mapped to requests (:class:`RouteStore`). Requests opt in with
  ``SamplingParams.extra_args = {"pr2_route_key": key}``; each of the ``n`` samples is stored
  under the key the route protocol gives it (:mod:`pr2_serve.core.route_protocol`).
- :meth:`pr2_reload_weights` reloads all weights in place from safetensors files and proves the
  CPU build's MoE weight layout is rebuilt (vLLM 0.32 skips the CPU prepack on reloads).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from pr2_serve.core.route_protocol import child_index, route_dtype, store_key
from pr2_serve.engine.jobs import ROUTE_KEY
from pr2_serve.plugin.compat import PR2ConfigError
from pr2_serve.plugin.kv_dirty import DirtyBlocks
from pr2_serve.plugin.refusals import RUNNER_ENV
from pr2_serve.plugin.route_store import RouteStore
from pr2_serve.plugin.step_rows import StepRows

#: What route bookkeeping reads from vLLM's V1 model runner (the V2 runner has none of them).
RUNNER_ATTRIBUTES = ("input_batch", "requests", "positions", "query_start_loc", "execute_model")


def check_runner(runner) -> None:
    """Refuse a model runner whose step bookkeeping we do not read (vLLM's Model Runner V2)."""
    missing = [a for a in RUNNER_ATTRIBUTES if not hasattr(runner, a)]
    if missing:
        raise PR2ConfigError(
            f"PR2 route capture supports vLLM's V1 model runner; this worker runs "
            f"{type(runner).__module__}.{type(runner).__name__}, which has no "
            f"{', '.join(missing)}. Start the engine with {RUNNER_ENV}=0 "
            f"(RolloutEngine sets it unless it is already set)."
        )


def route_key_for(internal_request_id: str, key: str) -> str:
    """Store key of a worker request (see :mod:`pr2_serve.core.route_protocol`: ``key/child``)."""
    return store_key(key, child_index(internal_request_id))


class PR2WorkerExtension:
    """Methods added to vLLM's worker (see module docstring)."""

    def pr2_setup(self) -> dict[str, Any]:
        """Install route bookkeeping (idempotent); return the model's routing facts."""
        runner = self.model_runner
        check_runner(runner)
        model = runner.get_model()
        capture = getattr(model, "pr2_capture", None)
        if capture is None:
            raise RuntimeError("the served model is not a PR2 model (architecture override?)")
        info = {
            "num_moe_layers": model.pr2_num_moe_layers,
            "num_experts": model.pr2_num_experts,
            "top_k": model.pr2_top_k,
            "moe_layer_indices": list(model.pr2_moe_layer_indices),
            "route_dtype": route_dtype(model.pr2_num_experts).name,
        }
        if getattr(self, "_pr2_store", None) is not None:
            return info
        block_table = runner.input_batch.block_table[0]
        num_slots = runner.kv_cache_config.num_blocks * runner.cache_config.block_size
        self._pr2_store = RouteStore(
            num_slots,
            model.pr2_num_moe_layers,
            model.pr2_top_k,
            route_dtype(model.pr2_num_experts),
            block_size=block_table.block_size,
        )
        self._pr2_key_cache: dict[str, str | None] = {}  # vLLM request id -> store key
        self._pr2_rows = StepRows(len(capture.buffer), capture.buffer)
        # KV blocks written since the last zeroing (pr2_zero_kv_caches zeroes only those)
        # (one KV cache group; with several, num_blocks 0 makes it zero the whole cache)
        groups = len(runner.input_batch.block_table.block_tables)
        blocks = num_slots // block_table.block_size if groups == 1 else 0
        self._pr2_dirty = DirtyBlocks(blocks, block_table.block_size)
        stock_execute = runner.execute_model

        inject = os.environ.get("PR2_ENABLE_FAULT_INJECTION") == "1"

        def execute_model(scheduler_output, *args, **kwargs):
            if inject:
                _maybe_inject_fault(scheduler_output)
            # Finished requests leave runner.requests inside execute_model: resolve them first.
            finished = self._pr2_keys(scheduler_output.finished_req_ids)
            try:
                out = stock_execute(scheduler_output, *args, **kwargs)
            except BaseException:
                self._pr2_dirty.forget()  # it may have written KV slots: zero all next time
                raise
            n = scheduler_output.total_num_scheduled_tokens
            slots = runner.input_batch.block_table[0].slot_mapping.gpu[:n]
            self._pr2_dirty.note(slots.cpu().numpy())
            self._pr2_rows.flush(self._pr2_store)  # the previous step's rows (queued earlier)
            self._pr2_after_step(scheduler_output)
            if finished:
                self._pr2_store.on_finished(finished)
            return out

        runner.execute_model = execute_model
        _fix_cpu_seeded_chunked_prefill(runner)
        return info

    def _pr2_after_step(self, scheduler_output) -> None:
        """Queue the step's rows for the host (read at the next step or on demand)."""
        runner = self.model_runner
        n = scheduler_output.total_num_scheduled_tokens
        if not n:
            return
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        block_table = batch.block_table[0]
        cache = self._pr2_key_cache
        keys, block_rows = [], {}
        for j, rid in enumerate(batch.req_ids[:num_reqs]):
            if rid not in cache:  # new request: a prefix-cache hit reads its cached slots
                key = _request_key(runner.requests.get(rid))
                cache[rid] = None if key is None else route_key_for(rid, key)
                if cache[rid] is not None:
                    block_rows[j] = block_table.block_table.np[j].copy()
            keys.append(cache[rid])
        self._pr2_rows.record(
            runner.get_model().pr2_capture.buffer,
            runner.positions,
            block_table.slot_mapping.gpu,
            n,
            runner.query_start_loc.np[: num_reqs + 1],
            keys,
            block_rows,
        )

    def _pr2_keys(self, request_ids) -> list[str]:
        keys = []
        for rid in request_ids or ():
            self._pr2_key_cache.pop(rid, None)
            key = _request_key(self.model_runner.requests.get(rid))
            if key is not None:
                keys.append(route_key_for(rid, key))
        return keys

    def pr2_take_routes(self, keys: list[tuple[str, int]]) -> dict[str, tuple[bytes, tuple]]:
        """Pop finished requests' routes: ``{key: (raw bytes, shape)}`` for ``(key, rows)``."""
        self._pr2_rows.flush(self._pr2_store)
        out = {}
        for key, num_rows in keys:
            arr = self._pr2_store.take(key, num_rows)
            if arr is not None:
                out[key] = (arr.tobytes(), arr.shape)
        return out

    def pr2_stream_routes(
        self, parts: list[tuple[str, int, int, bool]]
    ) -> dict[str, tuple[bytes, tuple]]:
        """Rows ``start:end`` of running requests ``(key, start, end, done)``; a done request's
        rows are released."""
        out = {}
        store = self._pr2_store
        self._pr2_rows.flush(store)
        for key, start, end, done in parts:
            arr = store.take(key, end) if done else store.peek(key, 0, end)
            arr = None if arr is None else arr[start:]
            if arr is None or len(arr) != end - start:
                raise RuntimeError(f"routes for {key} rows {start}:{end} are not recorded")
            out[key] = (arr.tobytes(), arr.shape)
        return out

    def pr2_route_stats(self) -> dict[str, int]:
        """Counters: steps, rows, prefix-cache rows read back, recomputed (preempted) rows,
        requests tracked now."""
        self._pr2_rows.flush(self._pr2_store)
        return {**self._pr2_store.stats, "tracked": len(self._pr2_store)}

    def pr2_zero_kv_caches(self) -> None:
        """Zero every KV-cache tensor (after a reload: weights that made NaN/Inf leave them in
        KV slots, and attention reads stale slots of a reused block -- masked, but NaN x 0 is
        NaN -- so later requests would come out NaN): the blocks written since the last zeroing
        (:mod:`.kv_dirty`)."""
        dirty = getattr(self, "_pr2_dirty", None)
        if dirty is None:  # no step bookkeeping (plugin off): the whole cache
            dirty = DirtyBlocks(0, 0)
        dirty.zero(self.model_runner.kv_caches)

    def pr2_reload_weights(self, files: dict[str, str]) -> float:
        """Reload every weight in place from ``{hf_name: safetensors file}``; return seconds.

        Must get the full set of weights (the engine merges partial updates into it): a layer
        that is reloaded from a subset of its tensors would get uninitialised memory in the rest.
        """
        from pr2_serve.plugin.weights import reload_all_weights

        t0 = time.perf_counter()
        reload_all_weights(self.model_runner, files)
        # Routes recorded in KV slots belong to the old weights: prefix cache is flushed by the
        # engine; drop per-slot routes too so nothing stale can be read back.
        if getattr(self, "_pr2_store", None) is not None:
            self._pr2_rows.flush(self._pr2_store)
            self._pr2_store.slots[:] = 0
        return time.perf_counter() - t0


def _fix_cpu_seeded_chunked_prefill(runner) -> None:
    """vLLM 0.32 CPU bug: a seeded request whose prefill is chunked crashes the step.

    After sampling, vLLM rewinds the generator of every request whose sampled token is discarded
    (non-final prefill chunk) with ``gen.set_offset(gen.get_offset() - 4)`` -- a CUDA generator
    method; CPU generators raise "CPU Generator does not use offset". We take those requests'
    generators out of the batch while it samples (their throw-away token then comes from the
    default generator) and put them back untouched: the request's seeded stream is exactly what
    the rewind meant to preserve.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    stock_sample = runner.sample_tokens

    def sample_tokens(*args, **kwargs):
        batch = runner.input_batch
        discard = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
        held = {int(i): batch.generators.pop(int(i)) for i in discard if int(i) in batch.generators}
        try:
            return stock_sample(*args, **kwargs)
        finally:
            batch.generators.update(held)

    runner.sample_tokens = sample_tokens


def _maybe_inject_fault(scheduler_output) -> None:
    """Test-only (``PR2_ENABLE_FAULT_INJECTION=1``): a new request whose extra_args hold
    ``{"pr2_fault": "step"}`` makes this step fail before the model runs (the reliability suite's
    "engine error during generate")."""
    for req in scheduler_output.scheduled_new_reqs:
        params = req.sampling_params
        if params is not None and (params.extra_args or {}).get("pr2_fault") == "step":
            raise RuntimeError(f"injected fault in the step of request {req.req_id}")


def _request_key(req_state) -> str | None:
    if req_state is None or req_state.sampling_params is None:
        return None
    extra = req_state.sampling_params.extra_args
    return None if not extra else extra.get(ROUTE_KEY)
