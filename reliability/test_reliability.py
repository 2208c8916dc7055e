"""``make reliability``: schema fuzzing, load during weight pushes, faults, security limits.

Real ``pr2-serve`` processes on loopback, real vLLM CPU build, tiny model; every loop bounded.
Figures are printed (run with ``-s``) and written to ``runs/reliability/figures.json``.
"""

from __future__ import annotations

import hashlib
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pr2_serve.client import GrpcClient, HttpClient, ServerError
from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.tiny.tiny_model import make_tiny_model
from tests.helpers import API_KEY, start_server

ROOT = Path(__file__).resolve().parents[1]
FIGURES: dict = {}
FILE_LIMIT = 6 << 20  # the server may not write files larger than this: "disk full" past it


def record(name: str, value) -> None:
    FIGURES[name] = value
    print(f"[reliability] {name}: {json.dumps(value)}", flush=True)
    out = ROOT / "runs" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(FIGURES, indent=1))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rel-model"), seed=0, predictor="random")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = start_server(
        model,
        tmp_path_factory.mktemp("rel-state"),
        "--max-samples-per-request",
        "32",
        "--max-tokens-per-request",
        "512",
        "--max-upload-bytes",
        str(64 << 20),
        "--max-model-len",
        "128",
        env={"PR2_ENABLE_FAULT_INJECTION": "1"},
        file_size_limit=FILE_LIMIT,
    )
    yield srv
    srv.stop()


def predictors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.mlp.predictor.weight": torch.randn(8, 64, generator=g) * 0.3
        for i in range(4)
    }


def leftovers(state: Path) -> list[str]:
    """Files in the weights dir no kept version refers to (partial or rejected uploads)."""
    from pr2_serve.service.weight_store import WeightStore

    live = WeightStore(state, 1).live_files()
    return sorted(p.name for p in (state / "weights").iterdir() if p.name not in live)


# -- schema fuzzing ------------------------------------------------------------------------------
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server):
    exe = Path(sys.executable).parent / "schemathesis"
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            str(exe),
            "run",
            f"{server.http}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "20",
            "--seed",
            "1",
            "--workers",
            "2",
            "--request-timeout",
            "60",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "--max-time",
            "150",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    tail = out.stdout[-3000:]
    record(
        "schemathesis",
        {
            "exit_code": out.returncode,
            "seconds": round(time.perf_counter() - t0, 1),
            "summary": [ln for ln in out.stdout.splitlines() if "passed" in ln or "failed" in ln][
                -3:
            ],
        },
    )
    assert out.returncode == 0, tail + out.stderr[-2000:]
    assert HttpClient(server.http).ready()


