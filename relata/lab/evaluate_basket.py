"""Basket completion evaluation (`relata evaluate --task basket`) with the live code.

Protocol: each user's last purchase basket is held out; the streaming statistics are built by
folding every other event, in time order, through `streams.profile.fold_event` and
`streams.association.AssociationIndex` (exactly what the live agents run). For each held-out
basket with >= 2 distinct items, each item in turn is hidden and ranked among all catalog items
(the other basket items excluded) from the rest of the basket:

- `similar`: sum of MiniLM cosines to the rest of the basket (`workers/encoder.py`,
  `workers/item_text.py`; embeddings cached under the encoder's cache dir).
- `bought_together`: sum of the live related-items scores (`bought_together` kind) of the
  rest of the basket's items.
- `blend`: mean bought-together score + `blend_lambda` x mean cosine. Association evidence
  dominates where it exists; similarity orders the rest and covers items without behaviour.

Then batch association rules are mined with mlxtend FP-growth on the same training baskets, and
the top-100 pairs by lift are compared with the streaming statistics' top-100.

Baskets: `session_id` where the data has one; otherwise the fold's time window; when that
yields almost no multi-item baskets (amazon-beauty: synthetic one-day steps), consecutive
chunks of `chunk_size` events of a user form a basket (given to the fold as session ids).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from relata.lab.datasets import load_events, load_items
from relata.lab.eval_metrics import hit_at, ndcg_at
from relata.lab.vectors import cached_encode
from schemas.messages import BehaviorEvent
from schemas.settings import EncoderSettings, StreamsSettings
from streams.association import AssociationConfig, decayed
from streams.neighbours import AssociationIndex, association_evidence, item_count
from streams.profile import FoldConfig, fold_event, purchase_types

logger = logging.getLogger(__name__)

METHODS = ("similar", "bought_together", "blend")
# Fewer multi-item held-out baskets than this under the time window: fall back to chunks.
_MIN_WINDOW_BASKETS = 10


class BasketEvaluationError(RuntimeError):
    """The data cannot be evaluated as baskets (explains why)."""


def assign_baskets(
    events: Sequence[BehaviorEvent], *, window_s: float, chunk_size: int
) -> tuple[list[BehaviorEvent], str]:
    """Give every event a basket id (as `session_id`) and say how baskets were defined.

    Returns (events with session ids, definition). Events keep their own `session_id`; for
    events without one, a user's events within `window_s` of the previous one share a basket.
    """
    if any(e.session_id is not None for e in events):
        return list(events), "session_id"
    windowed = _window_baskets(events, window_s=window_s)
    sizes: dict[str, set[str]] = defaultdict(set)
    last: dict[str, str] = {}
    for e in windowed:
        if e.event_type in purchase_types() and e.session_id is not None:
            sizes[e.session_id].add(e.item_id)
            last[e.user_id] = e.session_id
    multi = sum(1 for s in last.values() if len(sizes[s]) >= 2)
    if multi >= _MIN_WINDOW_BASKETS:
        return windowed, f"time window {window_s:g} s"
    counters: dict[str, int] = defaultdict(int)
    chunked = []
    for e in events:
        n = counters[e.user_id]
        counters[e.user_id] += 1
        chunked.append(e.model_copy(update={"session_id": f"{e.user_id}#c{n // chunk_size}"}))
    return chunked, f"chunks of {chunk_size} events per user"


def _window_baskets(events: Sequence[BehaviorEvent], *, window_s: float) -> list[BehaviorEvent]:
    out = []
    last_ts: dict[str, float] = {}
    index: dict[str, int] = defaultdict(int)
    for e in events:
        ts = e.ts.timestamp()
        prev = last_ts.get(e.user_id)
        if prev is not None and ts - prev > window_s:
            index[e.user_id] += 1
        last_ts[e.user_id] = ts
        out.append(e.model_copy(update={"session_id": f"{e.user_id}#w{index[e.user_id]}"}))
    return out


def split_last_baskets(
    events: Sequence[BehaviorEvent],
) -> tuple[list[BehaviorEvent], dict[str, list[str]]]:
    """Hold out each user's last purchase basket; returns (training events, held-out baskets
    as distinct items in order). Training keeps every event outside the held-out baskets."""
    last: dict[str, tuple[float, str]] = {}
    for e in events:
        if e.event_type in purchase_types() and e.session_id is not None:
            key = (e.ts.timestamp(), e.session_id)
            if e.user_id not in last or key[0] >= last[e.user_id][0]:
                last[e.user_id] = key
    held = {(user, sid) for user, (_, sid) in last.items()}
    train: list[BehaviorEvent] = []
    baskets: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if (e.user_id, e.session_id) in held:
            if e.event_type in purchase_types() and e.item_id not in baskets[e.user_id]:
                baskets[e.user_id].append(e.item_id)
        else:
            train.append(e)
    return train, dict(baskets)


def training_baskets(events: Iterable[BehaviorEvent]) -> list[list[str]]:
    """Distinct purchased items per (user, session) of the training events (for FP-growth)."""
    baskets: dict[tuple[str, str | None], dict[str, None]] = defaultdict(dict)
    for e in events:
        if e.event_type in purchase_types():
            baskets[(e.user_id, e.session_id)][e.item_id] = None
    return [list(b) for b in baskets.values()]


def stream_statistics(
    events: Sequence[BehaviorEvent],
    *,
    fold_config: FoldConfig,
    configs: Mapping[str, AssociationConfig],
    progress: bool = True,
) -> tuple[dict[str, AssociationIndex], dict[str, float]]:
    """Fold the events in time order with the live code; one index per association config.

    Returns the indexes and, per index, the wall seconds of folding plus its updates.
    """
    from tqdm import tqdm

    indexes = {name: AssociationIndex(cfg) for name, cfg in configs.items()}
    seconds = dict.fromkeys(indexes, 0.0)
    fold_seconds = 0.0
    profiles: dict[str, Any] = {}
    clock = time.perf_counter
    for event in tqdm(events, desc="stream", unit="ev", disable=not progress, mininterval=2):
        t0 = clock()
        result = fold_event(profiles.get(event.user_id), event, fold_config)
        profiles[event.user_id] = result.profile
        t1 = clock()
        fold_seconds += t1 - t0
        for name, index in indexes.items():
            index.observe_event(result, event)
            t2 = clock()
            seconds[name] += t2 - t1
            t1 = t2
    return indexes, {name: fold_seconds + s for name, s in seconds.items()}


def association_matrix(index: AssociationIndex, vocab: Mapping[str, int]) -> sparse.csr_matrix:
    """Row i: the live `bought_together` scores of item i's partners (catalog columns)."""
    rows, cols, vals = [], [], []
    for item_id in index.items:
        i = vocab.get(item_id)
        if i is None:
            continue
        for partner, score in index.scores(item_id, kind="bought_together").items():
            j = vocab.get(partner)
            if j is not None:
                rows.append(i)
                cols.append(j)
                vals.append(score)
    n = len(vocab)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n, n), dtype=np.float64)


