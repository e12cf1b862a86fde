"""The small interfaces the stream processor's parts receive from the composition root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kafkaio.producer import Headers
from schemas.messages import RelatedItem


class SimilarItems(Protocol):
    """Vector-similar items of a catalog item (the composition root injects one)."""

    def similar(
        self, item_id: str, *, k: int, categories: Sequence[str] | None
    ) -> list[RelatedItem] | None:
        """Up to k items (kind "similar", best first, cosine in the evidence); with
        `categories` (the item's own, from the catalog) only items of its category.
        None when the item is unknown to the vector store."""
        ...


class Sender(Protocol):
    """Where the agents' output records and the tables' changelogs go (Kafka in production,
    a list in unit tests)."""

    def produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Queue one record (`partition` None: by the key)."""
        ...

    async def flush(self) -> None:
        """Return once everything sent is acknowledged (raise if it cannot be)."""
        ...