# -- load during pushes --------------------------------------------------------------------------
def test_load_32_clients_60s_with_a_push_every_10s(server, model):
    duration, clients = 60.0, 32
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(3, 40, size=64)]
    results, errors, latencies = [], [], []
    tokens = [0]
    stop = threading.Event()
    http = HttpClient(server.http, api_key=API_KEY)
    # the fuzzing may have rolled back (to the checkpoint: nothing else is pushed before this)
    v0 = http.rollback(0)["weight_version"]  # the checkpoint's weights, as version v0

    def client(i: int):
        c = HttpClient(server.http) if i % 2 else GrpcClient(server.grpc)
        r = np.random.default_rng(i)
        try:
            while not stop.is_set():
                p = prompts[int(r.integers(len(prompts)))]
                n = int(r.integers(1, 5))
                long = bool(r.integers(2))
                routes = bool(r.integers(2))
                t = time.perf_counter()
                try:
                    # greedy: temperature 0 for n = 1; top_k = 1 for n > 1 (vLLM samples a
                    # temperature-0 request once), so every sample is checkable below
                    res = c.generate(
                        [p],
                        n=n,
                        temperature=0.0 if n == 1 else 1.0,
                        top_k=-1 if n == 1 else 1,
                        max_tokens=24 if long else 4,
                        return_routes=routes,
                    )
                except Exception as e:  # every failure is counted
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t)
                for s in res.samples:
                    tokens[0] += len(s.output_token_ids)
                    assert (s.routes is not None) == routes
                    results.append((p, len(s.output_token_ids), s))
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    pushed = {}
    k = 0
    while time.perf_counter() - t0 < duration - 5:
        time.sleep(10.0)
        k += 1
        pushed[v0 + k] = predictors(1000 + k)
        http.push_weights(pushed[v0 + k], v0 + k)
    stop.set()
    for t in threads:
        t.join(180)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    record(
        "load",
        {
            "clients": clients,
            "seconds": round(wall, 1),
            "requests": len(lat),
            "errors": len(errors),
            "pushes": len(pushed),
            "p50_latency_s": round(statistics.median(lat), 3),
            "p99_latency_s": round(lat[int(0.99 * (len(lat) - 1))], 3),
            "tokens_per_s": round(tokens[0] / wall, 1),
        },
    )
    assert not errors, errors[:5]
    versions = sorted({s.weight_version for _, _, s in results})
    assert len(versions) >= 3, versions
    # every sample is what its reported version produces (greedy, regenerated per version;
    # v0 is the checkpoint's weights)
    with RolloutEngine(model, dtype="float32", max_model_len=128) as engine:
        for v in versions:
            if v in pushed:
                engine.update_weights(pushed[v], v)
            mine = [(p, m, s) for p, m, s in results if s.weight_version == v]
            uniq = {}
            for p, m, s in mine:
                uniq.setdefault((tuple(p), m), []).append(s.output_token_ids)
            keys = list(uniq)
            outs = [
                engine.generate([list(p)], Sampling(temperature=0.0, max_tokens=m))[0]
                for p, m in keys
            ]
            for key, want in zip(keys, outs, strict=True):
                for got in uniq[key]:
                    assert got == want.output_token_ids, (v, key)


# -- weights fuzzing ------------------------------------------------------------------------------
FUZZ_PUSHES = 24