def _rank(scores: np.ndarray, target: int) -> int:
    """Expected 1-based rank of `target` under random tie-breaking (floored)."""
    value = scores[target]
    greater = int(np.count_nonzero(scores > value))
    ties = int(np.count_nonzero(scores == value)) - 1
    return 1 + greater + ties // 2


def score_baskets(
    baskets: Sequence[Sequence[int]],
    *,
    vectors: np.ndarray,
    assoc: sparse.csr_matrix,
    k: int,
    blend_lambda: float,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Hide each item of each basket in turn; HR@k and NDCG@k per method."""
    from tqdm import tqdm

    sums = {m: [0.0, 0.0] for m in METHODS}
    queries = 0
    for basket in tqdm(baskets, desc="rank", unit="basket", disable=not progress, mininterval=2):
        idx = np.asarray(basket)
        rest_n = len(idx) - 1
        cos = vectors @ vectors[idx].T  # (items, m): cosine of every item to each basket item
        cos_total = cos.sum(axis=1)
        rows = assoc[idx].toarray()  # (m, items)
        assoc_total = rows.sum(axis=0)
        for pos, target in enumerate(idx):
            sim = (cos_total - cos[:, pos]) / rest_n
            bt = (assoc_total - rows[pos]) / rest_n
            blend = bt + blend_lambda * sim
            others = np.delete(idx, pos)
            for name, scores in (("similar", sim), ("bought_together", bt), ("blend", blend)):
                scores = scores.copy()
                scores[others] = -np.inf
                rank = _rank(scores, int(target))
                sums[name][0] += hit_at(rank, k)
                sums[name][1] += ndcg_at(rank, k)
            queries += 1
    return {
        m: {"hr": s[0] / max(queries, 1), "ndcg": s[1] / max(queries, 1), "queries": queries}
        for m, s in sums.items()
    }


def fpgrowth_pairs(
    baskets: Sequence[Sequence[str]], *, min_support: float
) -> tuple[list[tuple[frozenset[str], float]], int, float]:
    """Pair rules by FP-growth (mlxtend); returns (pairs with lift, number of rules, seconds)."""
    import pandas as pd
    from mlxtend.frequent_patterns import association_rules, fpgrowth
    from mlxtend.preprocessing import TransactionEncoder

    start = time.perf_counter()
    encoder = TransactionEncoder()
    onehot = encoder.fit(baskets).transform(baskets, sparse=True)
    frame = pd.DataFrame.sparse.from_spmatrix(onehot, columns=encoder.columns_)
    itemsets = fpgrowth(frame, min_support=min_support, use_colnames=True, max_len=2)
    pairs_only = itemsets[itemsets["itemsets"].map(len) == 2]
    if pairs_only.empty:
        return [], 0, time.perf_counter() - start
    rules = association_rules(itemsets, metric="lift", min_threshold=0.0)
    seconds = time.perf_counter() - start
    best: dict[frozenset[str], float] = {}
    for ante, cons, lift in zip(
        rules["antecedents"], rules["consequents"], rules["lift"], strict=True
    ):
        best[frozenset(ante) | frozenset(cons)] = float(lift)
    return sorted(best.items(), key=lambda p: -p[1]), len(rules), seconds


def streaming_pairs(
    index: AssociationIndex, *, min_support: float
) -> list[tuple[frozenset[str], float]]:
    """Unordered `bought_together` pairs with relative support >= min_support, by lift."""
    totals = index.totals
    if totals is None:
        return []
    h = index.config.half_life_s
    now = index.last_ts
    total = decayed(totals, totals["counts"].get("bought_together", 0.0), now, h)
    if total <= 0:
        return []
    out: dict[frozenset[str], float] = {}
    for item_id, record in index.items.items():
        partners = record["partners"].get("bought_together", {})
        errors = record["errors"].get("bought_together", {})
        count_i = item_count(record, "bought_together", now, h)
        for partner, count in partners.items():
            lower = decayed(record, count - errors.get(partner, 0.0), now, h)
            if lower / total < min_support:
                continue
            count_j = item_count(index.items.get(partner), "bought_together", now, h)
            evidence = association_evidence(lower, count_i, count_j, total)
            pair = frozenset((item_id, partner))
            if evidence.lift is not None and len(pair) == 2:
                out[pair] = max(out.get(pair, 0.0), evidence.lift)
    return sorted(out.items(), key=lambda p: -p[1])


def _overlap(
    a: Sequence[tuple[frozenset[str], float]], b: Sequence[tuple[frozenset[str], float]], n: int
) -> float:
    top_a = {p for p, _ in a[:n]}
    top_b = {p for p, _ in b[:n]}
    return len(top_a & top_b) / max(1, min(n, len(top_a), len(top_b)))


def run_basket(
    data_dir: Path,
    *,
    k: int = 10,
    json_out: Path | None = None,
    max_baskets: int | None = None,
    chunk_size: int = 3,
    blend_lambda: float = 0.05,
    fp_min_support: float = 0.01,
    streams_settings: StreamsSettings | None = None,
    encoder_settings: EncoderSettings | None = None,
    encoder: Any = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Basket completion: similar vs bought_together vs blend, plus FP-growth comparison."""
    streams_settings = streams_settings or StreamsSettings()
    encoder_settings = encoder_settings or EncoderSettings()
    fold_config = FoldConfig.from_settings(streams_settings)
    live = AssociationConfig.from_settings(streams_settings)
    # The same statistics without decay isolate the bounded-memory approximation vs. batch.
    no_decay = AssociationConfig(
        half_life_s=1e15,
        top_n=live.top_n,
        capacity=live.capacity,
        min_support=live.min_support,
        republish_change=live.republish_change,
    )
    started = time.perf_counter()
    items = load_items(data_dir)
    events, definition = assign_baskets(
        load_events(data_dir),
        window_s=fold_config.session_window_s,
        chunk_size=chunk_size,
    )
    train, held = split_last_baskets(events)
    vocab = {item.item_id: i for i, item in enumerate(items)}
    baskets = [[vocab[i] for i in b if i in vocab] for _, b in sorted(held.items()) if len(b) >= 2]
    baskets = [b for b in baskets if len(b) >= 2]
    if max_baskets is not None and len(baskets) > max_baskets:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(baskets), size=max_baskets, replace=False).tolist())
        baskets = [baskets[i] for i in chosen]
    if not baskets:
        msg = f"{data_dir}: no held-out basket with >= 2 catalog items (baskets: {definition})"
        raise BasketEvaluationError(msg)
    logger.info(
        "basket split definition=%r train_events=%d held_out=%d evaluated=%d",
        definition,
        len(train),
        len(held),
        len(baskets),
    )

    indexes, stream_times = stream_statistics(
        train,
        fold_config=fold_config,
        configs={"live": live, "no_decay": no_decay},
        progress=progress,
    )
    index = indexes["live"]
    stream_seconds = stream_times["live"]

    if encoder is None:
        from workers.encoder import TransformerEncoder

        encoder = TransformerEncoder.from_settings(encoder_settings)
    from workers.item_text import item_text

    vectors = cached_encode(
        [item_text(item) for item in items],
        encoder=encoder,
        cache_dir=encoder_settings.cache_dir,
        label="items",
    ).astype(np.float32)
    assoc = association_matrix(index, vocab)
    methods = score_baskets(
        baskets, vectors=vectors, assoc=assoc, k=k, blend_lambda=blend_lambda, progress=progress
    )

    train_baskets = training_baskets(train)
    batch, n_rules, fp_seconds = fpgrowth_pairs(train_baskets, min_support=fp_min_support)
    stream_live = streaming_pairs(index, min_support=fp_min_support)
    stream_exact = streaming_pairs(indexes["no_decay"], min_support=fp_min_support)
    report: dict[str, Any] = {
        "task": "basket",
        "data": str(data_dir),
        "k": k,
        "basket_definition": definition,
        "train_events": len(train),
        "train_baskets": len(train_baskets),
        "baskets": len(baskets),
        "blend_lambda": blend_lambda,
        "methods": methods,
        "fpgrowth": {
            "min_support": fp_min_support,
            "rules": n_rules,
            "pairs": len(batch),
            "top100_overlap": _overlap(batch, stream_live, 100),
            "top100_overlap_no_decay": _overlap(batch, stream_exact, 100),
            "seconds": round(fp_seconds, 3),
        },
        "streaming_seconds": round(stream_seconds, 3),
        "streaming_events_per_s": round(len(train) / stream_seconds, 1) if stream_seconds else None,
        "state_partner_entries": index.state_size(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(format_report(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """A readable table of the basket report."""
    k = report["k"]
    lines = [
        f"basket completion on {report['data']} ({report['basket_definition']}): "
        f"{report['baskets']} held-out baskets, "
        f"{next(iter(report['methods'].values()))['queries']} queries",
        f"{'method':<18}{'HR@' + str(k):>10}{'NDCG@' + str(k):>10}",
    ]
    for name, m in report["methods"].items():
        lines.append(f"{name:<18}{m['hr']:>10.4f}{m['ndcg']:>10.4f}")
    fp = report["fpgrowth"]
    lines += [
        "",
        f"{'association rules':<26}{'pairs/rules':>12}{'seconds':>10}",
        f"{'streaming (live code)':<26}{report['train_events']:>12}"
        f"{report['streaming_seconds']:>10.1f}   (events folded)",
        f"{'FP-growth, min_sup ' + format(fp['min_support'], 'g'):<26}{fp['rules']:>12}"
        f"{fp['seconds']:>10.1f}",
        f"top-100 pairs by lift, overlap with FP-growth: {fp['top100_overlap']:.2f} "
        f"(decayed, live), {fp['top100_overlap_no_decay']:.2f} (same code without decay)",
    ]
    return "\n".join(lines)
