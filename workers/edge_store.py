"""The embedded vector store: Qdrant's engine in-process (qdrant-edge-py), on a directory."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.vector_store import (
    AVAILABLE,
    CATEGORIES,
    ITEM_ID,
    FloatArray,
    Hit,
    ModelIdentity,
    VectorStoreError,
    check_upsert,
    check_written_by,
    edge_point_id,
    exclusion_sets,
    payloads_by_item,
    point_payload,
    unique_point_ids,
    vectors_by_item,
)

logger = logging.getLogger(__name__)


class EdgeVectorStore:
    """The embedded Qdrant engine (qdrant-edge-py) on `path`: one process owns one directory.

    Pitfalls of the engine handled here: a bool filter must be `numpy.True_` (a Python
    `True` is matched as the integer 1), `HasIdCondition` wants a set, an existing directory
    must be `load()`ed, and HNSW is built only by the blocking `optimize()`; until then search
    is exact over plain segments.
    """

    def __init__(
        self,
        path: Path,
        *,
        hnsw_ef: int = 128,
        search_threads: int = 1,
        model: ModelIdentity | None = None,
    ) -> None:
        import qdrant_edge

        self._q = qdrant_edge
        self.path = Path(path)
        self.name = str(self.path)
        self.model = model
        self.hnsw_ef = hnsw_ef
        # The engine's search pool. Its default (a thread per core) costs twice the CPU of one
        # thread for a batch of 1-2 queries on 2 cores (handing each query to the pool); 0
        # keeps the engine's default.
        self.search_threads = search_threads
        self._shard: Any = None
        self._dim: int | None = None
        # Point id (`edge_point_id`) -> item id of the points this process wrote or has seen:
        # searches then ask for no payload (reading it is most of a small query's cost); an id
        # not known yet (a store opened from disk) is looked up once, in one retrieve per search.
        self._item_ids: dict[int, str] = {}
        # Writers (indexer) and readers (recommender) may share one store in one process;
        # serialising writes keeps set_payload/upsert/optimize from interleaving.
        self._write_lock = threading.Lock()

    def _has_segments(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def ensure_collection(self, dim: int) -> None:
        """Open the shard at `path`, creating it with cosine vectors of `dim` when absent."""
        q = self._q
        threads = {"max_search_threads": self.search_threads} if self.search_threads else {}
        config = q.EdgeConfig(
            vectors=q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine), **threads
        )
        try:
            if self._has_segments():
                self._shard = q.EdgeShard.load(str(self.path), config)
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._shard = q.EdgeShard.create(str(self.path), config)
                self._shard.update(
                    q.UpdateOperation.create_field_index(AVAILABLE, q.PayloadSchemaType.Bool)
                )
                self._shard.update(
                    q.UpdateOperation.create_field_index(CATEGORIES, q.PayloadSchemaType.Keyword)
                )
        except Exception as exc:  # qdrant-edge raises plain Exception
            msg = (
                f"cannot open the qdrant-edge store at {self.path} with dim={dim}: {exc} "
                "(a store built by another model needs a new RELATA_STORE_PATH; one directory "
                "can be open in one process only)"
            )
            raise VectorStoreError(msg) from exc
        self._dim = dim
        self._check_points()
        logger.info(
            "edge store open path=%s dim=%d points=%d model=%s",
            self.path,
            dim,
            self.count(),
            self.model or "unversioned",
        )

    def _check_points(self) -> None:
        """Refuse a store written with UUID point ids (relata before integer edge ids): its
        points would never match this code's ids, and every item would be stored twice. And
        one written by another model."""
        try:
            records, _ = self.shard.scroll(
                self._q.ScrollRequest(limit=1, with_payload=True, with_vector=False)
            )
            check_written_by(self.name, records, self.model)
        except VectorStoreError:
            self.close()
            raise
        if records and not isinstance(records[0].id, int):
            self.close()
            msg = (
                f"the qdrant-edge store at {self.path} has UUID point ids (written by an earlier "
                "relata); delete the directory or set a new RELATA_STORE_PATH: the indexer "
                "rebuilds the store from the compacted item-catalog topic"
            )
            raise VectorStoreError(msg)

    @property
    def shard(self) -> Any:
        if self._shard is None:
            raise VectorStoreError("store not open: call ensure_collection(dim) first")
        return self._shard

    def upsert(
        self, ids: Sequence[str], vectors: FloatArray, payloads: Sequence[Mapping[str, Any]]
    ) -> None:
        check_upsert(ids, vectors, payloads, self._dim)
        if not len(ids):
            return
        q = self._q
        points = [
            q.Point(
                edge_point_id(item_id), vec.tolist(), point_payload(item_id, payload, self.model)
            )
            for item_id, vec, payload in zip(ids, vectors, payloads, strict=True)
        ]
        with self._write_lock:
            self.shard.update(q.UpdateOperation.upsert_points(points))
        self._item_ids.update((edge_point_id(i), i) for i in ids)

    def _filter(self, only_available: bool, category: str | None) -> Any:
        q = self._q
        must: list[Any] = []
        if only_available:
            must.append(q.FieldCondition(key=AVAILABLE, match=q.MatchValue(np.True_)))
        if category is not None:
            must.append(q.FieldCondition(key=CATEGORIES, match=q.MatchValue(category)))
        return q.Filter(must=must) if must else None

    def _request(
        self,
        vector: FloatArray,
        *,
        k: int,
        exclude_ids: Collection[str],
        only_available: bool,
        category: str | None,
    ) -> Any:
        # Exclusions are dropped from k + |exclusions| hits afterwards, not by a must_not id
        # filter: the engine checks that filter point by point (milliseconds a query), while
        # the extra hits cost microseconds. Same result.
        q = self._q
        return q.QueryRequest(
            limit=k + len(exclude_ids),
            query=q.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist()),
            filter=self._filter(only_available, category),
            with_payload=False,
            params=q.SearchParams(hnsw_ef=self.hnsw_ef),
        )

    def _scored(self, results: Sequence[Sequence[Any]]) -> list[list[tuple[int, float]]]:
        """(point id, score) pairs per result list, learning the item ids of unknown points."""
        scored = [[(p.id, p.score) for p in points] for points in results]
        names = self._item_ids
        unknown = {pid for hits in scored for pid, _ in hits if pid not in names}
        if unknown:
            for record in self.shard.retrieve(list(unknown), with_payload=True, with_vector=False):
                names[record.id] = str(record.payload[ITEM_ID])
        return scored

    def _named_hits(
        self, scored: Sequence[tuple[int, float]], *, k: int, exclude_ids: Collection[str]
    ) -> list[Hit]:
        """The first k (item id, score) pairs of `scored` that are not excluded."""
        names = self._item_ids
        out: list[Hit] = []
        for pid, score in scored:
            item_id = names.get(pid)
            if item_id is None or item_id in exclude_ids:
                continue
            out.append((item_id, float(score)))
            if len(out) == k:
                break
        return out

    def search(
        self,
        vector: FloatArray,
        *,
        k: int,
        exclude_ids: Collection[str] = (),
        only_available: bool = True,
        category: str | None = None,
    ) -> list[Hit]:
        request = self._request(
            vector, k=k, exclude_ids=exclude_ids, only_available=only_available, category=category
        )
        (scored,) = self._scored([self.shard.query(request)])
        return self._named_hits(scored, k=k, exclude_ids=exclude_ids)

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
        excludes = exclusion_sets(exclude_ids, len(vectors))
        requests = [
            self._request(v, k=k, exclude_ids=ex, only_available=only_available, category=category)
            for v, ex in zip(vectors, excludes, strict=True)
        ]
        results = self.shard.query_batch(self._q.QueryBatchRequest(requests))
        return [
            self._named_hits(scored, k=k, exclude_ids=ex)
            for scored, ex in zip(self._scored(results), excludes, strict=True)
        ]

    def _records(self, ids: Iterable[str], *, with_vector: bool) -> list[Any]:
        pids = unique_point_ids(ids, edge_point_id)
        if not pids:
            return []
        return list(self.shard.retrieve(pids, with_payload=True, with_vector=with_vector))

    def get_vectors(self, ids: Iterable[str]) -> dict[str, FloatArray]:
        return vectors_by_item(self._records(ids, with_vector=True))

    def get_payloads(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return payloads_by_item(self._records(ids, with_vector=False))

    def set_available(self, ids: Sequence[str], available: bool) -> None:
        if not ids:
            return
        op = self._q.UpdateOperation.set_payload(
            [edge_point_id(i) for i in ids], {AVAILABLE: bool(available)}
        )
        with self._write_lock:
            self.shard.update(op)

    def delete(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        op = self._q.UpdateOperation.delete_points([edge_point_id(i) for i in ids])
        with self._write_lock:
            self.shard.update(op)
        for item_id in ids:
            self._item_ids.pop(edge_point_id(item_id), None)

    def count(self) -> int:
        return int(self.shard.count(self._q.CountRequest(exact=True)))

    def optimize(self) -> None:
        """Build the HNSW index (blocking; searches wait meanwhile). Exact search until then."""
        with self._write_lock:
            self.shard.optimize()

    def close(self) -> None:
        if self._shard is not None:
            with self._write_lock:
                self._shard.flush()
                self._shard.close()
            self._shard = None
