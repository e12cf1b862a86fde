"""Item vectors in Qdrant: the embedded engine (qdrant-edge) or qdrant-client (server/local).

Both sit behind one `VectorStore` Protocol. String item ids map to Qdrant point ids
deterministically (uuid5; the embedded store uses its upper 63 bits as an integer id), with the
item id kept in the payload. Scores are cosine. A store opened for a model (`ModelIdentity`)
stamps every point with that model's name and version and refuses to open a collection whose
points another model wrote; `workers.store_versions` keeps one collection per model version.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
Hit = tuple[str, float]

# Fixed namespace: the same item id is the same point id in every deployment, forever.
ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://relata/item")
ITEM_ID = "item_id"
AVAILABLE = "available"
CATEGORIES = "categories"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"


class VectorStoreError(RuntimeError):
    """The vector store cannot be opened or does not fit the encoder."""


class ModelMismatchError(VectorStoreError):
    """The store holds vectors of another model than the encoder: using both would mix them."""


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The model that made a vector: its name and version (`workers.encoder.model_version`, a
    hash of config, weights and adapter, so it changes whenever the vectors would)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name} version {self.version}"

    @classmethod
    def of(cls, encoder: _Named) -> ModelIdentity:
        """The identity of what `encoder` makes."""
        return cls(encoder.name, encoder.version)


class _Named(Protocol):
    name: str
    version: str


def model_mismatch(store: str, held: ModelIdentity, loaded: ModelIdentity) -> ModelMismatchError:
    """The error for a worker whose encoder does not match the vectors of `store`."""
    msg = (
        f"the vector store {store} holds item vectors of {held}, but this worker loaded {loaded}: "
        "searching one with the other would mix two models' vectors. Build and switch to the "
        "loaded model's version with `relata reindex` (same encoder settings), or run the "
        "workers with the model the store holds (`relata rollback` switches back to the "
        "previous version)"
    )
    return ModelMismatchError(msg)


def require_model(store: VectorStore, loaded: ModelIdentity) -> None:
    """Refuse `store` when it is bound to another model than `loaded` (see `model_mismatch`)."""
    held = store.model
    if held is not None and held.version != loaded.version:
        raise model_mismatch(store.name, held, loaded)


@functools.lru_cache(maxsize=1 << 18)
def point_uuid(item_id: str) -> uuid.UUID:
    """The Qdrant point id of an item id, as the engines return it (cached: a uuid5 costs
    ~4 us, and the recommender maps every history item of every update)."""
    return uuid.uuid5(ITEM_NAMESPACE, item_id)


def point_id(item_id: str) -> str:
    """The Qdrant point id (a UUID string) of an item id."""
    return str(point_uuid(item_id))


@functools.lru_cache(maxsize=1 << 18)
def edge_point_id(item_id: str) -> int:
    """The embedded store's point id of an item id: the upper 63 bits of its uuid5.

    An integer because qdrant-edge hands every hit's UUID id back as a new `uuid.UUID` (0.4 ms
    of a 0.7 ms, 131-hit query in the recommender), an integer as a plain int. Two items
    would share a point only on a 63-bit collision: for n items the chance is about n^2 / 2^64,
    5e-8 for a million.
    """
    return point_uuid(item_id).int >> 65


class VectorStore(Protocol):
    """Cosine search over item vectors, with availability and category filters.

    `model` is the model whose vectors it holds (None: an unversioned store, tests only);
    `name` names the collection or directory in messages."""

    model: ModelIdentity | None
    name: str

    def ensure_collection(self, dim: int) -> None: ...

    def upsert(
        self, ids: Sequence[str], vectors: FloatArray, payloads: Sequence[Mapping[str, Any]]
    ) -> None: ...

    def search(
        self,
        vector: FloatArray,
        *,
        k: int,
        exclude_ids: Collection[str] = (),
        only_available: bool = True,
        category: str | None = None,
    ) -> list[Hit]: ...

    def search_batch(
        self,
        vectors: FloatArray,
        *,
        k: int,
        exclude_ids: Sequence[Collection[str]] | None = None,
        only_available: bool = True,
        category: str | None = None,
    ) -> list[list[Hit]]: ...

    def get_vectors(self, ids: Iterable[str]) -> dict[str, FloatArray]: ...

    def get_payloads(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]: ...

    def set_available(self, ids: Sequence[str], available: bool) -> None: ...

    def delete(self, ids: Sequence[str]) -> None: ...

    def count(self) -> int: ...

    def optimize(self) -> None: ...

    def close(self) -> None: ...


def _check_upsert(
    ids: Sequence[str], vectors: FloatArray, payloads: Sequence[Mapping[str, Any]], dim: int | None
) -> None:
    if not (len(ids) == len(vectors) == len(payloads)):
        msg = f"upsert needs as many ids, vectors and payloads; got {len(ids)}, {len(vectors)}, {len(payloads)}"
        raise ValueError(msg)
    if len(ids) and (vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim)):
        raise ValueError(f"upsert vectors must have shape (n, {dim}); got {vectors.shape}")


def _point_payload(
    item_id: str, payload: Mapping[str, Any], model: ModelIdentity | None
) -> dict[str, Any]:
    out = dict(payload)
    out[ITEM_ID] = item_id
    out[AVAILABLE] = bool(out.get(AVAILABLE, True))
    if model is not None:
        out[MODEL_NAME] = model.name
        out[MODEL_VERSION] = model.version
    return out


def _check_written_by(name: str, records: Sequence[Any], model: ModelIdentity | None) -> None:
    """Refuse a collection whose sampled point another model wrote (each collection holds one
    model's vectors, so one point tells)."""
    if model is None or not records:
        return
    payload = records[0].payload or {}
    version = payload.get(MODEL_VERSION)
    if version is not None and version != model.version:
        held = ModelIdentity(str(payload.get(MODEL_NAME, "unknown model")), str(version))
        raise model_mismatch(name, held, model)


def _excludes(exclude_ids: Sequence[Collection[str]] | None, n: int) -> Sequence[Collection[str]]:
    if exclude_ids is None:
        return [()] * n
    if len(exclude_ids) != n:
        raise ValueError(f"search_batch got {n} vectors but {len(exclude_ids)} exclusion sets")
    return exclude_ids


def _unique_point_ids(ids: Iterable[str], to_point: Callable[[str], Any] = point_id) -> list[Any]:
    """The point ids of `ids`, each once, in first-seen order."""
    return list(dict.fromkeys(to_point(i) for i in ids))


def _hits(points: Iterable[Any]) -> list[Hit]:
    """(item id, score) pairs of scored points (both engines' points carry payload and score)."""
    return [(str(p.payload[ITEM_ID]), float(p.score)) for p in points]


def _vectors_by_item(records: Iterable[Any]) -> dict[str, FloatArray]:
    return {str(r.payload[ITEM_ID]): np.asarray(r.vector, dtype=np.float32) for r in records}


def _payloads_by_item(records: Iterable[Any]) -> dict[str, dict[str, Any]]:
    return {str(r.payload[ITEM_ID]): dict(r.payload) for r in records}


# ---------------------------------------------------------------------------------------------
# qdrant-edge: Qdrant's engine in-process, on a directory.
# ---------------------------------------------------------------------------------------------


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
            _check_written_by(self.name, records, self.model)
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
        _check_upsert(ids, vectors, payloads, self._dim)
        if not len(ids):
            return
        q = self._q
        points = [
            q.Point(
                edge_point_id(item_id), vec.tolist(), _point_payload(item_id, payload, self.model)
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
        excludes = _excludes(exclude_ids, len(vectors))
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
        pids = _unique_point_ids(ids, edge_point_id)
        if not pids:
            return []
        return list(self.shard.retrieve(pids, with_payload=True, with_vector=with_vector))

    def get_vectors(self, ids: Iterable[str]) -> dict[str, FloatArray]:
        return _vectors_by_item(self._records(ids, with_vector=True))

    def get_payloads(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return _payloads_by_item(self._records(ids, with_vector=False))

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


# ---------------------------------------------------------------------------------------------
# qdrant-client: a Qdrant server (URL + API key) or the client's local mode (path / ":memory:").
# ---------------------------------------------------------------------------------------------


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
            _check_written_by(self.name, records, self.model)
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
        _check_upsert(ids, vectors, payloads, self._dim)
        if not len(ids):
            return
        points = [
            self._m.PointStruct(
                id=point_id(item_id),
                vector=vec.tolist(),
                payload=_point_payload(item_id, payload, self.model),
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
        return _hits(response.points)

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
            for v, ex in zip(vectors, _excludes(exclude_ids, len(vectors)), strict=True)
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [_hits(r.points) for r in responses]

    def _records(self, ids: Iterable[str], *, with_vectors: bool) -> list[Any]:
        pids = _unique_point_ids(ids)
        if not pids:
            return []
        return list(
            self.client.retrieve(
                self.collection, ids=pids, with_payload=True, with_vectors=with_vectors
            )
        )

    def get_vectors(self, ids: Iterable[str]) -> dict[str, FloatArray]:
        return _vectors_by_item(self._records(ids, with_vectors=True))

    def get_payloads(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return _payloads_by_item(self._records(ids, with_vectors=False))

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
