"""GET /users/{user_id}/recommendations through the stream processor's HTTP app: the published
list verbatim, or filtered and re-ranked per request (each parameter), 400s that name the
parameter, malformed query strings, the fallback (field and counter), the OpenAPI document."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from faust.exceptions import SameNode
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from schemas.settings import KafkaSettings, StreamsSettings
from streams.app import StreamsApp, build_streams
from streams.queries import BadRequest, parse_recommendations_query
from streams.web import openapi_document
from tests.unit.test_reranking import PUBLISHED, SCORES, VECTORS, item, recommendation
from tests.unit.test_streams_app import RecordingSender
from workers.ranking import mmr

PATH = "/users/{}/recommendations"
PARAMETERS = ("category", "brand", "min_price", "max_price", "diversity", "k")


@pytest.fixture
def streams(tmp_path: Path) -> Iterator[StreamsApp]:
    app = build_streams(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        settings=StreamsSettings(web_port=0, data_dir=tmp_path, role="profiles"),
        registry=CollectorRegistry(),
        sender=RecordingSender(),
        follow_topics=False,
    )

    async def this_worker_owns_every_key(*_: Any) -> None:
        raise SameNode()

    app.app.router.route_req = this_worker_owns_every_key
    # The table's store, as the recommendations agent leaves it (raw JSON per user).
    app.recommendations.data["u"] = PUBLISHED.model_dump_json().encode()
    yield app


Get = Callable[..., Awaitable[ClientResponse]]


def served(test: Callable[[StreamsApp, Get], Awaitable[None]]) -> Callable[[StreamsApp], None]:
    """Run `test` against the app's web server, with `get(path_or_query, **params)`."""

    def run(streams: StreamsApp) -> None:
        async def main() -> None:
            async with TestClient(TestServer(streams.app.web.web_app)) as client:

                async def get(target: str = "", **params: Any) -> ClientResponse:
                    path = target if target.startswith("/") else PATH.format("u") + target
                    return await client.get(path, params=params)

                await test(streams, get)

        asyncio.run(main())

    run.__name__ = test.__name__
    return run


async def ids(response: ClientResponse) -> list[str]:
    assert response.status == 200, await response.text()
    return [i["item_id"] for i in (await response.json())["items"]]


@served
async def test_without_parameters_the_published_list_is_served_verbatim(
    streams: StreamsApp, get: Get
) -> None:
    response = await get()
    assert response.status == 200
    assert await response.read() == PUBLISHED.model_dump_json().encode()
    missing = await get(PATH.format("nobody"))
    assert missing.status == 404 and "nobody" in (await missing.json())["error"]


@served
async def test_category_filters_from_the_pool(streams: StreamsApp, get: Get) -> None:
    assert await ids(await get(category="Hair")) == ["sh1"]
    # Repeated: any of them.
    assert await ids(await get("?category=Hair&category=Nails")) == ["sh1", "nail"]


@served
async def test_brand_filters(streams: StreamsApp, get: Get) -> None:
    assert await ids(await get(brand="Nova")) == ["lip3", "sh1"]


@served
async def test_min_price_filters(streams: StreamsApp, get: Get) -> None:
    assert await ids(await get(min_price="12")) == ["lip1", "lip2"]


@served
async def test_max_price_filters(streams: StreamsApp, get: Get) -> None:
    assert await ids(await get(max_price="9.5")) == ["lip3", "sh1"]
    assert await ids(await get(min_price="9", max_price="12")) == ["lip1", "sh1"]


@served
async def test_diversity_re_ranks_with_lambda_one_minus_diversity(
    streams: StreamsApp, get: Get
) -> None:
    ranked = sorted(SCORES.items(), key=lambda p: -p[1])
    assert await ids(await get(diversity="0")) == ["lip1", "lip2", "lip3"]
    assert await ids(await get(diversity="0.7")) == mmr(ranked, VECTORS, k=3, lam=0.3)
    assert await ids(await get(diversity="0.7")) == ["lip1", "sh1", "nail"]


@served
async def test_k_bounds_the_answer(streams: StreamsApp, get: Get) -> None:
    assert await ids(await get(k="2")) == ["lip1", "lip2"]
    # The pool fills a longer list than was published.
    assert await ids(await get(k="5", diversity="0")) == ["lip1", "lip2", "lip3", "sh1", "nail"]
    body = await (await get(k="1")).json()
    assert body["pool"] is None and body["user_id"] == "u" and body["fallbacks"] == []


