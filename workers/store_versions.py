"""One collection of item vectors per model version, behind a pointer that switches atomically.

A version is the item vectors of one model (`ModelIdentity`), in a collection of its own named
`<collection>--<version>`. With a Qdrant server (or qdrant-client's local mode) the alias
`<collection>` names the current version and `<collection>--previous` the one before; one
`update_collection_aliases` call moves both. The embedded engine has no collections or aliases:
each version is a directory `<path>/<collection>--<version>` and the pointer is the JSON file
`<path>/<collection>.versions.json`, replaced by a rename.

Collections rather than named vectors in one collection: a Qdrant server cannot add a named
vector to an existing collection (only qdrant-edge can), and a version of its own is built,
optimised and dropped without touching the one that serves.

A process opens the current version by its collection name, not through the pointer: a switch
never changes what a running process searches (a vector read from one version is never
searched in another), and a process takes the new version when restarted with the new model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from schemas.settings import StoreSettings
from workers.client_store import ClientVectorStore
from workers.edge_store import EdgeVectorStore
from workers.vector_store import (
    MODEL_NAME,
    ModelIdentity,
    VectorStore,
    VectorStoreError,
    model_mismatch,
)

logger = logging.getLogger(__name__)

# Names a version whose model name was never recorded (a collection made by hand, say).
UNKNOWN_MODEL = "unknown model"


def version_collection(collection: str, version: str) -> str:
    """The collection (or edge directory) of `version`'s item vectors."""
    return f"{collection}--{version}"


class StoreVersions(Protocol):
    """The versions of one logical collection and its current/previous pointer."""

    collection: str

    def current(self) -> ModelIdentity | None: ...

    def previous(self) -> ModelIdentity | None: ...

    def versions(self) -> list[ModelIdentity]: ...

    def open(self, dim: int, model: ModelIdentity, *, own_client: bool = False) -> VectorStore:
        """The store of `model`'s version, created when absent; `own_client`: closing the
        store closes this object's client too (it is then not used again)."""
        ...

    def switch(self, model: ModelIdentity) -> ModelIdentity | None:
        """Make `model`'s (existing) version current; returns the one it replaced."""
        ...

    def rollback(self) -> ModelIdentity:
        """Swap current and previous; returns the new current."""
        ...

    def close(self) -> None: ...


class NoVersionError(VectorStoreError):
    """The store has no current version yet (the workers build the first one)."""


def _no_version(collection: str, model: ModelIdentity) -> VectorStoreError:
    return VectorStoreError(
        f"the vector store {collection} has no version of {model}: build it with "
        "`relata reindex` first"
    )


def _no_previous(collection: str) -> VectorStoreError:
    return VectorStoreError(
        f"the vector store {collection} has no previous version to roll back to "
        "(`relata model-versions` lists what it holds)"
    )


