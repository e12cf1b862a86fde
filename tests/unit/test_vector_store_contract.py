"""One contract, two implementations: qdrant-client local mode and embedded qdrant-edge; and
their model versions (`workers.store_versions`), each a collection behind a switched pointer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from workers.client_store import ClientVectorStore
from workers.edge_store import EdgeVectorStore
from workers.store_versions import (
    ClientVersions,
    EdgeVersions,
    NoVersionError,
    StoreVersions,
    open_current,
)
from workers.vector_store import (
    ModelIdentity,
    ModelMismatchError,
    VectorStore,
    VectorStoreError,
    edge_point_id,
    point_id,
    point_uuid,
)

DIM = 8


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _basis(i: int, *, tilt: float = 0.0) -> np.ndarray:
    """A unit vector near axis 0, rotated towards axis `i` by `tilt` (so cosine order is known)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[0] = 1.0
    v[i % DIM] += tilt
    return v / np.linalg.norm(v)


# Items a..e at increasing angle from axis 0: a query on axis 0 ranks them a, b, c, d, e.
ITEMS = ["a", "b", "c", "d", "e"]
VECTORS = np.stack([_basis(1, tilt=0.1 * (n + 1)) for n in range(len(ITEMS))])
PAYLOADS = [
    {"title": "A", "categories": ["Makeup", "Lips"]},
    {"title": "B", "categories": ["Makeup", "Eyes"]},
    {"title": "C", "categories": ["Hair"]},
    {"title": "D", "categories": ["Makeup", "Lips"], "available": False},
    {"title": "E", "categories": []},
]
QUERY = _basis(0)

Factory = Callable[[Path], VectorStore]


def _client(path: Path) -> VectorStore:
    return ClientVectorStore(collection="items", path=str(path / "client"))


def _edge(path: Path) -> VectorStore:
    return EdgeVectorStore(path / "edge")


@pytest.fixture(params=[_client, _edge], ids=["client-local", "edge"])
def factory(request: pytest.FixtureRequest) -> Factory:
    f: Factory = request.param
    return f


@pytest.fixture
def store(factory: Factory, tmp_path: Path) -> Iterator[VectorStore]:
    s = factory(tmp_path)
    s.ensure_collection(DIM)
    s.upsert(ITEMS, VECTORS, PAYLOADS)
    yield s
    s.close()


def _ids(hits: list[tuple[str, float]]) -> list[str]:
    return [item for item, _ in hits]


def test_point_ids_are_deterministic_uuids() -> None:
    assert point_id("sku-1") == point_id("sku-1")
    assert point_id("sku-1") != point_id("sku-2")
    assert len(point_id("sku-1")) == 36


def test_edge_point_ids_are_the_uuids_upper_63_bits() -> None:
    assert edge_point_id("sku-1") == point_uuid("sku-1").int >> 65
    assert edge_point_id("sku-1") != edge_point_id("sku-2")
    assert all(0 <= edge_point_id(f"sku-{n}") < 2**63 for n in range(1000))


def _written_edge_store(path: Path) -> Path:
    """An edge store directory holding ITEMS, closed (as another process would leave it)."""
    first = EdgeVectorStore(path)
    first.ensure_collection(DIM)
    first.upsert(ITEMS, VECTORS, PAYLOADS)
    first.close()
    return path


def test_edge_search_reads_integer_ids_and_learns_unknown_ones(tmp_path: Path) -> None:
    _written_edge_store(tmp_path / "edge")
    # A new process knows none of the ids: one retrieve names them, from the payload.
    reopened = EdgeVectorStore(tmp_path / "edge")
    reopened.ensure_collection(DIM)
    assert _ids(reopened.search(QUERY, k=2)) == ["a", "b"]
    (record,) = reopened.shard.retrieve([edge_point_id("a")], with_payload=True, with_vector=False)
    assert record.payload["item_id"] == "a"
    reopened.close()


def test_edge_refuses_a_store_written_with_uuid_point_ids(tmp_path: Path) -> None:
    import qdrant_edge as q

    legacy = EdgeVectorStore(tmp_path / "edge")
    legacy.ensure_collection(DIM)
    legacy.shard.update(
        q.UpdateOperation.upsert_points(
            [q.Point(point_id("a"), VECTORS[0].tolist(), {"item_id": "a", "available": True})]
        )
    )
    legacy.close()
    with pytest.raises(VectorStoreError, match="UUID point ids"):
        EdgeVectorStore(tmp_path / "edge").ensure_collection(DIM)


