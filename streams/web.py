"""HTTP API of the stream processor (Faust web views) and its OpenAPI 3.1 document.

Reads are partition-local in Faust. Routing in a multi-worker deployment:
- `/users/{user_id}/recommendations` forwards the request to the worker that owns the user's
  partition of table `recommendations` (`app.router.route_req`, what `@app.table_route`
  does), so any worker can be asked. Ownership is computed with Faust's (murmur2) key
  partitioner, so producers of `recommendations` must partition with murmur2 as well
  (Java clients and aiokafka do; librdkafka needs `partitioner=murmur2_random`). A user with
  no list there (never seen, or erased) is answered with the trending list, which every
  worker holds (`streams/trending.py`). With parameters (`queries.py`: filters, diversity, k)
  the owner re-ranks the published list from its candidate pool (`schemas.reranking`).
- `/items/{item_id}/related`: the association statistics live in the one partition of table
  `associations`; requests are forwarded to its owner. The catalog (404s) and the injected
  similar-items provider are answered locally, before forwarding.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from faust.exceptions import SameNode
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from kafkaio.health import Health as ProcessHealth
from schemas import vocabulary
from schemas.messages import (
    Recommendation,
    RecommendedItem,
    RelatedItem,
    RelatedItems,
    RelationKind,
)
from schemas.reranking import REQUEST_FALLBACK, rerank
from schemas.vocabulary import Term

from .catalog import CatalogView
from .metrics import REQUEST_STAGE, StreamsMetrics
from .ports import SimilarItems
from .queries import (
    MAX_K,
    RECOMMENDATIONS_PARAMETERS,
    BadRequest,
    RecommendationsQuery,
    integer_param,
    parse_recommendations_query,
)
from .similar import SimilarView
from .tables import stored_json
from .trending import TrendingView

logger = logging.getLogger(__name__)

ALL = "all"  # every relation kind
# The content kind served by the vector store (the others come from the association agent).
SIMILAR = "similar"


def kind_params() -> tuple[str, ...]:
    """What `kind` may be: `all` or one relation kind of the vocabulary."""
    return (ALL, *vocabulary.relation_kinds())


class RelatedResponse(BaseModel):
    """Body of GET /items/{item_id}/related."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str
    kind: Annotated[str, Term(kind_params, "unknown_relation_kind", "kind")]
    k: int = Field(ge=1, le=MAX_K)
    same_category: bool
    item_count: float = Field(
        ge=0, description="Decayed baskets/sessions holding the item (0: no behaviour yet)."
    )
    similar_available: bool = Field(
        description="False when this process has no source of `similar` items (relata's "
        "associations role always has one: the `similar-items` topic or a Qdrant server)."
    )
    related: list[RelatedItem] = Field(
        description=(
            "Best first within each kind; kind=all gives up to k similar items followed by "
            "up to k association items (scores of different sources are not comparable). "
            "Only available catalog items."
        )
    )
    updated_at: datetime | None = Field(description="Event time of the association statistics.")


class TrendingRecommendation(BaseModel):
    """Body of GET /users/{user_id}/recommendations for a user with no list of their own
    (never seen, or erased): the trending list, the same for every such user."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str
    trending: Literal[True] = Field(
        True, description="Always true: the trending list, not a list of this user's own."
    )
    items: list[RecommendedItem] = Field(
        description="The most popular available items lately, each with a `trending` reason."
    )
    generated_at: datetime = Field(description="When the recommender ranked the trending list.")
    placement: str
    model_name: str
    model_version: str
    vectors_version: str | None
    strategy: str


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx response."""

    error: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    """Body of GET /readyz (also /healthz) and GET /livez."""

    status: Literal["ok", "starting", "unavailable", "stuck"] = Field(
        description=(
            "/readyz: ok, starting (catalog loading) or unavailable (brokers away, outputs "
            "unacknowledged, partitions lost); /livez: ok or stuck."
        )
    )
    ready: bool
    live: bool
    broker_reachable: bool
    catalog_ready: bool
    catalog_items: int
    problems: list[str] = Field(description="What keeps the process from being ready or live.")