class EdgeVersions:
    """Versions of the embedded store: a directory per version, a JSON pointer beside them."""

    def __init__(
        self, root: Path, collection: str, *, hnsw_ef: int = 128, search_threads: int = 1
    ) -> None:
        self.root = Path(root)
        self.collection = collection
        self.hnsw_ef = hnsw_ef
        self.search_threads = search_threads
        self.pointer = self.root / f"{collection}.versions.json"

    def _dir(self, version: str) -> Path:
        return self.root / version_collection(self.collection, version)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The pointer's state under an exclusive lock (the workers' first start and
        `relata reindex` may write it at once); written back, atomically, if changed."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{self.collection}.versions.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                self._write(state)

    def _read(self) -> dict[str, Any]:
        if not self.pointer.is_file():
            return {"current": None, "previous": None, "models": {}}
        state: dict[str, Any] = json.loads(self.pointer.read_text(encoding="utf-8"))
        return state

    def _write(self, state: dict[str, Any]) -> None:
        # Readers see the old file or the new one, never a half-written one: a rename is atomic.
        tmp = self.pointer.with_name(f"{self.pointer.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _identity(self, state: dict[str, Any], version: str | None) -> ModelIdentity | None:
        if version is None:
            return None
        return ModelIdentity(str(state["models"].get(version, UNKNOWN_MODEL)), version)

    def current(self) -> ModelIdentity | None:
        state = self._read()
        return self._identity(state, state["current"])

    def previous(self) -> ModelIdentity | None:
        state = self._read()
        return self._identity(state, state["previous"])

    def versions(self) -> list[ModelIdentity]:
        state = self._read()
        prefix = version_collection(self.collection, "")
        found = sorted(
            p.name.removeprefix(prefix)
            for p in self.root.glob(f"{prefix}*")
            if p.is_dir() and any(p.iterdir())
        )
        return [ModelIdentity(str(state["models"].get(v, UNKNOWN_MODEL)), v) for v in found]

    def open(self, dim: int, model: ModelIdentity, *, own_client: bool = False) -> VectorStore:
        with self._locked() as state:
            state["models"][model.version] = model.name
        store = EdgeVectorStore(
            self._dir(model.version),
            hnsw_ef=self.hnsw_ef,
            search_threads=self.search_threads,
            model=model,
        )
        store.ensure_collection(dim)
        return store

    def switch(self, model: ModelIdentity) -> ModelIdentity | None:
        if not self._dir(model.version).is_dir():
            raise _no_version(str(self.root / self.collection), model)
        with self._locked() as state:
            replaced = self._identity(state, state["current"])
            if state["current"] != model.version:
                state["previous"], state["current"] = state["current"], model.version
            state["models"][model.version] = model.name
        return replaced

    def rollback(self) -> ModelIdentity:
        with self._locked() as state:
            previous = state["previous"]
            if previous is None or not self._dir(previous).is_dir():
                raise _no_previous(str(self.root / self.collection))
            state["previous"], state["current"] = state["current"], previous
            back = self._identity(state, previous)
        assert back is not None  # previous is not None here
        return back

    def close(self) -> None:
        """Nothing to release: each version's store is closed by its user."""


class ClientVersions:
    """Versions on a Qdrant server (or local mode): a collection per version, two aliases."""

    def __init__(
        self, client: Any, collection: str, *, url: str | None = None, hnsw_ef: int = 128
    ) -> None:
        from qdrant_client import models

        self._m = models
        self.client = client
        self.collection = collection
        self.url = url
        self.hnsw_ef = hnsw_ef
        self.previous_alias = f"{collection}--previous"

    def _aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def _identity(self, physical: str | None) -> ModelIdentity | None:
        if physical is None:
            return None
        version = physical.removeprefix(version_collection(self.collection, ""))
        metadata = self.client.get_collection(physical).config.metadata or {}
        return ModelIdentity(str(metadata.get(MODEL_NAME, UNKNOWN_MODEL)), version)

    def _current_collection(self, aliases: dict[str, str]) -> str | None:
        physical = aliases.get(self.collection)
        if physical is None and self.client.collection_exists(self.collection):
            msg = (
                f"{self.collection!r} is a plain collection, written before relata kept a "
                f"collection per model version; delete it (the workers rebuild the item vectors "
                f"from item-catalog into {version_collection(self.collection, '<version>')!r} "
                f"behind the alias {self.collection!r})"
            )
            raise VectorStoreError(msg)
        return physical

    def current(self) -> ModelIdentity | None:
        return self._identity(self._current_collection(self._aliases()))

    def previous(self) -> ModelIdentity | None:
        return self._identity(self._aliases().get(self.previous_alias))

    def versions(self) -> list[ModelIdentity]:
        prefix = version_collection(self.collection, "")
        names = sorted(
            c.name for c in self.client.get_collections().collections if c.name.startswith(prefix)
        )
        return [v for v in map(self._identity, names) if v is not None]

    def open(self, dim: int, model: ModelIdentity, *, own_client: bool = False) -> VectorStore:
        store = ClientVectorStore(
            collection=version_collection(self.collection, model.version),
            url=self.url,
            hnsw_ef=self.hnsw_ef,
            model=model,
            client=self.client,
            owns_client=own_client,
        )
        store.ensure_collection(dim)
        return store

    def _move(self, aliases: dict[str, str], current: str, previous: str | None) -> None:
        """Point both aliases in one request: a server applies it atomically."""
        m = self._m
        ops: list[Any] = [
            m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=name))
            for name in (self.collection, self.previous_alias)
            if name in aliases
        ]
        ops.append(
            m.CreateAliasOperation(
                create_alias=m.CreateAlias(collection_name=current, alias_name=self.collection)
            )
        )
        if previous is not None:
            ops.append(
                m.CreateAliasOperation(
                    create_alias=m.CreateAlias(
                        collection_name=previous, alias_name=self.previous_alias
                    )
                )
            )
        self.client.update_collection_aliases(change_aliases_operations=ops)

    def switch(self, model: ModelIdentity) -> ModelIdentity | None:
        physical = version_collection(self.collection, model.version)
        if not self.client.collection_exists(physical):
            raise _no_version(repr(self.collection), model)
        aliases = self._aliases()
        current = self._current_collection(aliases)
        if current != physical:
            self._move(aliases, physical, current)
        return self._identity(current)

    def rollback(self) -> ModelIdentity:
        aliases = self._aliases()
        previous = aliases.get(self.previous_alias)
        current = self._current_collection(aliases)
        if previous is None or current is None or not self.client.collection_exists(previous):
            raise _no_previous(repr(self.collection))
        self._move(aliases, previous, current)
        back = self._identity(previous)
        assert back is not None  # previous is not None here
        return back

    def close(self) -> None:
        self.client.close()


