"""Clients of the rollout server, HTTP and gRPC, with one surface. Routes come back as numpy.

    c = HttpClient("http://127.0.0.1:8000", api_key="...")      # or GrpcClient("127.0.0.1:50051")
    res = c.generate([[1, 2, 3]], n=2, max_tokens=16, seed=0)   # GenerateResult
    res.weight_version, res.samples[0].routes.shape              # Rollout objects, as the engine
    c.push_weights(model.state_dict() | safetensors_bytes | "update.safetensors", version=4)
    for ev in c.stream([[1, 2, 3]], max_tokens=16): ...          # StreamEvent objects

Both are synchronous and thread-safe (the trainer and the load tests call one client from many
threads). Nothing received is unpickled: JSON, protobuf and raw little-endian arrays only.
"""

from pr2_serve.client.common import GenerateResult, ServerError
from pr2_serve.client.grpc_client import GrpcClient
from pr2_serve.client.http_client import KEEPALIVE_EXPIRY_S, HttpClient

__all__ = ["KEEPALIVE_EXPIRY_S", "GenerateResult", "GrpcClient", "HttpClient", "ServerError"]
