"""Turn raw record bytes into a validated message, or into a rejection that says why.

Bad input is data: every failure is classified so that it can go to `dead-letter`
with a reason; nothing here raises for bad bytes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from schemas.messages import DeadLetter, DeadLetterError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record could not be decoded."""

    error_type: DeadLetterError
    reason: str


def _classify(exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False)
    parts = []
    error_type: DeadLetterError = "invalid_fields"
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
        if err["type"] == "unknown_event_type":
            error_type = "unknown_event_type"
        elif err["loc"] == ("ts",) and "plausible" in err["msg"]:
            error_type = "implausible_timestamp"
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return Rejection(error_type, "; ".join(parts))


def decode(raw: bytes | None, model: type[M]) -> M | Rejection:
    """Parse JSON bytes into `model`, or return a `Rejection` naming what is wrong."""
    if raw is None:
        return Rejection("invalid_fields", "empty (null) record value")
    try:
        # pydantic parses and validates in one pass (2-3x json.loads + model_validate: a
        # related-items list of 50 neighbours, the recommender's most frequent input); a record
        # it refuses takes the slower path below, which names what is wrong.
        return model.model_validate_json(raw)
    except ValidationError:
        pass
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejection("malformed_json", f"not valid UTF-8 JSON: {exc}")
    if not isinstance(data, dict):
        return Rejection("malformed_json", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return _classify(exc)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def key_text(key: bytes | None) -> str | None:
    """A record key as text: UTF-8 when it is, else base64."""
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii")


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
    """Build the dead-letter record for a rejected input."""
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key_text(key),
        raw_value_b64=_b64(raw),
        reason=rejection.reason,
        error_type=rejection.error_type,
        stage=stage,
        failed_at=datetime.now(UTC),
    )