def build_versions(settings: StoreSettings) -> StoreVersions:
    """The versions of the store `settings` name."""
    if settings.kind == "edge":
        return EdgeVersions(
            settings.path,
            settings.collection,
            hnsw_ef=settings.hnsw_ef,
            search_threads=settings.search_threads,
        )
    from qdrant_client import QdrantClient

    if settings.kind == "local":
        client = QdrantClient(path=str(settings.path))
        return ClientVersions(client, settings.collection, hnsw_ef=settings.hnsw_ef)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    client = QdrantClient(url=settings.url, api_key=api_key)
    return ClientVersions(client, settings.collection, url=settings.url, hnsw_ef=settings.hnsw_ef)


def open_current(
    versions: StoreVersions, dim: int, model: ModelIdentity | None, *, own_client: bool = False
) -> VectorStore:
    """The current version, for a process that loaded `model` (its encoder), pinned: the
    process keeps it through later switches. Refuses a current version of another model
    (`ModelMismatchError`). A store with no version yet starts with `model`'s; `model` None (a
    reader that encodes nothing, such as the HTTP API's similar items) takes the current one.
    `own_client`: as for `StoreVersions.open`."""
    current = versions.current()
    if current is None:
        if model is None:
            msg = (
                f"the vector store {versions.collection} has no version yet: start the workers "
                "(they build the first) or run `relata reindex`"
            )
            raise NoVersionError(msg)
        store = versions.open(dim, model, own_client=own_client)
        versions.switch(model)
        logger.info("first store version collection=%s model=%s", versions.collection, model)
        return store
    if model is not None and current.version != model.version:
        raise model_mismatch(versions.collection, current, model)
    return versions.open(dim, current, own_client=own_client)


def build_store(settings: StoreSettings, dim: int, *, model: ModelIdentity | None) -> VectorStore:
    """The current version of the store `settings` name (see `open_current`)."""
    versions = build_versions(settings)
    try:
        return open_current(versions, dim, model, own_client=True)
    except BaseException:
        versions.close()
        raise
