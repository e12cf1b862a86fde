"""The vector store on qdrant-client: a Qdrant server (URL + API key), or the client's local
mode (a path or ":memory:"), which the tests use as the server's stand-in."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from workers.vector_store import (
    AVAILABLE,
    CATEGORIES,
    ITEM_ID,
    MODEL_NAME,
    MODEL_VERSION,
    FloatArray,
    Hit,
    ModelIdentity,
    VectorStoreError,
    check_upsert,
    check_written_by,
    exclusion_sets,
    payloads_by_item,
    point_id,
    point_payload,
    scored_hits,
    unique_point_ids,
    vectors_by_item,
)


class ClientVectorStore:
    """qdrant-client behind `VectorStore`: a server, or local mode (a correctness path)."""

    def __init__(
        self,
        *,
        collection: str,
        url: str | None = None,
        api_key: str | None = None,
        path: str | None = None,
        hnsw_ef: int = 128,
        model: ModelIdentity | None = None,
        client: Any = None,
        owns_client: bool = True,
    ) -> None:
        from qdrant_client import QdrantClient, models

        self._m = models
        self.collection = collection
        self.name = f"collection {collection!r}"
        self.model = model
        self.hnsw_ef = hnsw_ef
        self._owns_client = owns_client or client is None
        self._dim: int | None = None
        # Local mode is exact and ignores payload indexes and HNSW params (it warns about them).
        self._local = not url
        if client is not None:  # shared with `store_versions.ClientVersions` (same url/path)
            self.client = client
        elif url:
            self.client = QdrantClient(url=url, api_key=api_key)
        elif path == ":memory:" or path is None:
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(path=path)

    def ensure_collection(self, dim: int) -> None:
        m = self._m
        if self.client.collection_exists(self.collection):
            info = self.client.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = getattr(vectors, "size", None)
            if size is not None and size != dim:
                msg = (
                    f"collection {self.collection!r} holds vectors of dim {size}, the encoder "
                    f"makes {dim}: use another RELATA_STORE_COLLECTION"
                )
                raise VectorStoreError(msg)
            records, _ = self.client.scroll(
                self.collection, limit=1, with_payload=[MODEL_NAME, MODEL_VERSION]
            )
            check_written_by(self.name, records, self.model)
        else:
            # The model in the collection's metadata names an empty version too (`relata
            # model-versions`); the points' payloads are what the checks read.
            meta = (
                {MODEL_NAME: self.model.name, MODEL_VERSION: self.model.version}
                if self.model
                else None
            )
            self.client.create_collection(
                self.collection,
                vectors_config=m.VectorParams(size=dim, distance=m.Distance.COSINE),
                metadata=meta,
            )
            if not self._local:
                self.client.create_payload_index(
                    self.collection, AVAILABLE, m.PayloadSchemaType.BOOL
                )
                self.client.create_payload_index(
                    self.collection, CATEGORIES, m.PayloadSchemaType.KEYWORD
                )
        self._dim = dim

    def upsert(
        self, ids: Sequence[str], vectors: FloatArray, payloads: Sequence[Mapping[str, Any]]
    ) -> None:
        check_upsert(ids, vectors, payloads, self._dim)
        if not len(ids):
            return
        points = [
            self._m.PointStruct(
                id=point_id(item_id),
                vector=vec.tolist(),
                payload=point_payload(item_id, payload, self.model),
            )
            for item_id, vec, payload in zip(ids, vectors, payloads, strict=True)
        ]
        self.client.upsert(self.collection, points=points, wait=True)

    def _filter(
        self, exclude_ids: Collection[str], only_available: bool, category: str | None
    ) -> Any:
        m = self._m
        must: list[Any] = []
        if only_available:
            must.append(m.FieldCondition(key=AVAILABLE, match=m.MatchValue(value=True)))
        if category is not None:
            must.append(m.FieldCondition(key=CATEGORIES, match=m.MatchValue(value=category)))
        must_not: list[Any] = (
            [m.HasIdCondition(has_id=[point_id(i) for i in exclude_ids])] if exclude_ids else []
        )
        if not must and not must_not:
            return None
        return m.Filter(must=must or None, must_not=must_not or None)

    def _params(self) -> Any:
        return None if self._local else self._m.SearchParams(hnsw_ef=self.hnsw_ef)

    def search(
        self,
        vector: FloatArray,
        *,
        k: int,
        exclude_ids: Collection[str] = (),
        only_available: bool = True,
        category: str | None = None,
    ) -> list[Hit]:
        response = self.client.query_points(
            self.collection,
            query=np.asarray(vector, dtype=np.float32).tolist(),
            query_filter=self._filter(exclude_ids, only_available, category),
            search_params=self._params(),
            limit=k,
            with_payload=[ITEM_ID],
        )
        return scored_hits(response.points)

    def search_batch(
        self,
        vectors: FloatArray,
        *,
        k: int,
        exclude_ids: Sequence[Collection[str]] | None = None,
        only_available: bool = True,
        category: str | None = None,
    ) -> list[list[Hit]]:
        if len(vectors) == 0:
            return []
        m = self._m
        requests = [
            m.QueryRequest(
                query=np.asarray(v, dtype=np.float32).tolist(),
                filter=self._filter(ex, only_available, category),
                params=self._params(),
                limit=k,
                with_payload=[ITEM_ID],
            )
            for v, ex in zip(vectors, exclusion_sets(exclude_ids, len(vectors)), strict=True)
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [scored_hits(r.points) for r in responses]

    def _records(self, ids: Iterable[str], *, with_vectors: bool) -> list[Any]:
        pids = unique_point_ids(ids)
        if not pids:
            return []
        return list(
            self.client.retrieve(
                self.collection, ids=pids, with_payload=True, with_vectors=with_vectors
            )
        )

    def get_vectors(self, ids: Iterable[str]) -> dict[str, FloatArray]:
        return vectors_by_item(self._records(ids, with_vectors=True))

    def get_payloads(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return payloads_by_item(self._records(ids, with_vectors=False))

    def set_available(self, ids: Sequence[str], available: bool) -> None:
        if not ids:
            return
        self.client.set_payload(
            self.collection,
            payload={AVAILABLE: bool(available)},
            points=[point_id(i) for i in ids],
            wait=True,
        )

    def delete(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        self.client.delete(
            self.collection,
            points_selector=self._m.PointIdsList(points=[point_id(i) for i in ids]),
            wait=True,
        )

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def optimize(self) -> None:
        """Nothing to do: a server indexes in the background; local mode is exact."""

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