def test_search_ranks_by_cosine_and_skips_unavailable(store: VectorStore) -> None:
    hits = store.search(QUERY, k=10)
    assert _ids(hits) == ["a", "b", "c", "e"]
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(VECTORS[0] @ QUERY), abs=1e-5)


def test_search_can_include_unavailable(store: VectorStore) -> None:
    assert _ids(store.search(QUERY, k=10, only_available=False)) == ["a", "b", "c", "d", "e"]


def test_search_excludes_ids_and_respects_k(store: VectorStore) -> None:
    assert _ids(store.search(QUERY, k=2, exclude_ids={"a", "c", "unknown"})) == ["b", "e"]


def test_category_filter_matches_any_category_level(store: VectorStore) -> None:
    assert _ids(store.search(QUERY, k=10, category="Makeup")) == ["a", "b"]
    assert _ids(store.search(QUERY, k=10, category="Lips", only_available=False)) == ["a", "d"]


def test_search_batch_matches_single_searches(store: VectorStore) -> None:
    queries = np.stack([QUERY, VECTORS[4], VECTORS[2]])
    excludes: list[set[str]] = [{"a"}, set(), {"c", "e"}]
    batch = store.search_batch(queries, k=3, exclude_ids=excludes)
    single = [store.search(q, k=3, exclude_ids=ex) for q, ex in zip(queries, excludes, strict=True)]
    assert [_ids(h) for h in batch] == [_ids(h) for h in single]
    assert _ids(batch[0])[0] == "b"
    assert store.search_batch(np.empty((0, DIM), dtype=np.float32), k=3) == []


def test_set_available_toggles_visibility(store: VectorStore) -> None:
    store.set_available(["a"], False)
    assert "a" not in _ids(store.search(QUERY, k=10))
    store.set_available(["a", "d"], True)
    assert _ids(store.search(QUERY, k=10)) == ["a", "b", "c", "d", "e"]
    # Retiring keeps the vector: similar-of-retired still works.
    assert set(store.get_vectors(["a"])) == {"a"}


def test_get_vectors_and_payloads(store: VectorStore) -> None:
    vectors = store.get_vectors(["b", "e", "missing", "b"])
    assert set(vectors) == {"b", "e"}
    assert vectors["b"].dtype == np.float32
    np.testing.assert_allclose(vectors["b"], VECTORS[1], atol=1e-6)
    payloads = store.get_payloads(["d"])
    assert payloads["d"]["title"] == "D"
    assert payloads["d"]["available"] is False
    assert payloads["d"]["item_id"] == "d"
    assert store.get_vectors([]) == {}


def test_upsert_is_idempotent_and_replaces(store: VectorStore) -> None:
    store.upsert(["a"], VECTORS[4:5], [{"title": "A2", "categories": []}])
    store.upsert(["a"], VECTORS[4:5], [{"title": "A2", "categories": []}])
    assert store.count() == len(ITEMS)
    assert store.get_payloads(["a"])["a"]["title"] == "A2"
    np.testing.assert_allclose(store.get_vectors(["a"])["a"], VECTORS[4], atol=1e-6)


def test_upsert_rejects_mismatched_inputs(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="as many"):
        store.upsert(["x", "y"], VECTORS[:1], [{}])
    with pytest.raises(ValueError, match="shape"):
        store.upsert(["x"], np.ones((1, DIM + 1), dtype=np.float32), [{}])


def test_delete_removes_points(store: VectorStore) -> None:
    store.delete(["a", "missing"])
    assert store.count() == len(ITEMS) - 1
    assert "a" not in _ids(store.search(QUERY, k=10, only_available=False))
    assert store.get_vectors(["a"]) == {}


def test_reopen_from_disk_keeps_points(factory: Factory, tmp_path: Path) -> None:
    first = factory(tmp_path)
    first.ensure_collection(DIM)
    first.upsert(ITEMS, VECTORS, PAYLOADS)
    first.set_available(["b"], False)
    first.close()
    second = factory(tmp_path)
    second.ensure_collection(DIM)
    try:
        assert second.count() == len(ITEMS)
        assert _ids(second.search(QUERY, k=10)) == ["a", "c", "e"]
    finally:
        second.close()


def test_optimize_keeps_results(store: VectorStore) -> None:
    store.optimize()
    assert _ids(store.search(QUERY, k=10)) == ["a", "b", "c", "e"]