def parse_related_query(query: Any) -> tuple[int, str, bool]:
    """Validate k, kind and same_category of a related-items request (raises BadRequest)."""
    k = integer_param(query, "k") or 10
    kind = query.get("kind", "all")
    if kind not in kind_params():
        raise BadRequest(f"kind must be one of {list(kind_params())}, got {kind!r}", kind=kind)
    raw_same = query.get("same_category", "false").lower()
    if raw_same not in ("true", "false", "1", "0"):
        raise BadRequest(
            f"same_category must be true or false, got {raw_same!r}", same_category=raw_same
        )
    return k, kind, raw_same in ("true", "1")


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of the HTTP API, schemas generated from the pydantic models."""
    _, top = models_json_schema(
        [
            (m, "serialization")
            for m in (RelatedResponse, Recommendation, TrendingRecommendation, ErrorBody, Health)
        ],
        ref_template="#/components/schemas/{model}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
        }

    def error(description: str) -> dict[str, Any]:
        return {"description": description, **ref("ErrorBody")}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relata streams",
            "version": "0.1.0",
            "description": "Related items and latest recommendations, served by the stream processor.",
        },
        "paths": {
            "/items/{item_id}/related": {
                "get": {
                    "operationId": "getRelatedItems",
                    "summary": "Items related to one catalog item, with evidence.",
                    "parameters": [
                        {
                            "name": "item_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "k",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_K,
                                "default": 10,
                            },
                        },
                        {
                            "name": "kind",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": list(kind_params()),
                                "default": ALL,
                            },
                        },
                        {
                            "name": "same_category",
                            "in": "query",
                            "schema": {"type": "boolean", "default": False},
                        },
                    ],
                    "responses": {
                        "200": {"description": "Related items.", **ref("RelatedResponse")},
                        "400": error("Invalid k, kind or same_category."),
                        "404": error("The item is not an available catalog item."),
                        "503": error(
                            "Catalog still loading, or `similar` asked without a vector store."
                        ),
                    },
                }
            },
            "/users/{user_id}/recommendations": {
                "get": {
                    "operationId": "getRecommendations",
                    "summary": (
                        "The latest recommendations published for a user; with parameters, "
                        "filtered and re-ranked from the list and its candidate pool. For a "
                        "user with none (never seen, or erased), the trending list."
                    ),
                    "parameters": [
                        {
                            "name": "user_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        *RECOMMENDATIONS_PARAMETERS,
                    ],
                    "responses": {
                        "200": {
                            "description": (
                                "The user's latest list (verbatim without parameters), or the "
                                "trending list. Filters that match no candidate are not "
                                "applied, and `fallbacks` says so."
                            ),
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Recommendation"},
                                            {"$ref": "#/components/schemas/TrendingRecommendation"},
                                        ]
                                    }
                                }
                            },
                        },
                        "400": error("An invalid parameter, named in the body."),
                        "404": error("No list for this user and no trending list published yet."),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": (
                        "Readiness: the catalog view is loaded, the brokers answer, outputs are "
                        "acknowledged and no partitions are lost."
                    ),
                    "responses": {
                        "200": {"description": "Ready.", **ref("Health")},
                        "503": {"description": "Starting, or cannot progress.", **ref("Health")},
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "The same as /readyz.",
                    "responses": {
                        "200": {"description": "Ready.", **ref("Health")},
                        "503": {"description": "Starting, or cannot progress.", **ref("Health")},
                    },
                }
            },
            "/livez": {
                "get": {
                    "operationId": "live",
                    "summary": (
                        "Liveness: no loop died and, while the brokers answer, none is stuck "
                        "(a broker outage alone never fails it)."
                    ),
                    "responses": {
                        "200": {"description": "Live.", **ref("Health")},
                        "503": {"description": "Stuck: restart it.", **ref("Health")},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format).",
                    "responses": {
                        "200": {"description": "Metrics.", "content": {"text/plain": {}}}
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}
                    },
                }
            },
        },
        "components": {"schemas": top.get("$defs", {})},
    }


class Served(Protocol):
    """What the HTTP views read (the built stream processor, `streams.app.StreamsApp`): the
    Faust app, the tables they answer from (None: not held by this role), the catalog, the
    similar-items provider, association neighbours and the metrics."""

    @property
    def app(self) -> Any: ...
    @property
    def registry(self) -> CollectorRegistry: ...
    @property
    def metrics(self) -> StreamsMetrics: ...
    @property
    def catalog(self) -> CatalogView: ...
    @property
    def similar(self) -> SimilarItems | None: ...
    @property
    def associations(self) -> Any: ...
    @property
    def recommendations(self) -> Any: ...
    @property
    def trending(self) -> TrendingView | None: ...
    @property
    def health(self) -> ProcessHealth: ...

    def related_of(self, item_id: str, *, kinds: Iterable[RelationKind]) -> RelatedItems | None:
        """Current association neighbours of one item (None: no behaviour seen)."""
        ...


def register_views(streams: Served) -> None:
    """Add the HTTP views to `streams.app` (a no-op for requests when the web is disabled)."""
    app = streams.app
    counter = streams.metrics.http_requests

    def counted(endpoint: str, response: Response) -> Response:
        counter.labels(endpoint, str(response.status)).inc()
        return response

    async def route(view: View, request: Request, table: Any, key: str) -> Response | None:
        """Forward to the owner of `key` in `table`; None when this worker owns it."""
        try:
            forwarded: Response = await app.router.route_req(table.name, key, view.web, request)
        except SameNode:
            return None
        return forwarded

    # Each role serves what its tables hold (role `all`: both).
    if streams.associations is not None:

        @app.page("/items/{item_id}/related")
        class RelatedView(View):
            async def get(self, request: Request, item_id: str) -> Response:
                endpoint = "related"
                try:
                    k, kind, same_category = parse_related_query(request.query)
                except BadRequest as exc:
                    return counted(endpoint, self.error(400, str(exc), detail=exc.detail))
                if not streams.catalog.ready.is_set():
                    return counted(endpoint, self.error(503, "the item catalog is still loading"))
                if item_id not in streams.catalog:
                    message = f"item {item_id!r} is not an available item of the catalog"
                    return counted(endpoint, self.error(404, message, detail={"item_id": item_id}))
                if kind == SIMILAR and streams.similar is None:
                    message = "similar items need a vector store; this deployment runs without one"
                    return counted(endpoint, self.error(503, message))
                if kind != SIMILAR:
                    forwarded = await route(self, request, streams.associations, item_id)
                    if forwarded is not None:
                        return forwarded
                body = await related_body(
                    streams, item_id=item_id, k=k, kind=kind, same_category=same_category
                )
                return counted(endpoint, self.json(body.model_dump(mode="json")))

    if streams.recommendations is not None:

        @app.page("/users/{user_id}/recommendations")
        class RecommendationsView(View):
            async def get(self, request: Request, user_id: str) -> Response:
                endpoint = "recommendations"
                try:
                    query = parse_recommendations_query(request.query)
                except BadRequest as exc:
                    return counted(endpoint, self.error(400, str(exc), detail=exc.detail))
                forwarded = await route(self, request, streams.recommendations, user_id)
                if forwarded is not None:
                    return forwarded
                stored = streams.recommendations.get(user_id)
                if stored is None:
                    return counted(endpoint, no_list_answer(self, streams.trending, user_id))
                body = stored_json(stored)
                if query is not None:
                    body = reranked_body(streams, body, query)
                return counted(
                    endpoint, self.bytes(body, content_type="application/json", status=200)
                )

    def health_body(probe: Literal["ready", "live"]) -> tuple[Health, bool]:
        report = streams.health.report()
        catalog_ready = streams.catalog.ready.is_set()
        status: Literal["ok", "starting", "unavailable", "stuck"]
        if probe == "live":
            ok = report.live
            status = "ok" if ok else "stuck"
        else:
            ok = report.ready
            status = "ok" if ok else ("unavailable" if catalog_ready else "starting")
        body = Health(
            status=status,
            ready=report.ready,
            live=report.live,
            broker_reachable=report.broker_reachable,
            catalog_ready=catalog_ready,
            catalog_items=len(streams.catalog),
            problems=list(report.problems),
        )
        return body, ok

    def probe_view(path: str, probe: Literal["ready", "live"]) -> None:
        endpoint = path.strip("/")

        @app.page(path)
        class ProbeView(View):
            async def get(self, request: Request) -> Response:
                body, ok = health_body(probe)
                return counted(endpoint, self.json(body.model_dump(), status=200 if ok else 503))

    probe_view("/readyz", "ready")
    probe_view("/healthz", "ready")  # the readiness probe's older name
    probe_view("/livez", "live")

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            response: Response = self.bytes(
                generate_latest(streams.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )
            return counted("metrics", response)

    document = openapi_document()

    @app.page("/openapi.json")
    class OpenApiView(View):
        async def get(self, request: Request) -> Response:
            return counted("openapi", self.json(document))


def no_list_answer(view: View, trending: TrendingView | None, user_id: str) -> Response:
    """The answer to a user with no list of their own (never seen, or erased): the trending
    list, or 404 while none has been published."""
    current = trending.current() if trending is not None else None
    if current is None:
        message = f"no recommendations published for user {user_id!r} and no trending list yet"
        return view.error(404, message, detail={"user_id": user_id})
    body = TrendingRecommendation(
        user_id=user_id,
        items=current.items,
        generated_at=current.generated_at,
        placement=current.placement,
        model_name=current.model_name,
        model_version=current.model_version,
        vectors_version=current.vectors_version,
        strategy=current.strategy,
    )
    response: Response = view.json(body.model_dump(mode="json"))
    return response


def reranked_body(streams: Served, stored: bytes, query: RecommendationsQuery) -> bytes:
    """A published list (raw JSON, validated when it was stored) filtered and re-ranked for
    one request; a request whose filters removed every candidate is counted."""
    rec = Recommendation.model_validate_json(stored)
    answer = rerank(rec, match=query.match, lam=query.mmr_lambda, k=query.k)
    if REQUEST_FALLBACK in answer.fallbacks:
        streams.metrics.rule_fallbacks.labels(REQUEST_STAGE).inc()
    return answer.model_dump_json().encode()


async def related_body(
    streams: Served, *, item_id: str, k: int, kind: str, same_category: bool
) -> RelatedResponse:
    """Assemble the related items of one known item: similar (injected) and associations."""
    related: list[RelatedItem] = []
    if kind in (SIMILAR, ALL) and streams.similar is not None:
        provider = streams.similar
        categories = streams.catalog.categories(item_id) if same_category else None
        # Twice k: room for the items the catalog has retired since the store last heard.
        call = functools.partial(provider.similar, item_id, k=2 * k, categories=categories)
        if isinstance(provider, SimilarView):  # in memory, and changed by this event loop
            found = call()
        else:  # it may block (a Qdrant server round trip): keep it off the event loop
            found = await asyncio.get_running_loop().run_in_executor(None, call)
        related.extend([r for r in found or [] if r.item_id in streams.catalog][:k])
    item_count = 0.0
    updated_at = None
    if kind != SIMILAR:
        kinds = vocabulary.behaviour_kinds() if kind == ALL else (kind,)
        assoc = streams.related_of(item_id, kinds=kinds)
        if assoc is not None:
            item_count = assoc.item_count
            updated_at = assoc.updated_at
            # Statistics remember retired items; a related list never shows one.
            candidates = [r for r in assoc.related if r.item_id in streams.catalog]
            if same_category:
                own = set(streams.catalog.categories(item_id) or ())
                candidates = [
                    r for r in candidates if own & set(streams.catalog.categories(r.item_id) or ())
                ]
            related.extend(candidates[:k])
    return RelatedResponse(
        item_id=item_id,
        kind=kind,
        k=k,
        same_category=same_category,
        item_count=item_count,
        similar_available=streams.similar is not None,
        related=related,
        updated_at=updated_at,
    )
