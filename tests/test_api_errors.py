"""The API's one error path (``pr2_serve.service.errors``): engine and schema errors as ApiError."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from pr2_serve.api.schemas import GenerateRequest
from pr2_serve.core.served_checkpoint import StaleVersionError, WeightValidationError, require_newer
from pr2_serve.core.types import EngineStepError, RequestRejected
from pr2_serve.service.errors import ENGINE_ERRORS, ApiError, from_engine, from_validation


@pytest.mark.parametrize(
    "exc, status, kind, field",
    [
        (EngineStepError("step failed"), 500, "engine_error", None),
        (
            StaleVersionError("weight version 2 must be greater than 3"),
            409,
            "failed_precondition",
            "version",
        ),
        (WeightValidationError("unknown tensor name 'x'"), 400, "invalid_argument", "weights"),
        (RequestRejected("vLLM says no"), 400, "invalid_argument", None),
        (ValueError("empty prompt"), 400, "invalid_argument", None),
    ],
)
def test_engine_errors(exc, status, kind, field):
    assert isinstance(exc, ENGINE_ERRORS)
    e = from_engine(exc)
    assert (e.status, e.kind, e.field, e.message) == (status, kind, field, str(exc))


def test_the_version_rule_is_a_409_on_version():
    with pytest.raises(StaleVersionError) as exc:
        require_newer(3, 3)
    e = from_engine(exc.value)
    assert (e.status, e.field) == (409, "version")
    assert e.message == "weight version 3 must be greater than 3"


def test_not_an_engine_error():
    with pytest.raises(TypeError):
        from_engine(RuntimeError("other"))


def test_to_json_names_the_field_only_when_there_is_one():
    assert ApiError(400, "invalid_argument", "bad", "n").to_json() == {
        "error": {"type": "invalid_argument", "message": "bad", "field": "n"}
    }
    assert ApiError(503, "unavailable", "loading").to_json() == {
        "error": {"type": "unavailable", "message": "loading"}
    }


def _errors(**body) -> list[dict]:
    with pytest.raises(ValidationError) as e:
        GenerateRequest(**body)
    return e.value.errors()


def test_schema_errors_name_the_field():
    e = from_validation(_errors(prompts=[[1]], stop_token_ids=[1, 2.5]))
    assert (e.status, e.kind, e.field) == (422, "invalid_argument", "stop_token_ids[1]")
    assert e.message.startswith("stop_token_ids[1]: ")
    e = from_validation(_errors(prompts=[[1]], n=0))
    assert e.field == "n"
    e = from_validation([{"type": "missing", "loc": ("body", "prompts"), "msg": "Field required"}])
    assert (e.field, e.message) == ("prompts", "prompts: Field required")
    e = from_validation(
        [{"type": "model_type", "loc": ("body",), "msg": "Input should be an object"}]
    )
    assert (e.field, e.message) == (None, "Input should be an object")


def test_malformed_json():
    e = from_validation([{"type": "json_invalid", "loc": ("body", 17), "msg": "JSON decode error"}])
    assert (e.status, e.kind, e.field) == (400, "malformed_json", None)
    assert e.message == "malformed JSON body at byte 17"


def test_importable_without_fastapi_grpc_or_torch():
    """The clients read FIELD_METADATA_KEY from here: nothing heavy comes with it."""
    code = (
        "import sys; from pr2_serve.service.errors import FIELD_METADATA_KEY; "
        "assert FIELD_METADATA_KEY == 'pr2-error-field'; "
        "print(sorted(m for m in ('fastapi', 'grpc', 'torch', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
