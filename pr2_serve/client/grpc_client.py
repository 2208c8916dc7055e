"""gRPC client of ``pr2.rollout.v1.Rollout`` (code generated from ``protos/`` by the build)."""

from __future__ import annotations

from collections.abc import Iterator

from pr2_serve.api.chunk_codec import encode_upload
from pr2_serve.client.common import PROBE_TIMEOUT_S, GenerateResult, ServerError
from pr2_serve.client.payload import WeightsPayload, weights_payload
from pr2_serve.core.route_protocol import EncodedRoutes, decode_routes
from pr2_serve.core.types import Rollout, StreamEvent

GRPC_CHUNK = 2 << 20
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


class GrpcClient:
    """Synchronous gRPC client (same methods as :class:`HttpClient`)."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = 600.0):
        import grpc

        from pr2_serve.api.proto import load

        self._pb2, pb2_grpc = load()
        self._grpc = grpc
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb2_grpc.RolloutStub(self._channel)
        service = self._pb2.DESCRIPTOR.services_by_name["Rollout"].full_name
        self._upload = self._channel.stream_unary(  # chunks encoded without protobuf's copies
            f"/{service}/UpdateWeights",
            request_serializer=encode_upload,
            response_deserializer=self._pb2.UpdateWeightsResponse.FromString,
        )
        self.api_key, self.timeout = api_key, timeout

    def info(self) -> dict:
        try:
            m = self._stub.GetInfo(self._pb2.GetInfoRequest(), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return _info(m)

    def ready(self) -> bool:
        """Whether the server serves: its ``grpc.health.v1`` status is SERVING (loaded, the
        committed weights restored, the canary passed) -- what ``/readyz`` says over HTTP."""
        from grpc_health.v1 import health_pb2

        res = self._health(PROBE_TIMEOUT_S)
        return res is not None and res.status == health_pb2.HealthCheckResponse.SERVING

    def alive(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """Whether the server process answers at all (a health check, any status, within
        ``timeout``): a busy server does, a hung one does not."""
        return self._health(timeout) is not None

    def _health(self, timeout: float):
        """The ``grpc.health.v1`` answer, or None when none came within ``timeout``."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        request = health_pb2.HealthCheckRequest(service="")
        try:
            return health_pb2_grpc.HealthStub(self._channel).Check(request, timeout=timeout)
        except self._grpc.RpcError:
            return None

    def generate(self, prompts, **sampling) -> GenerateResult:
        samples, version = [], 0
        for m in self._responses(prompts, sampling, stream=False):
            if m.end:
                version = m.weight_version
                break
            samples.append(_rollout(m))
        if samples:
            version = samples[0].weight_version
        return GenerateResult(version, samples)

    def stream(self, prompts, **sampling) -> Iterator[StreamEvent]:
        for m in self._responses(prompts, sampling, stream=True):
            if m.end:
                return
            yield _event(m)

    def _responses(self, prompts, sampling: dict, stream: bool):
        request = _request(self._pb2, prompts, stream=stream, **sampling)
        try:
            yield from self._stub.Generate(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None

    def push_weights(self, weights, version: int, checksum: str = "xxh128") -> dict:
        """Upload ``weights`` (safetensors bytes, a state dict or a file path) as ``version``
        (``checksum``: the body's, ``xxh128`` or ``sha256``)."""
        payload = weights_payload(weights, checksum)
        meta = [("authorization", f"Bearer {self.api_key}")] if self.api_key else []
        try:
            res = self._upload(
                _upload_messages(self._pb2, payload, version), metadata=meta, timeout=self.timeout
            )
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return _weights_result(res)

    def rollback(self, version: int) -> dict:
        """Serve kept ``version`` again (0: the model directory) as the next version number."""
        meta = [("authorization", f"Bearer {self.api_key}")] if self.api_key else []
        request = self._pb2.RollbackWeightsRequest(version=version)
        try:
            res = self._stub.RollbackWeights(request, metadata=meta, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return _weights_result(res)

    def load_weights(self, path: str, version: int) -> dict:
        """Load a checkpoint from the server's filesystem (inside its ``--weights-dir``)."""
        meta = [("authorization", f"Bearer {self.api_key}")] if self.api_key else []
        request = self._pb2.LoadWeightsRequest(version=version, path=path)
        try:
            res = self._stub.LoadWeights(request, metadata=meta, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return _weights_result(res)

    def transfer_init(self, init_info: dict) -> dict:
        """Make the server's workers join a weight-transfer group (``TransferInit``, the
        ``POST /v1/weights/transfer/init`` body; blocks until every rank has joined)."""
        request = self._pb2.TransferInitRequest(**init_info)
        try:
            res = self._stub.TransferInit(request, metadata=self._auth(), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return {"backend": res.backend, "world_size": res.world_size, "workers": res.workers}

    def transfer_weights(self, update_info: dict, version: int) -> dict:
        """Receive ``version`` over the group (``{names, dtypes, shapes}``; the trainer
        broadcasts while this call is open); the server's result as for a push."""
        request = self._pb2.TransferWeightsRequest(
            version=version,
            names=update_info["names"],
            dtypes=update_info["dtypes"],
            shapes=[self._pb2.TensorShape(dims=s) for s in update_info["shapes"]],
        )
        try:
            res = self._stub.TransferWeights(request, metadata=self._auth(), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise _grpc_error(e) from None
        return _weights_result(res)

    def _auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def close(self) -> None:
        self._channel.close()


def _request(
    pb2,
    prompts,
    n=None,
    temperature=None,
    top_p=None,
    top_k=None,
    max_tokens=None,
    seed=None,
    stop_token_ids=(),
    return_logprobs=True,
    return_routes=True,
    routes_from=0,
    min_weight_version=0,
    stream=False,
):
    msg = pb2.GenerateRequest(
        n=n or 0,
        top_p=top_p or 0.0,
        top_k=top_k or 0,
        max_tokens=max_tokens or 0,
        stop_token_ids=list(stop_token_ids or ()),
        skip_logprobs=not return_logprobs,
        skip_routes=not return_routes,
        routes_from=routes_from,
        min_weight_version=min_weight_version,
        stream=stream,
    )
    if temperature is not None:
        msg.temperature, msg.has_temperature = temperature, True
    if seed is not None:
        msg.seed = seed
    for p in prompts:
        if isinstance(p, str):
            msg.prompts.add(text=p)
        else:
            msg.prompts.add().token_ids.ids.extend(int(t) for t in p)
    return msg


def _routes(r):
    if not r.dtype:
        return None
    return decode_routes(EncodedRoutes(r.dtype, tuple(r.shape), r.data))


def _rollout(m) -> Rollout:
    return Rollout(
        prompt_index=m.prompt_index,
        sample_index=m.sample_index,
        prompt_token_ids=list(m.prompt_token_ids),
        output_token_ids=list(m.output_token_ids),
        logprobs=list(m.logprobs),
        routes=_routes(m.routes),
        finish_reason=m.finish_reason,
        weight_version=m.weight_version,
    )


def _event(m) -> StreamEvent:
    return StreamEvent(
        prompt_index=m.prompt_index,
        sample_index=m.sample_index,
        prompt_token_ids=list(m.prompt_token_ids) or None,
        token_ids=list(m.output_token_ids),
        logprobs=list(m.logprobs),
        routes=_routes(m.routes),
        routes_start=m.routes.start,
        finish_reason=m.finish_reason or None,
        weight_version=m.weight_version,
    )


def _grpc_error(e) -> ServerError:
    """The server's refusal; the field at fault travels in trailing metadata."""
    from pr2_serve.service.errors import FIELD_METADATA_KEY

    trailing = dict(e.trailing_metadata() or ())
    return ServerError(e.code().name, e.details(), trailing.get(FIELD_METADATA_KEY))


def _weights_result(res) -> dict:
    """An ``UpdateWeightsResponse`` as a dict: every field the server set (the time split:
    receive, check, apply, canary; ``rolled_back_to`` after a rollback)."""
    out = {f.name: getattr(res, f.name) for f in res.DESCRIPTOR.fields}
    if not res.HasField("rolled_back_to"):
        out.pop("rolled_back_to")
    return out


def _upload_messages(pb2, payload: WeightsPayload, version: int) -> Iterator:
    """The header message, then each chunk's bytes (encoded by :func:`encode_upload`)."""
    yield pb2.UpdateWeightsRequest(
        header=pb2.UpdateWeightsHeader(
            version=version, total_size=payload.size, **{payload.algorithm: payload.digest}
        )
    )
    yield from payload.chunks(GRPC_CHUNK)


def _info(m) -> dict:
    """``GetInfo``'s message as the dict ``HttpClient.info`` returns (``/v1/info``'s JSON):
    plain Python values, a repeated field as a list."""
    return {
        f.name: list(getattr(m, f.name)) if _repeated(f) else getattr(m, f.name)
        for f in m.DESCRIPTOR.fields
    }


def _repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` is deprecated there
    return rep if rep is not None else field.label == field.LABEL_REPEATED
