"""HTTP client (httpx) of ``/v1/generate``, ``/v1/generate/stream``, ``/v1/info`` and
``PUT /v1/weights/{version}``, ``POST /v1/weights/rollback/{version}``."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pr2_serve.client.common import PROBE_TIMEOUT_S, GenerateResult, ServerError, push_result
from pr2_serve.client.payload import WeightsPayload, weights_payload
from pr2_serve.client.retry import push_attempts
from pr2_serve.core.body_checksum import HEADERS
from pr2_serve.core.route_protocol import EncodedRoutes, decode_routes
from pr2_serve.core.types import Rollout, StreamEvent

#: Idle pooled HTTP connections are dropped after this long, well before the server's
#: keep-alive timeout (75 s): reusing a connection the server is closing fails the request.
KEEPALIVE_EXPIRY_S = 30.0


class HttpClient:
    """Synchronous HTTP client; a request whose connection dropped before any response is
    re-sent once (a push only after ``/v1/info`` shows its version is not committed)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        self.api_key = api_key
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, limits=limits)
        # the connection dropped before any response: safe to re-send once
        self._retryable = (httpx.RemoteProtocolError, httpx.ConnectError)

    def info(self) -> dict:
        r = self._http.get("/v1/info")
        _raise_http(r)
        return r.json()

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (within :data:`PROBE_TIMEOUT_S`)."""
        try:
            return self._http.get("/readyz", timeout=PROBE_TIMEOUT_S).status_code == 200
        except Exception:
            return False

    def alive(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """Whether the server process answers at all (``/healthz``, any status, within
        ``timeout``): a busy server does, a hung one does not."""
        try:
            self._http.get("/healthz", timeout=timeout)
        except Exception:
            return False
        return True

    def generate(self, prompts, **sampling) -> GenerateResult:
        body = _request(prompts, **sampling)
        try:
            r = self._http.post("/v1/generate", json=body)
        except self._retryable:  # connection dropped before a response: safe to send again
            r = self._http.post("/v1/generate", json=body)
        _raise_http(r)
        body = r.json()
        return GenerateResult(body["weight_version"], [_rollout(s) for s in body["samples"]])

    def stream(self, prompts, **sampling) -> Iterator[StreamEvent]:
        body = _request(prompts, **sampling)
        with self._http.stream("POST", "/v1/generate/stream", json=body) as r:
            if r.status_code >= 400:
                r.read()
                _raise_http(r)
            for line in r.iter_lines():
                if not line:
                    continue
                obj = json.loads(line)
                if "error" in obj:
                    err = obj["error"]
                    raise ServerError("stream", err["message"], err.get("field"))
                if obj.get("end"):
                    return
                yield _event(obj)

    def push_weights(self, weights, version: int, checksum: str = "xxh128") -> dict:
        """Upload ``weights`` (safetensors bytes, a state dict or a file path) as ``version``
        (``checksum``: the body's, ``xxh128`` or ``sha256``)."""
        payload = weights_payload(weights, checksum)
        headers = _push_headers(payload, self.api_key)
        url = f"/v1/weights/{version}"

        def send() -> dict:
            r = self._http.put(url, content=payload.chunks(), headers=headers)
            _raise_http(r)
            return push_result(r.json())

        # no response: re-sent only if the server does not serve that version now
        attempt = push_attempts(send, lambda: self.info()["weight_version"], version)
        try:
            return attempt()
        except self._retryable:
            return attempt()

    def rollback(self, version: int) -> dict:
        """Serve kept ``version`` again (0: the model directory) as the next version number;
        the server's result (``weight_version``, ``rolled_back_to``, timings)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = self._http.post(f"/v1/weights/rollback/{version}", headers=headers)
        _raise_http(r)
        return r.json()

    def load_weights(self, path: str, version: int) -> dict:
        """Load a checkpoint from the server's filesystem (inside its ``--weights-dir``) as
        ``version``; the server's result as for a push."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = self._http.post(f"/v1/weights/load/{version}", json={"path": path}, headers=headers)
        _raise_http(r)
        return push_result(r.json())

    def transfer_init(self, init_info: dict) -> dict:
        """Make the server's workers join a weight-transfer group (``POST
        /v1/weights/transfer/init``, blocks until every rank has joined)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = self._http.post("/v1/weights/transfer/init", json=init_info, headers=headers)
        _raise_http(r)
        return r.json()

    def transfer_weights(self, update_info: dict, version: int) -> dict:
        """Receive ``version`` over the group (``{names, dtypes, shapes}``; the trainer
        broadcasts while this call is open); the server's result as for a push."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = self._http.post(f"/v1/weights/transfer/{version}", json=update_info, headers=headers)
        _raise_http(r)
        return push_result(r.json())

    def close(self) -> None:
        self._http.close()


def _request(prompts, **kw) -> dict:
    body = {"prompts": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]}
    body.update({k: v for k, v in kw.items() if v is not None})
    return body


def _push_headers(payload: WeightsPayload, api_key: str | None) -> dict[str, str]:
    """Headers of ``PUT /v1/weights/{version}`` for the safetensors ``payload``."""
    headers = {
        HEADERS[payload.algorithm]: payload.digest,
        "Content-Length": str(payload.size),
        "Content-Type": "application/octet-stream",
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _raise_http(resp) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
    except Exception:
        raise ServerError(resp.status_code, resp.text[:500]) from None
    raise ServerError(resp.status_code, err.get("message", ""), err.get("field"))


def _routes(obj: dict | None):
    return None if obj is None else decode_routes(EncodedRoutes.from_json(obj))


def _rollout(s: dict) -> Rollout:
    return Rollout(
        prompt_index=s["prompt_index"],
        sample_index=s["sample_index"],
        prompt_token_ids=s["prompt_token_ids"],
        output_token_ids=s["output_token_ids"],
        logprobs=s["logprobs"],
        routes=_routes(s.get("routes")),
        finish_reason=s["finish_reason"],
        weight_version=s["weight_version"],
    )


def _event(e: dict) -> StreamEvent:
    routes = e.get("routes")
    return StreamEvent(
        prompt_index=e["prompt_index"],
        sample_index=e["sample_index"],
        prompt_token_ids=e.get("prompt_token_ids"),
        token_ids=e["token_ids"],
        logprobs=e.get("logprobs"),
        routes=_routes(routes),
        routes_start=routes["start"] if routes else 0,
        finish_reason=e.get("finish_reason"),
        weight_version=e["weight_version"],
    )
