"""The OpenAI error shape, ``{"error": {"message", "type", "param", "code"}}``, for the
OpenAI-compatible and SGLang-compatible routes: :func:`route_class` makes a router's refusals
(ours and the request schema's, as 400 like vLLM) take it, so the ``openai`` client raises
``BadRequestError`` whose ``.param`` names the field. Also the response descriptions these
routes share in the OpenAPI spec.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict

from pr2_serve.dialects.ecosystem import rename_field
from pr2_serve.service.errors import ApiError, from_validation
from pr2_serve.service.rollout_service import RolloutService

__all__ = ["RESPONSES", "STREAMING", "OpenAIBody", "error_body", "openai_error", "route_class"]

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    409: "ConflictError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(BaseModel):
    """Every refusal of these routes. Example: ``{"error": {"message": "temperature: Input
    should be less than or equal to 2", "type": "BadRequestError", "param": "temperature",
    "code": 400}}``"""

    model_config = ConfigDict(extra="allow")
    error: dict


class OpenAIBody(BaseModel):
    """A response body in vLLM's shape (see the route's description)."""

    model_config = ConfigDict(extra="allow")


# Before Open API 3.2 the ``schema`` of an event stream describes one event, as SSE parsers read
# it (``data`` lines joined, ``event`` defaulting to "message"); each ``data`` is one JSON chunk
# or ``[DONE]``.
SSE_EVENT = {
    "type": "object",
    "required": ["data", "event"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}
RESPONSES = {code: {"model": OpenAIError} for code in (400, 404, 409, 429, 500, 503)}
STREAMING = {**RESPONSES, 200: {"content": SSE}}


def error_body(e: ApiError, names: dict | None = None) -> dict:
    """An :class:`ApiError` in OpenAI's shape (its field renamed by ``names``)."""
    param = rename_field(e.field, names or {})
    kind = ERROR_TYPES.get(e.status) or HTTPStatus(e.status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": e.message, "type": kind, "param": param, "code": e.status}}


def openai_error(e: ApiError, names: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(e, names), status_code=e.status)


def route_class(service: RolloutService, names_by_path: dict[str, dict]) -> type[APIRoute]:
    """Routes whose refusals (ours, and the schema's: 400 like vLLM) are OpenAI-shaped, the
    field renamed by ``names_by_path[route path]`` (SGLang's routes answer in the same shape)."""
    errors = service.metrics.errors

    class OpenAIRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            names = names_by_path.get(self.path, {})

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as e:
                    err = from_validation(e.errors())
                    err = ApiError(400, err.kind, err.message, err.field)
                except ApiError as e:
                    err = e
                errors.labels(kind=err.kind).inc()
                return openai_error(err, names)

            return handle

    return OpenAIRoute
