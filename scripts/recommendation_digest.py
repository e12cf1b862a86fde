"""A digest of the live recommender's answers for a fixed, offline replay of a data set.

Every event is folded in time order with the stream processor's own fold (profiles and
association statistics), every item is encoded and stored in an embedded vector store (exact
search: no HNSW index is built, so the answer does not depend on index construction), and the
live recommender ranks every user's final profile in fixed batches. The digest hashes, per
user, the ids, order and rounded scores of the published items; two versions of the code that
print the same digest answer every user alike.

    python scripts/recommendation_digest.py data/online-retail [--users N] [--dump FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relata.lab.datasets import load_events, load_items
from relata.lab.vectors import cached_encode
from schemas.settings import EncoderSettings, RecommenderSettings, StreamsSettings
from streams.association import AssociationConfig
from streams.neighbours import AssociationIndex
from streams.profile import FoldConfig, fold_event
from workers.edge_store import EdgeVectorStore
from workers.encoder import TransformerEncoder
from workers.indexer import item_payload
from workers.item_text import item_text
from workers.metrics import WorkerMetrics
from workers.micro_batch import PendingUser, RecommenderTopics
from workers.recommender import Recommender

BATCH = 64
# A fixed publication time: sizes do not depend on the clock.
NOW = datetime(2024, 1, 1, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--users", type=int, default=None, help="first N users by id")
    parser.add_argument("--dump", type=Path, default=None, help="write every answer as JSONL")
    parser.add_argument(
        "--sizes", action="store_true", help="report the published records' sizes in bytes"
    )
    args = parser.parse_args()

    from prometheus_client import CollectorRegistry

    from schemas.messages import ProfileUpdate

    items = load_items(args.data)
    events = sorted(load_events(args.data), key=lambda e: (e.ts, e.event_id))
    streams = StreamsSettings()
    fold_config = FoldConfig.from_settings(streams)
    index = AssociationIndex(AssociationConfig.from_settings(streams))
    profiles: dict[str, Any] = {}
    for event in events:
        result = fold_event(profiles.get(event.user_id), event, fold_config)
        profiles[event.user_id] = result.profile
        index.observe_event(result, event)

    encoder_settings = EncoderSettings()
    encoder = TransformerEncoder.from_settings(encoder_settings)
    matrix = cached_encode(
        [item_text(i) for i in items],
        encoder=encoder,
        cache_dir=encoder_settings.cache_dir,
        label="items",
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeVectorStore(Path(tmp) / "items")
        store.ensure_collection(encoder.dim)
        store.upsert([i.item_id for i in items], matrix, [item_payload(i) for i in items])
        recommender = Recommender(
            consumer=_NoKafka(),
            related_consumer=None,
            producer=_NoKafka(),
            encoder=encoder,
            store=store,
            metrics=WorkerMetrics.create(CollectorRegistry()),
            topics=RecommenderTopics("p", "r", "o", "d"),
            settings=RecommenderSettings(),
        )
        for item in items:
            related = index.related(item.item_id)
            if related is not None:
                recommender.related.apply(item.item_id, related)
        users = sorted(u for u, p in profiles.items() if p.history)
        if args.users is not None:
            users = users[: args.users]
        digest = hashlib.sha256()
        sizes: list[int] = []
        bare: list[int] = []
        out = args.dump.open("w") if args.dump else None
        for start in range(0, len(users), BATCH):
            pending = []
            for user_id in users[start : start + BATCH]:
                p = profiles[user_id]
                update = ProfileUpdate(
                    user_id=user_id,
                    history=p.history,
                    last_event_type=p.history[0].last_event_type,
                    last_item_id=p.history[0].item_id,
                    trigger_event_ids=["digest"],
                    source_ts_ms=0,
                    updated_at=p.history[0].last_ts,
                )
                pending.append(PendingUser(update, ["digest"], 0))
            answers = recommender.answer(pending)
            for user, answer in zip(pending, answers, strict=True):
                ranked = answer.items
                row = [user.update.user_id, [[r.item_id, round(r.score, 6)] for r in ranked]]
                if args.sizes:
                    rec = recommender.message(user, answer, generated_at=NOW, now_ms=0.0)
                    sizes.append(len(rec.model_dump_json()))
                    # The record as published before it carried a pool and fallbacks.
                    bare.append(len(rec.model_dump_json(exclude={"pool", "fallbacks"})))
                line = json.dumps(row, separators=(",", ":"))
                digest.update(line.encode() + b"\n")
                if out:
                    out.write(line + "\n")
        if out:
            out.close()
        store.close()
    report: dict[str, Any] = {"data": str(args.data), "users": len(users)}
    report["sha256"] = digest.hexdigest()
    if args.sizes:
        report["bytes"] = {"with_pool": _quantiles(sizes), "without_pool": _quantiles(bare)}
    print(json.dumps(report))


def _quantiles(values: list[int]) -> dict[str, float]:
    """Median, 90th percentile and mean of record sizes."""
    ordered = sorted(values) or [0]
    return {
        "p50": float(ordered[len(ordered) // 2]),
        "p90": float(ordered[int(len(ordered) * 0.9)]),
        "mean": round(sum(ordered) / len(ordered), 1),
    }


class _NoKafka:
    """The recommender's Kafka collaborators: `recommend` never calls them."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"recommend() touched Kafka ({name})")


if __name__ == "__main__":
    main()