def test_client_rejects_a_collection_of_another_dim(tmp_path: Path) -> None:
    first = ClientVectorStore(collection="items", path=str(tmp_path))
    first.ensure_collection(DIM)
    first.close()
    second = ClientVectorStore(collection="items", path=str(tmp_path))
    try:
        with pytest.raises(VectorStoreError, match="dim"):
            second.ensure_collection(DIM * 2)
    finally:
        second.close()


def test_edge_rejects_a_store_of_another_dim(tmp_path: Path) -> None:
    second = EdgeVectorStore(_written_edge_store(tmp_path / "edge"))
    with pytest.raises(VectorStoreError, match="dim"):
        second.ensure_collection(DIM * 2)


def test_unopened_edge_store_says_so(tmp_path: Path) -> None:
    with pytest.raises(VectorStoreError, match="ensure_collection"):
        EdgeVectorStore(tmp_path).count()


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_edge_search_threads_change_no_result(tmp_path: Path, threads: int) -> None:
    store = EdgeVectorStore(tmp_path / "edge", search_threads=threads)
    store.ensure_collection(DIM)
    store.upsert(ITEMS, VECTORS, PAYLOADS)
    queries = np.stack([QUERY, _basis(3, tilt=0.5), _basis(5, tilt=2.0)])
    batch = store.search_batch(queries, k=3, exclude_ids=[{"a"}, set(), {"b", "c"}])
    assert [_ids(hits) for hits in batch] == [
        _ids(store.search(q, k=3, exclude_ids=ex))
        for q, ex in zip(queries, [{"a"}, set(), {"b", "c"}], strict=True)
    ]
    assert _ids(batch[0]) == ["b", "c", "e"]
    store.close()


def test_build_store_passes_the_search_threads(tmp_path: Path) -> None:
    from schemas.settings import StoreSettings
    from workers.store_versions import build_store

    settings = StoreSettings(kind="edge", path=tmp_path, search_threads=2)
    store = build_store(settings, DIM, model=MODEL_A)
    assert isinstance(store, EdgeVectorStore)
    assert store.search_threads == 2
    store.close()
    with pytest.raises(ValueError, match="search_threads"):
        StoreSettings(search_threads=-1)


# -- model versions ------------------------------------------------------------------------------

MODEL_A = ModelIdentity("all-MiniLM-L6-v2", "aaaaaaaaaaaa")
MODEL_B = ModelIdentity("all-MiniLM-L6-v2+adapter", "bbbbbbbbbbbb")
# Model B places the items in the opposite order around the query: a, b, c, e under A and
# e, c, b, a under B (d is unavailable), so a search tells which version answered.
VECTORS_B = VECTORS[::-1].copy()
ORDER_A = ["a", "b", "c", "e"]
ORDER_B = ["e", "c", "b", "a"]

VersionsFactory = Callable[[Path], StoreVersions]


def _edge_versions(path: Path) -> StoreVersions:
    return EdgeVersions(path / "edge", "items")


def _client_versions(path: Path) -> StoreVersions:
    from qdrant_client import QdrantClient

    return ClientVersions(QdrantClient(path=str(path / "client")), "items")


@pytest.fixture(params=[_client_versions, _edge_versions], ids=["client-local", "edge"])
def versions_factory(request: pytest.FixtureRequest) -> VersionsFactory:
    f: VersionsFactory = request.param
    return f


@pytest.fixture
def versions(versions_factory: VersionsFactory, tmp_path: Path) -> Iterator[StoreVersions]:
    v = versions_factory(tmp_path)
    yield v
    v.close()


def _build(versions: StoreVersions, model: ModelIdentity, vectors: np.ndarray) -> VectorStore:
    store = versions.open(DIM, model)
    store.upsert(ITEMS, vectors, PAYLOADS)
    return store


def test_every_vector_carries_its_model_identity(versions: StoreVersions) -> None:
    store = _build(versions, MODEL_A, VECTORS)
    payloads = store.get_payloads(ITEMS)
    assert {(p["model_name"], p["model_version"]) for p in payloads.values()} == {
        (MODEL_A.name, MODEL_A.version)
    }
    assert store.model == MODEL_A
    store.close()


