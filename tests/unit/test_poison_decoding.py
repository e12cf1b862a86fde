"""Hostile input: `decode` returns a message or a `Rejection` for any bytes and every model,
classifies size, depth and strict-field failures, and a dead letter stays bounded."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.decoding import Rejection, dead_letter, decode, max_record_bytes
from schemas.messages import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_RAW_PREFIX_BYTES,
    BehaviorEvent,
    CatalogItem,
    DeadLetter,
    UserProfile,
)
from schemas.topics import ALL_TOPICS

MODELS: list[type[BaseModel]] = [spec.model for spec in ALL_TOPICS] + [UserProfile]

GOOD_EVENT: dict[str, Any] = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i1",
    "event_type": "purchase",
    "ts": "2011-12-09T12:50:00Z",
}
GOOD_ITEM: dict[str, Any] = {"item_id": "i1", "title": "A mug", "price": 3.5}
# Well past pydantic's parser limit and Python's default recursion limit.
DEEP = 5000


def _assert_decoded(raw: bytes, model: type[BaseModel]) -> None:
    result = decode(raw, model)
    assert isinstance(result, model | Rejection), type(result)
    if isinstance(result, Rejection):
        assert result.reason


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def nested_in(base: dict[str, Any], field: str, inner: bytes) -> bytes:
    """A valid-looking record whose `field` holds `inner` verbatim."""
    head = json.dumps({**base, field: None}).encode()
    return head.replace(f'"{field}": null'.encode(), f'"{field}": '.encode() + inner)


# -- fuzzing ----------------------------------------------------------------------------------

# json.dumps writes NaN and Infinity as the non-standard literals a hostile producer sends.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**30, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
field_names = st.sampled_from(
    sorted(set(GOOD_EVENT) | set(GOOD_ITEM) | {"quantity", "available", "categories", "x"})
)


hostile_fragments = st.sampled_from(
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e999999",
        b"-" + b"9" * 5000,
        b'"\\ud800"',
        b'"\\udfff\\ud800"',
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8: not valid UTF-8
        b'"\xff\xfe"',
        b'"\x00\x01\x1b[31m"',
        b'"\\u0000\\u001b"',
        b'"' + b"x" * 70_000 + b'"',
        deep_array(DEEP),
        deep_object(DEEP),
        b"[" * DEEP,
        b'{"a":' * DEEP,
        b"true",
        b"1700000000",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from(MODELS))
def test_fuzz_decode_random_bytes(raw: bytes, model: type[BaseModel]) -> None:
    _assert_decoded(raw, model)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values, max_size=8), st.sampled_from(MODELS))
def test_fuzz_decode_random_json(data: dict[str, Any], model: type[BaseModel]) -> None:
    _assert_decoded(json.dumps(data).encode(), model)
    _assert_decoded(json.dumps(list(data.values())).encode(), model)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([GOOD_EVENT, GOOD_ITEM]),
    field_names,
    hostile_fragments,
    st.sampled_from(MODELS),
)
def test_fuzz_decode_hostile_shapes(
    base: dict[str, Any], field: str, fragment: bytes, model: type[BaseModel]
) -> None:
    _assert_decoded(nested_in(base, field, fragment), model)
    _assert_decoded(fragment, model)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MODELS), field_names, st.text(min_size=1, max_size=3))
def test_fuzz_decode_duplicate_keys_and_surrogates(
    model: type[BaseModel], field: str, extra: str
) -> None:
    # Duplicate keys: the last wins (as in most parsers); either way a message or a rejection.
    raw = json.dumps(GOOD_EVENT).encode()[:-1] + f', "{field}": {json.dumps(extra)}}}'.encode()
    _assert_decoded(raw, model)
    _assert_decoded(raw.replace(b"u1", "u\ud800".encode("utf-8", "surrogatepass")), model)


# -- size and depth ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_hostile_nesting_is_rejected_as_too_deep(model: type[BaseModel]) -> None:
    for raw in (
        deep_array(DEEP),
        deep_object(DEEP),
        nested_in(GOOD_EVENT, "user_id", deep_array(DEEP)),
    ):
        result = decode(raw, model)
        assert isinstance(result, Rejection)
        assert result.error_type == "too_deep", result


@pytest.mark.parametrize("model", [BehaviorEvent, CatalogItem])
def test_hostile_large_record_is_rejected_before_parsing(model: type[BaseModel]) -> None:
    raw = nested_in(GOOD_ITEM, "description", json.dumps("x" * 990_000).encode())
    result = decode(raw, model)
    assert isinstance(result, Rejection)
    assert result.error_type == "too_large"
    assert str(max_record_bytes(model)) in result.reason


def test_hostile_limits_leave_room_for_valid_records() -> None:
    longest_item = CatalogItem(
        item_id="\u00e9" * 256,
        title="\u2028" * 2_000,
        categories=['"' * 500] * 50,
        brand="\\" * 500,
        description="\u0080" * 20_000,
        price=1e300,
    )
    raw = longest_item.model_dump_json().encode()
    assert len(raw) < CatalogItem.MAX_RECORD_BYTES
    assert decode(raw, CatalogItem) == longest_item
    longest_event = {
        **GOOD_EVENT,
        **{k: "\u00e9" * 256 for k in ("event_id", "user_id", "item_id")},
    }
    raw = json.dumps({**longest_event, "session_id": "\u00e9" * 256}).encode()  # \u-escaped
    assert len(raw) < BehaviorEvent.MAX_RECORD_BYTES
    assert isinstance(decode(raw, BehaviorEvent), BehaviorEvent)


# -- strict fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"quantity": True}, "quantity"),
        ({"quantity": "3"}, "quantity"),
        ({"quantity": 2.0}, "quantity"),
        ({"ts": 1323435000}, "ts"),
        ({"ts": 1323435000.5}, "ts"),
        ({"ts": "1323435000"}, "ts"),
        ({"ts": True}, "ts"),
        ({"user_id": "u\u00001"}, "user_id"),
        ({"item_id": "i\x1b[31m"}, "item_id"),
        ({"event_id": "e\u200b1"}, "event_id"),
        ({"session_id": "s\n1"}, "session_id"),
        ({"user_id": "\u00a0u1"}, "user_id"),
    ],
)
def test_hostile_event_fields_are_rejected(change: dict[str, Any], needle: str) -> None:
    result = decode(json.dumps({**GOOD_EVENT, **change}).encode(), BehaviorEvent)
    assert isinstance(result, Rejection), result
    assert result.error_type == "invalid_fields"
    assert needle in result.reason


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"price": True}, "price"),
        ({"price": "3.5"}, "price"),
        ({"available": "yes"}, "available"),
        ({"available": 1}, "available"),
        ({"title": "mug\u0000"}, "title"),
        ({"categories": ["a\u001bb"]}, "categories"),
        ({"item_id": "i\u00851"}, "item_id"),
    ],
)
def test_hostile_catalog_fields_are_rejected(change: dict[str, Any], needle: str) -> None:
    result = decode(json.dumps({**GOOD_ITEM, **change}).encode(), CatalogItem)
    assert isinstance(result, Rejection), result
    assert needle in result.reason


def test_strict_fields_still_accept_what_the_contract_allows() -> None:
    event = decode(
        json.dumps({**GOOD_EVENT, "quantity": 3, "user_id": "u 1 é"}).encode(), BehaviorEvent
    )
    assert isinstance(event, BehaviorEvent)
    assert event.quantity == 3
    item = decode(
        json.dumps({**GOOD_ITEM, "price": 4, "description": "a\tb\r\nc"}).encode(), CatalogItem
    )
    assert isinstance(item, CatalogItem)
    assert item.price == 4.0


# -- bounded dead letters ---------------------------------------------------------------------


def test_hostile_large_record_dead_letter_stays_bounded_with_size_and_hash() -> None:
    raw = nested_in(GOOD_EVENT, "item_id", json.dumps("\u0000" * 160_000).encode())
    assert 950_000 < len(raw) < 1_000_000
    rejection = decode(raw, BehaviorEvent)
    assert isinstance(rejection, Rejection)
    key = "\u00e9".encode() * 600_000  # a hostile key, too: 1.2 MB
    letter = dead_letter(
        rejection, raw=raw, key=key, topic="behavior-events", partition=0, offset=7, stage="streams"
    )
    encoded = letter.model_dump_json().encode()
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES
    assert letter.raw_size == len(raw)
    assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert letter.raw_truncated and letter.key_truncated
    assert base64.b64decode(letter.raw_value_b64 or "") == raw[:DEAD_LETTER_RAW_PREFIX_BYTES]
    assert letter.key is not None and letter.key.startswith("\u00e9\u00e9")
    assert decode(encoded, DeadLetter) == letter


def test_hostile_reason_is_bounded() -> None:
    rejection = Rejection("invalid_fields", "x" * 1_000_000)
    letter = dead_letter(
        rejection, raw=b"{}", key=None, topic="t", partition=0, offset=0, stage="streams"
    )
    assert len(letter.model_dump_json()) <= DEAD_LETTER_MAX_BYTES
    assert letter.reason.endswith("(reason truncated)")
    assert not letter.raw_truncated


def test_dead_letters_without_the_new_fields_still_load() -> None:
    old = {
        "source_topic": "behavior-events",
        "partition": 0,
        "offset": 1,
        "key": None,
        "raw_value_b64": "e30=",
        "reason": "r",
        "error_type": "malformed_json",
        "stage": "streams",
        "failed_at": "2024-01-01T00:00:00Z",
    }
    letter = decode(json.dumps(old).encode(), DeadLetter)
    assert isinstance(letter, DeadLetter)
    assert (letter.raw_size, letter.raw_sha256, letter.raw_truncated) == (None, None, False)
