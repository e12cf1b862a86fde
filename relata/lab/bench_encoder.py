"""The encoder's ceiling and the seed baseline, measured in the benchmark's own process before
the pipeline starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relata.lab.bench_report import json_safe, say
from relata.runtime.replay import iter_jsonl
from schemas.settings import EncoderSettings


def catalog_texts(data_dir: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Item ids, encoded texts (workers.item_text) and titles of the data set's catalog."""
    from schemas.decoding import Rejection, decode
    from schemas.messages import CatalogItem
    from workers.item_text import item_text

    ids, texts, titles = [], [], {}
    for _, raw in iter_jsonl(data_dir / "items.jsonl.gz"):
        item = decode(raw, CatalogItem)
        if isinstance(item, Rejection):
            continue
        ids.append(item.item_id)
        texts.append(item_text(item))
        titles[item.item_id] = item.title or item.item_id
    return ids, texts, titles


def measure_encoder(
    data_dir: Path, *, baseline: bool, baseline_events: int, baseline_seconds: float
) -> dict[str, Any]:
    """The encoder ceiling (texts/s) and, when asked, the seed baseline's rate and latency."""
    import numpy as np

    from relata.lab.seed_baseline import SeedRecommender, run_baseline
    from workers.encoder import TransformerEncoder, throughput_ceiling

    ids, texts, titles = catalog_texts(data_dir)
    settings = EncoderSettings()
    encoder = TransformerEncoder.from_settings(settings)
    say(f"encoder ceiling: encoding {len(texts)} catalog texts ({encoder.device}, {encoder.dtype})")
    ceiling = throughput_ceiling(encoder, texts)
    say(f"encoder ceiling: {ceiling:.0f} texts/s")
    out: dict[str, Any] = {
        "encoder_ceiling_texts_per_s": round(ceiling, 1),
        "encoder": {
            "device": str(encoder.device),
            "dtype": str(encoder.dtype),
            "batch_size": settings.batch_size,
            "texts": len(texts),
        },
    }
    if baseline:
        matrix = np.asarray(encoder.encode(texts), dtype=np.float32)
        seed = SeedRecommender(encoder.encode, item_ids=ids, item_matrix=matrix, titles=titles)
        say(f"seed baseline: up to {baseline_events} events or {baseline_seconds:.0f} s")
        lines = (raw for _, raw in iter_jsonl(data_dir / "events.jsonl.gz"))
        result = run_baseline(
            seed,
            lines,
            max_events=baseline_events,
            max_seconds=baseline_seconds,
            on_progress=lambda n, s: say(f"[seed] {n} events in {s:.0f} s ({n / s:.1f}/s)"),
        )
        out["baseline"] = {
            "kind": "seed (in-process, no Kafka, one user at a time)",
            "events": result.events,
            "achieved_rate": round(result.achieved_rate, 2),
            "latency_ms": json_safe(result.latency.summary()),
        }
        say(f"seed baseline: {result.achieved_rate:.1f} events/s")
    encoder.close()
    return out