@served
async def test_a_filter_that_matches_nothing_falls_back_visibly(
    streams: StreamsApp, get: Get
) -> None:
    def counted() -> float | None:
        return streams.registry.get_sample_value(
            "relata_rule_fallbacks_total", {"stage": "request_filters"}
        )

    assert counted() == 0.0
    response = await get(brand="Nobody")
    body = await response.json()
    assert [i["item_id"] for i in body["items"]] == ["lip1", "lip2", "lip3"]
    assert body["fallbacks"] == ["request_filters_removed_every_candidate"]
    assert counted() == 1.0
    await get(brand="Rosa")
    assert counted() == 1.0
    metrics = await (await get("/metrics")).text()
    assert 'relata_rule_fallbacks_total{stage="request_filters"} 1.0' in metrics


@served
async def test_pinned_items_keep_their_place(streams: StreamsApp, get: Get) -> None:
    pinned = recommendation([item("nail", kind="pinned"), item("lip1")], ["lip2", "sh1"])
    streams.recommendations.data["p"] = pinned.model_dump_json().encode()
    assert await ids(await get(PATH.format("p"), diversity="0", k="3")) == ["nail", "lip1", "lip2"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("?k=0", "k"),
        ("?k=101", "k"),
        ("?k=ten", "k"),
        ("?k=2&k=3", "k"),
        ("?k=", "k"),
        ("?diversity=1.5", "diversity"),
        ("?diversity=-0.1", "diversity"),
        ("?diversity=nan", "diversity"),
        ("?min_price=-1", "min_price"),
        ("?min_price=cheap", "min_price"),
        ("?max_price=inf", "max_price"),
        ("?max_price=1e999", "max_price"),
        ("?min_price=20&max_price=10", "min_price"),
        ("?category=", "category"),
        ("?brand=" + "b" * 501, "brand"),
        ("?category=x" + "&category=x" * 50, "category"),
    ],
)
def test_invalid_values_are_400s_that_name_the_parameter(
    streams: StreamsApp, query: str, parameter: str
) -> None:
    @served
    async def check(streams: StreamsApp, get: Get) -> None:
        response = await get(query)
        assert response.status == 400
        body = await response.json()
        assert body["error"].startswith(parameter) and parameter in body["detail"]

    check(streams)


@pytest.mark.parametrize(
    "query",
    [
        "?%ZZ=1&k=%FF%FE",
        "?category=%00%01&brand=%E2%80%AE",
        "?&&==&k",
        "?diversity=0x1p-2",
        "?min_price=%F0%9F%92%A5",
        "?k=" + "9" * 5000,
        "?category=" + "%C3%A9" * 200,
    ],
)
def test_malformed_query_strings_are_answered_not_crashed_on(
    streams: StreamsApp, query: str
) -> None:
    @served
    async def check(streams: StreamsApp, get: Get) -> None:
        response = await get(query)
        assert response.status in (200, 400)
        assert isinstance(await response.json(), dict)
        assert (await get()).status == 200  # and the server goes on

    check(streams)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*PARAMETERS, "other"]), st.text(max_size=30)))
def test_any_query_is_a_request_or_a_bad_request(query: dict[str, str]) -> None:
    try:
        parsed = parse_recommendations_query(query)
    except BadRequest as exc:
        assert str(exc).split()[0] in PARAMETERS and exc.detail
        return
    assert parsed is None or parsed.k is None or 1 <= parsed.k <= 100


def test_the_openapi_document_lists_every_parameter() -> None:
    document = openapi_document()
    validate(document)
    operation = document["paths"]["/users/{user_id}/recommendations"]["get"]
    names = [p["name"] for p in operation["parameters"]]
    assert names == ["user_id", *PARAMETERS]
    assert "400" in operation["responses"]
    by_name = {p["name"]: p for p in operation["parameters"]}
    assert by_name["category"]["schema"]["type"] == "array"
    assert by_name["diversity"]["schema"] == {"type": "number", "minimum": 0, "maximum": 1}
    schemas = document["components"]["schemas"]
    assert {"CandidatePool", "ItemAttributes"} <= set(schemas)
    assert "fallbacks" in schemas["Recommendation"]["properties"]
