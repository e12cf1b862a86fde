"""Turn raw record bytes into a validated message, or into a rejection that says why.

Bad input is data: every failure is classified so that it can go to `dead-letter` with a
reason; nothing here raises for any bytes. The work per record is bounded: a value over the
model's `MAX_RECORD_BYTES` is refused before it is parsed, and the bytes are parsed and
validated by pydantic in one pass (`model_validate_json`), whose parser refuses deep nesting
instead of recursing (no `json.loads`, whose recursion a few thousand nested arrays exhaust).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.messages import (
    DEAD_LETTER_KEY_BYTES,
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_RAW_PREFIX_BYTES,
    DEAD_LETTER_REASON_CHARS,
    DEFAULT_MAX_RECORD_BYTES,
    DeadLetter,
    DeadLetterError,
)

M = TypeVar("M", bound=BaseModel)

# A reason names at most this many failing fields, each location part cut to this length (an
# unexpected key of a hostile record can itself be kilobytes long).
REASON_FIELDS = 5
LOCATION_PART_CHARS = 80


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record could not be decoded."""

    error_type: DeadLetterError
    reason: str


# The JSON name of the type pydantic saw where an object was expected.
_JSON_TYPES = {
    "list": "array",
    "str": "string",
    "int": "number",
    "float": "number",
    "bool": "boolean",
    "NoneType": "null",
}


def _location(loc: tuple[int | str, ...]) -> str:
    parts = [
        str(p) if len(str(p)) <= LOCATION_PART_CHARS else f"{str(p)[:LOCATION_PART_CHARS]}…"
        for p in loc
    ]
    return ".".join(parts) or "<root>"


def _classify(exc: ValidationError) -> Rejection:
    """The rejection of a record pydantic refused, from the JSON parse or the validation."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0] if errors else None
    if first is not None and first["type"] == "json_invalid":
        message = first["msg"]
        if "recursion limit" in message:
            return Rejection("too_deep", f"nested too deeply to parse: {message}")
        return Rejection("malformed_json", f"not valid UTF-8 JSON: {message}")
    if first is not None and not first["loc"] and first["type"] in ("model_type", "dict_type"):
        got = exc.errors(include_url=False)[0].get("input")
        name = _JSON_TYPES.get(type(got).__name__, type(got).__name__)
        return Rejection("malformed_json", f"expected a JSON object, got {name}")
    parts = []
    error_type: DeadLetterError = "invalid_fields"
    for err in errors[:REASON_FIELDS]:
        parts.append(f"{_location(err['loc'])}: {err['msg']}")
        if err["type"] == "unknown_event_type":
            error_type = "unknown_event_type"
        elif err["loc"] == ("ts",) and "plausible" in err["msg"]:
            error_type = "implausible_timestamp"
    if len(errors) > REASON_FIELDS:
        parts.append(f"... and {len(errors) - REASON_FIELDS} more")
    return Rejection(error_type, "; ".join(parts))


def max_record_bytes(model: type[BaseModel]) -> int:
    """The largest record value `decode` parses for `model` (its `MAX_RECORD_BYTES`)."""
    limit = getattr(model, "MAX_RECORD_BYTES", DEFAULT_MAX_RECORD_BYTES)
    return limit if isinstance(limit, int) else DEFAULT_MAX_RECORD_BYTES


def decode(raw: bytes | None, model: type[M]) -> M | Rejection:
    """Parse JSON bytes into `model`, or return a `Rejection` naming what is wrong.

    Never raises: a value too large (`too_large`), nested too deeply (`too_deep`), not JSON,
    or not an object (`malformed_json`), or with invalid fields is a rejection; so is anything
    a validator of the model raised by mistake (`processing_error`).
    """
    if raw is None:
        return Rejection("invalid_fields", "empty (null) record value")
    limit = max_record_bytes(model)
    if len(raw) > limit:
        return Rejection(
            "too_large",
            f"record value of {len(raw)} bytes is over the limit of {limit} bytes "
            f"for {model.__name__}",
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        return _classify(exc)
    except RecursionError:  # pydantic's parser has its own limit; this is a second line
        return Rejection("too_deep", "nested too deeply to parse")
    except Exception as exc:  # a validator's bug must not take the stage down with the record
        return Rejection("processing_error", f"{type(exc).__name__} while validating: {exc}")


def key_text(key: bytes | None) -> str | None:
    """A record key as text: UTF-8 when it is, else base64."""
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii")


def _bounded_key(key: bytes | None) -> tuple[str | None, bool]:
    """A key as dead-letter text (UTF-8 or base64), at most DEAD_LETTER_KEY_BYTES of it."""
    if key is None:
        return None, False
    truncated = len(key) > DEAD_LETTER_KEY_BYTES
    prefix = key[:DEAD_LETTER_KEY_BYTES]
    try:
        # A cut through a multi-byte character leaves a partial one: drop it, keep the text.
        text = prefix.decode("utf-8", errors="ignore" if truncated else "strict")
    except UnicodeDecodeError:
        text = base64.b64encode(prefix).decode("ascii")
    return text, truncated


def _bounded_reason(reason: str) -> str:
    if len(reason) <= DEAD_LETTER_REASON_CHARS:
        return reason
    return f"{reason[: DEAD_LETTER_REASON_CHARS - 20]}… (reason truncated)"


def dead_letter(
    rejection: Rejection,
    *,
    raw: bytes | None,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
) -> DeadLetter:
    """Build the dead-letter record for a rejected input.

    The record keeps the value verbatim up to DEAD_LETTER_RAW_PREFIX_BYTES (a longer one: its
    prefix, `raw_truncated`), the value's size and SHA-256, a bounded key and reason, so its JSON
    stays under DEAD_LETTER_MAX_BYTES whatever the input was: a dead letter is never refused
    by the producer for its size.
    """
    key_value, key_truncated = _bounded_key(key)
    fields: dict[str, Any] = {
        "source_topic": topic[:512],
        "partition": max(-1, partition),
        "offset": max(-1, offset),
        "key": key_value,
        "key_truncated": key_truncated,
        "raw_value_b64": None,
        "reason": _bounded_reason(rejection.reason),
        "error_type": rejection.error_type,
        "stage": stage[:512],
        "failed_at": datetime.now(UTC),
    }
    if raw is not None:
        fields |= {
            "raw_value_b64": base64.b64encode(raw[:DEAD_LETTER_RAW_PREFIX_BYTES]).decode("ascii"),
            "raw_size": len(raw),
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
            "raw_truncated": len(raw) > DEAD_LETTER_RAW_PREFIX_BYTES,
        }
    record = DeadLetter(**fields)
    if len(record.model_dump_json()) > DEAD_LETTER_MAX_BYTES:  # only if the bounds above change
        record = record.model_copy(
            update={"raw_value_b64": "", "raw_truncated": raw is not None, "key": None}
        )
    return record
