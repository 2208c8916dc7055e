"""Where a weight update's time goes (``benchmarks/weights.py --profile``): one in-process engine
on the bench checkpoint (fp32), every tensor changed, each piece timed alone (medians of
``repeats``) inside the worker and on the engine thread.

Pieces: reading the update's file, the finite check, vLLM's in-place reload split into
``load_weights`` (with the layerwise copy into the live storage), ``finalize`` and the CPU MoE
prepack, the old whole reload, the live update (read + check + load per bucket + undo +
finish), an undo made of copies alone (as off the CPU; on the CPU the undo keeps the old
storage), zeroing the KV cache, the canary, the fingerprint digests, and
the machine's memcpy rate (the bound on any in-memory copy here).
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["profile_update"]


def _timed(out: dict, key: str, fn, *args):
    t0 = time.perf_counter()
    res = fn(*args)
    out.setdefault(key, []).append(time.perf_counter() - t0)
    return res


def in_worker(worker, files: dict, bucket_bytes: int) -> dict:
    """The worker-side pieces (``collective_rpc`` with this function)."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    from pr2_serve.core.served_checkpoint import check_finite
    from pr2_serve.core.tensor_files import iter_tensors
    from pr2_serve.plugin import live_update as live
    from pr2_serve.plugin.weights import quiet_reload_logs, redo_cpu_moe_prepack, reload_all_weights

    runner, out = worker.model_runner, {}
    model = runner.get_model()
    tensors = _timed(out, "read_file_s", lambda: list(iter_tensors(files)))
    _timed(out, "finite_check_s", check_finite, tensors)
    _timed(out, "old_whole_reload_s", reload_all_weights, runner, files)
    _timed(out, "layerwise_init_s", initialize_layerwise_reload, model)
    with quiet_reload_logs():
        _timed(out, "load_weights_and_copy_s", model.load_weights, iter(tensors))
    _timed(out, "layerwise_finalize_s", finalize_layerwise_reload, model, runner.model_config)
    _timed(out, "cpu_moe_prepack_s", redo_cpu_moe_prepack, model)
    undo = live.Undo(1 << 62, swapping=set())  # copies, as off the CPU
    _timed(out, "undo_copies_s", lambda: [undo.save(m) for m in model.children()])
    out["undo_MB"] = [undo.nbytes / 1e6]
    undo.saved = []  # free the copies
    _timed(out, "live_begin_s", live.live_begin, worker, 1 << 62)
    _timed(out, "live_apply_s", live.live_apply_files, worker, files, bucket_bytes)
    _timed(out, "live_finish_s", live.live_finish, worker, {})
    live.live_end(worker)
    _timed(out, "zero_kv_cache_s", worker.pr2_zero_kv_caches)
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in tensors[:40]])
    t0 = time.perf_counter()
    flat.clone()
    out["memcpy_MBps"] = [flat.numel() / (time.perf_counter() - t0) / 1e6]
    return out


def profile_update(model_dir, state_dict: dict, tmp, repeats: int, bucket_bytes: int) -> dict:
    """Medians of each piece over ``repeats`` updates (see module docstring)."""
    from safetensors.torch import save_file

    from pr2_serve.engine.rollout_engine import RolloutEngine
    from pr2_serve.service.canary import Canary

    pieces: dict[str, list] = {}
    with RolloutEngine(model_dir, dtype="float32", state_dir=tmp / "profile-state") as engine:
        for k in range(repeats):
            for t in state_dict.values():
                t.view(-1)[0] += 1e-3
            path = tmp / f"profile-{k}.safetensors"
            save_file(state_dict, str(path))
            files = dict.fromkeys(state_dict, str(path))
            got = engine.call(
                lambda llm, f=files: llm.collective_rpc(in_worker, args=(f, bucket_bytes))[0]
            )
            for key, v in got.items():
                pieces.setdefault(key, []).extend(v)
            _timed(pieces, "digests_s", engine.update_digests, files)
            canary = Canary(engine.info)
            version = engine.weight_version + 1
            fut = engine.apply_live(files, version, canary=canary, bucket_bytes=bucket_bytes)
            res = _timed(pieces, "engine_live_update_s", fut.result)
            pieces.setdefault("engine_live_apply_s", []).append(res.reload_seconds)
            pieces.setdefault("canary_s", []).append(canary.seconds)
            _timed(pieces, "old_engine_check_s", engine.prepare_update, str(path), version + 1)
            path.unlink()
    return {k: statistics.median(v) for k, v in pieces.items()}