def _fuzz_update(rng: np.random.Generator, base: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """A random small update of the model's own tensor names: ``(tensors, what)``; ``what``
    is ``finite``, ``non_finite`` (NaN/Inf planted), ``wrong_shape``, ``wrong_dtype`` or
    ``huge`` (finite, but overflows in the forward)."""
    names = sorted(n for n in base if "norm" in n or "gate.weight" in n)
    names += [f"model.layers.{i}.mlp.predictor.weight" for i in range(4)]
    picked = list(rng.choice(names, size=int(rng.integers(1, 4)), replace=False))
    what = str(rng.choice(["finite"] * 4 + ["non_finite"] * 3 + ["wrong_shape", "wrong_dtype"]))
    what = "huge" if what == "finite" and rng.random() < 0.2 else what
    out = {}
    for n in picked:
        t = base[n] if n in base else torch.zeros(8, 64)
        t = t + 0.05 * torch.from_numpy(rng.standard_normal(tuple(t.shape))).float()
        out[n] = t.to(torch.bfloat16) if rng.random() < 0.3 else t
    first = picked[0]
    if what == "non_finite":
        flat = out[first].reshape(-1).clone()
        k = int(rng.integers(1, 5))
        flat[rng.choice(flat.numel(), size=k, replace=False)] = float(
            rng.choice([np.nan, np.inf, -np.inf])
        )
        out[first] = flat.reshape(out[first].shape)
    elif what == "wrong_shape":
        out[first] = torch.zeros(3, 5)
    elif what == "wrong_dtype":
        out[first] = out[first].to(torch.int32)
    elif what == "huge":
        out = {"model.layers.0.post_attention_layernorm.weight": torch.full((64,), 1e30)}
    return out, what


def test_weight_push_fuzzing(server, model):
    """Random small pushes (some non-finite, wrong shape or dtype, stale, or breaking the
    forward) over both protocols: never a 5xx, every refusal typed and 4xx, non-finite ones
    always refused naming the tensor; the server stays ready and a rollback to the checkpoint
    gives its outputs back."""
    from safetensors.torch import load_file

    base = load_file(str(model / "model.safetensors"))
    rng = np.random.default_rng(7)
    http = HttpClient(server.http, api_key=API_KEY)
    rpc = GrpcClient(server.grpc, api_key=API_KEY)
    start = http.rollback(0)["weight_version"]
    ref = http.generate([[5, 6, 7], [9, 8]], max_tokens=6, temperature=0.0).samples
    outcomes: dict[str, int] = {}
    for i in range(FUZZ_PUSHES):
        tensors, what = _fuzz_update(rng, base)
        current = http.info()["weight_version"]
        stale = rng.random() < 0.1
        version = current if stale else current + 1
        client = http if i % 2 else rpc
        try:
            client.push_weights(tensors, version)
            outcome = "accepted"
            assert what == "finite" and not stale, (what, stale)
        except ServerError as e:
            outcome = f"{e.status}"
            assert e.status not in (500, 503, "INTERNAL", "UNKNOWN", "UNAVAILABLE"), e
            if what == "non_finite" and not stale:
                assert "values are not finite" in e.message and e.field == "weights", e
            if what == "huge" and not stale:
                assert e.status in (409, "FAILED_PRECONDITION") and "canary" in e.message
        key = f"{what}{' (stale)' if stale else ''} -> {outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
        assert http.ready(), f"not ready after push {i} ({what})"
        res = http.generate([[5, 6, 7]], max_tokens=4, temperature=0.0)
        assert all(np.isfinite(res.samples[0].logprobs))
    back = http.rollback(0)
    again = http.generate([[5, 6, 7], [9, 8]], max_tokens=6, temperature=0.0).samples
    for a, b in zip(again, ref, strict=True):
        assert a.output_token_ids == b.output_token_ids and a.logprobs == b.logprobs
    assert leftovers(server.state_dir) == []
    rpc.close()
    record(
        "weights_fuzzing",
        {"pushes": FUZZ_PUSHES, "from_version": start, "to_version": back["weight_version"]}
        | {"outcomes": outcomes},
    )


# -- faults ---------------------------------------------------------------------------------------
def _slow_upload_script(url: str, version: int, path: Path) -> str:
    host, port = url.removeprefix("http://").split(":")
    data = path.read_bytes()
    return (
        "import socket, time\n"
        f"s = socket.create_connection(({host!r}, {port}))\n"
        f"s.sendall(b'PUT /v1/weights/{version} HTTP/1.1\\r\\nHost: x\\r\\n"
        f"Authorization: Bearer {API_KEY}\\r\\nX-Content-SHA256: "
        f"{hashlib.sha256(data).hexdigest()}\\r\\nContent-Length: {len(data)}\\r\\n\\r\\n')\n"
        f"s.sendall(open({str(path)!r}, 'rb').read()[:{len(data) // 2}])\n"
        "print('half sent', flush=True)\n"
        "time.sleep(600)\n"
    )


def test_client_killed_mid_upload(server, tmp_path):
    http = HttpClient(server.http, api_key=API_KEY)
    before = http.info()["weight_version"]
    path = tmp_path / "w.safetensors"
    save_file(predictors(7), str(path))
    proc = subprocess.Popen(
        [sys.executable, "-c", _slow_upload_script(server.http, before + 1, path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "half sent"
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    assert http.info()["weight_version"] == before
    assert http.generate([[1, 2, 3]], max_tokens=2).samples
    assert leftovers(server.state_dir) == []
    record("fault_client_killed_mid_upload", {"version_kept": before, "leftover_files": 0})


def test_server_killed_during_upload_comes_back_on_committed_version(model, tmp_path):
    state = tmp_path / "state"
    srv = start_server(model, state)
    try:
        http = HttpClient(srv.http, api_key=API_KEY)
        http.push_weights(predictors(1), 1)
        committed = http.generate([[5, 6, 7]], max_tokens=6, temperature=0.0).samples[0]
        path = tmp_path / "w2.safetensors"
        save_file(predictors(2), str(path))
        up = subprocess.Popen(
            [sys.executable, "-c", _slow_upload_script(srv.http, 2, path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert up.stdout.readline().strip() == "half sent"
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        up.kill()
        partial = [p.name for p in (state / "weights").iterdir() if p.name.endswith(".part")]
    finally:
        srv.stop()
    again = start_server(model, state)
    try:
        http = HttpClient(again.http)
        assert http.info()["weight_version"] == 1
        after = http.generate([[5, 6, 7]], max_tokens=6, temperature=0.0).samples[0]
        assert after.output_token_ids == committed.output_token_ids
        assert leftovers(state) == []
    finally:
        again.stop()
    record(
        "fault_server_sigkill_during_upload",
        {"partial_files_at_kill": partial, "restarted_version": 1, "leftover_files": 0},
    )


def test_disk_full_during_upload(server, model, tmp_path):
    http = HttpClient(server.http, api_key=API_KEY)
    before = http.info()["weight_version"]
    from safetensors.torch import load_file

    big = load_file(str(model / "model.safetensors"))
    path = tmp_path / "big.safetensors"
    save_file(big, str(path))
    # the whole checkpoint again, padded past the file-size limit with a metadata blob
    data = path.read_bytes()
    assert len(data) < FILE_LIMIT  # the model itself fits; make the upload not fit
    save_file(big, str(path), metadata={"pad": "x" * (FILE_LIMIT - len(data) + (1 << 20))})
    with pytest.raises(ServerError) as e:
        http.push_weights(str(path), before + 1)
    assert e.value.status == 507, e.value
    assert http.info()["weight_version"] == before
    assert http.generate([[1, 2, 3]], max_tokens=2).samples
    assert leftovers(server.state_dir) == []
    record("fault_disk_full", {"status": e.value.status, "message": e.value.message})


def test_engine_error_during_generate_fails_cleanly(server):
    import httpx

    http = HttpClient(server.http)
    r = httpx.post(
        f"{server.http}/v1/generate",
        json={"prompts": [[1, 2, 3]], "max_tokens": 4},
        headers={"X-PR2-Fault": "step"},
        timeout=60,
    )
    assert r.status_code == 500 and r.json()["error"]["type"] == "engine_error", r.text
    assert httpx.get(f"{server.http}/readyz").status_code == 200
    assert len(http.generate([[1, 2, 3], [4, 5]], n=2, max_tokens=4).samples) == 4
    record("fault_engine_error", {"status": r.status_code, "ready_after": True})


# -- security --------------------------------------------------------------------------------------
def test_every_control_route_needs_the_token(server):
    import httpx

    spec = httpx.get(f"{server.http}/openapi.json").json()
    control = [
        (m.upper(), p)
        for p, ops in spec["paths"].items()
        for m in ops
        if m in ("put", "delete", "patch") or (m == "post" and p.startswith("/v1/weights/"))
    ]
    assert ("POST", "/v1/weights/rollback/{version}") in control
    for method, path in control:
        url = server.http + path.replace("{version}", "999")
        r = httpx.request(method, url, content=b"x", headers={"X-Content-SHA256": "0" * 64})
        assert r.status_code == 401, (method, path, r.status_code)
    record("security_control_routes", [f"{m} {p}" for m, p in control])


def test_size_limits_and_loopback_default():
    from pr2_serve.server.main import parse_args

    assert parse_args(["--model", "x"]).host == "127.0.0.1"
    record("security_defaults", {"bind": "127.0.0.1"})


def test_no_unpickling_anywhere():
    from tests.test_security import unpickling_sites

    assert unpickling_sites() == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
