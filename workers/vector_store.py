"""The vector store interface: item vectors in Qdrant, embedded (`workers.edge_store`) or by
qdrant-client (`workers.client_store`).

Both sit behind one `VectorStore` Protocol. String item ids map to Qdrant point ids
deterministically (uuid5; the embedded store uses its upper 63 bits as an integer id), with the
item id kept in the payload. Scores are cosine. A store opened for a model (`ModelIdentity`)
stamps every point with that model's name and version and refuses to open a collection whose
points another model wrote; `workers.store_versions` keeps one collection per model version.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
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


def check_upsert(
    ids: Sequence[str], vectors: FloatArray, payloads: Sequence[Mapping[str, Any]], dim: int | None
) -> None:
    if not (len(ids) == len(vectors) == len(payloads)):
        msg = f"upsert needs as many ids, vectors and payloads; got {len(ids)}, {len(vectors)}, {len(payloads)}"
        raise ValueError(msg)
    if len(ids) and (vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim)):
        raise ValueError(f"upsert vectors must have shape (n, {dim}); got {vectors.shape}")


def point_payload(
    item_id: str, payload: Mapping[str, Any], model: ModelIdentity | None
) -> dict[str, Any]:
    out = dict(payload)
    out[ITEM_ID] = item_id
    out[AVAILABLE] = bool(out.get(AVAILABLE, True))
    if model is not None:
        out[MODEL_NAME] = model.name
        out[MODEL_VERSION] = model.version
    return out


def check_written_by(name: str, records: Sequence[Any], model: ModelIdentity | None) -> None:
    """Refuse a collection whose sampled point another model wrote (each collection holds one
    model's vectors, so one point tells)."""
    if model is None or not records:
        return
    payload = records[0].payload or {}
    version = payload.get(MODEL_VERSION)
    if version is not None and version != model.version:
        held = ModelIdentity(str(payload.get(MODEL_NAME, "unknown model")), str(version))
        raise model_mismatch(name, held, model)


def exclusion_sets(
    exclude_ids: Sequence[Collection[str]] | None, n: int
) -> Sequence[Collection[str]]:
    if exclude_ids is None:
        return [()] * n
    if len(exclude_ids) != n:
        raise ValueError(f"search_batch got {n} vectors but {len(exclude_ids)} exclusion sets")
    return exclude_ids


def unique_point_ids(ids: Iterable[str], to_point: Callable[[str], Any] = point_id) -> list[Any]:
    """The point ids of `ids`, each once, in first-seen order."""
    return list(dict.fromkeys(to_point(i) for i in ids))


def scored_hits(points: Iterable[Any]) -> list[Hit]:
    """(item id, score) pairs of scored points (both engines' points carry payload and score)."""
    return [(str(p.payload[ITEM_ID]), float(p.score)) for p in points]


def vectors_by_item(records: Iterable[Any]) -> dict[str, FloatArray]:
    return {str(r.payload[ITEM_ID]): np.asarray(r.vector, dtype=np.float32) for r in records}


def payloads_by_item(records: Iterable[Any]) -> dict[str, dict[str, Any]]:
    return {str(r.payload[ITEM_ID]): dict(r.payload) for r in records}
