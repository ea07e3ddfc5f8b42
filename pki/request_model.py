"""What every v1/ssl request model (pki/requests.py) is built from, and how a body becomes one.

`RequestModel` is the base (frozen, unknown fields ignored, values never echoed in errors); the field types
carry their validation and their JSON schema (pki/schemas.py) together, so the API document says what is
accepted; a model validator that breaks a cross-field rule raises `FieldError`; `parse` turns the first
problem into a 400 `RequestError` naming its field.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from . import schemas
from .request_errors import BAD_REQUEST, RequestError
from .request_values import MAX_DAYS_WITHOUT_CA, MAX_PASSPHRASE, MAX_TOKEN, normalise_name, parse_positive_int


def _max_days(info: ValidationInfo) -> int:
    return int((info.context or {}).get("max_days", MAX_DAYS_WITHOUT_CA))


def days_within_ca_life(value: object, info: ValidationInfo) -> int:
    """`days`: at most the CA's remaining life (`parse(..., max_days=)`)."""
    return parse_positive_int(value, _max_days(info), " days (the CA's remaining life)")


Name = Annotated[str, WithJsonSchema(schemas.NAME)]
# `days` of sign and create: at most the CA's remaining life (`parse(..., max_days=)`), checked before anything else.
Days = Annotated[
    int,
    BeforeValidator(days_within_ca_life),
    WithJsonSchema(
        schemas.days(
            MAX_DAYS_WITHOUT_CA, "Validity in days, a number or a numeric string; at most the CA's remaining life."
        )
    ),
]
PASSPHRASE_SCHEMA = schemas.secret(MAX_PASSPHRASE, "The CA passphrase.")
TOKEN_SCHEMA = schemas.secret(
    MAX_TOKEN, "Single-use enrolment token from POST /v1/ssl/tokens, instead of pass (only together with csr)."
)
Passphrase = Annotated[StrictStr, Field(min_length=1, max_length=MAX_PASSPHRASE), WithJsonSchema(PASSPHRASE_SCHEMA)]
Token = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TOKEN), WithJsonSchema(TOKEN_SCHEMA)]


def no_default(schema: dict[str, Any]) -> None:
    """An optional field whose schema does not allow null says nothing of a default (absent means absent)."""
    schema.pop("default", None)


def not_null(value: object) -> object:
    """`pass` and `token` are absent or strings: an explicit null is refused, so the document can say which
    credential a body carries."""
    if value is None:
        raise ValueError("must be a string")
    return value


class RequestModel(BaseModel):
    # Unknown fields are ignored (clients may add their own); values are never echoed in errors.
    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True, hide_input_in_errors=True)

    operation: ClassVar[str] = ""

    @field_validator("name", mode="before", check_fields=False)
    @classmethod
    def _name(cls, value: object) -> str:
        return normalise_name(value)


class FieldError(ValueError):
    """A cross-field rule broken; carries the field to blame (model validators have no field location)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def exactly_one(fields: dict[str, object], missing: str, both: str) -> None:
    """The rule "one of these fields, not several": none given blames the first field, several the last."""
    given = [field for field, value in fields.items() if value is not None]
    if not given:
        raise FieldError(next(iter(fields)), missing)
    if len(given) > 1:
        raise FieldError(given[-1], both)


M = TypeVar("M", bound=RequestModel)

_TYPE_MESSAGES = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
}


def parse(model: type[M], body: object, *, max_days: int | None = None) -> M:
    """Validate a decoded JSON body; the first problem becomes a 400 RequestError naming its field."""
    if not isinstance(body, dict):
        raise RequestError(BAD_REQUEST, "the body must be a JSON object")
    context = {"max_days": max_days} if max_days is not None else {}
    try:
        return model.model_validate(body, context=context)
    except ValidationError as ex:
        error = ex.errors(include_url=False, include_input=False, include_context=True)[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            raise RequestError(BAD_REQUEST, cause.message, cause.field) from None
        field = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "value_error" and cause is not None:
            detail = str(cause)
        else:
            detail = _TYPE_MESSAGES.get(error["type"], "is not valid")
        raise RequestError(BAD_REQUEST, f"{field} {detail}" if field else detail, field) from None