def test_a_version_refuses_vectors_of_another_model(versions: StoreVersions) -> None:
    _build(versions, MODEL_A, VECTORS).close()
    # B opening A's collection (as a worker whose adapter changed, with the same dim, did
    # before versions): refused, naming both versions.
    if isinstance(versions, EdgeVersions):
        other: VectorStore = EdgeVectorStore(versions.root / "items--aaaaaaaaaaaa", model=MODEL_B)
    else:
        assert isinstance(versions, ClientVersions)
        other = ClientVectorStore(
            collection="items--aaaaaaaaaaaa", client=versions.client, owns_client=False
        )
        other.model = MODEL_B
    with pytest.raises(ModelMismatchError, match=r"aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        other.ensure_collection(DIM)


def test_first_start_makes_the_loaded_model_current(versions: StoreVersions) -> None:
    assert versions.current() is None
    with pytest.raises(NoVersionError, match="no version yet"):
        open_current(versions, DIM, None)
    store = open_current(versions, DIM, MODEL_A)
    assert versions.current() == MODEL_A
    assert versions.previous() is None
    store.upsert(ITEMS, VECTORS, PAYLOADS)
    assert _ids(store.search(QUERY, k=10)) == ORDER_A
    store.close()


def test_a_new_version_is_built_beside_the_serving_one_then_switched(
    versions: StoreVersions,
) -> None:
    serving = open_current(versions, DIM, MODEL_A)
    serving.upsert(ITEMS, VECTORS, PAYLOADS)
    building = _build(versions, MODEL_B, VECTORS_B)
    # Building B changes neither what serves nor the pointer.
    assert _ids(serving.search(QUERY, k=10)) == ORDER_A
    assert versions.current() == MODEL_A
    assert _ids(building.search(QUERY, k=10)) == ORDER_B
    building.close()

    assert versions.switch(MODEL_B) == MODEL_A
    assert (versions.current(), versions.previous()) == (MODEL_B, MODEL_A)
    # A process that opened A before the switch keeps searching A: it never mixes in B.
    assert _ids(serving.search(QUERY, k=10)) == ORDER_A
    np.testing.assert_allclose(serving.get_vectors(["a"])["a"], VECTORS[0], atol=1e-6)
    serving.close()

    # A process still loading model A is refused, with both versions and the fix named.
    with pytest.raises(ModelMismatchError) as refused:
        open_current(versions, DIM, MODEL_A)
    message = str(refused.value)
    assert MODEL_A.version in message and MODEL_B.version in message
    assert "relata reindex" in message and "relata rollback" in message
    restarted = open_current(versions, DIM, MODEL_B)
    assert _ids(restarted.search(QUERY, k=10)) == ORDER_B
    restarted.close()
    assert versions.versions() == [MODEL_A, MODEL_B]


def test_rollback_is_one_call_and_can_be_undone(versions: StoreVersions) -> None:
    _build(versions, MODEL_A, VECTORS).close()
    versions.switch(MODEL_A)
    with pytest.raises(VectorStoreError, match="no previous version"):
        versions.rollback()
    _build(versions, MODEL_B, VECTORS_B).close()
    versions.switch(MODEL_B)

    assert versions.rollback() == MODEL_A
    assert (versions.current(), versions.previous()) == (MODEL_A, MODEL_B)
    store = open_current(versions, DIM, MODEL_A)
    assert _ids(store.search(QUERY, k=10)) == ORDER_A
    store.close()
    assert versions.rollback() == MODEL_B
    assert (versions.current(), versions.previous()) == (MODEL_B, MODEL_A)


def test_switching_to_a_version_never_built_is_refused(versions: StoreVersions) -> None:
    _build(versions, MODEL_A, VECTORS).close()
    versions.switch(MODEL_A)
    with pytest.raises(VectorStoreError, match="relata reindex"):
        versions.switch(MODEL_B)
    assert versions.current() == MODEL_A


def test_the_pointer_outlives_the_process(
    versions_factory: VersionsFactory, tmp_path: Path
) -> None:
    first = versions_factory(tmp_path)
    _build(first, MODEL_A, VECTORS).close()
    _build(first, MODEL_B, VECTORS_B).close()
    first.switch(MODEL_A)
    first.switch(MODEL_B)
    first.close()
    second = versions_factory(tmp_path)
    try:
        assert (second.current(), second.previous()) == (MODEL_B, MODEL_A)
    finally:
        second.close()


def test_client_refuses_a_plain_collection_under_the_pointers_name(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(tmp_path))
    legacy = ClientVectorStore(collection="items", client=client, owns_client=False)
    legacy.ensure_collection(DIM)
    versions = ClientVersions(client, "items")
    try:
        with pytest.raises(VectorStoreError, match="plain collection"):
            open_current(versions, DIM, MODEL_A)
    finally:
        versions.close()
