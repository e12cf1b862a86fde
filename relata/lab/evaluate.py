"""`relata evaluate`: offline next-item quality on a data set, with the live code paths.

Protocol (leave-one-out, full ranking): per user, events in time order; the target is the
user's last positive event (purchase; add_to_cart, then click, where a data set has none)
whose item the user had not interacted with before; everything before it is the history.
Histories are folded with `streams.profile.fold_event` and feed `streams.association` (the
targets never do); every method ranks with `workers.ranking.rank` over all catalog items,
history excluded. Vector hits are exact cosine over the item matrix with numpy (the same
top-`candidates` list the live recommender gets from Qdrant, without HNSW approximation).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from relata.lab.eval_metrics import (
    breakdown,
    bucket_by_edges,
    popularity_terciles,
    summarize,
    target_rank,
)
from schemas.messages import BehaviorEvent, CatalogItem, EventType, HistoryEntry, RelatedItems
from schemas.settings import EncoderSettings, StreamsSettings
from streams.association import AssociationConfig, AssociationIndex
from streams.profile import FoldConfig, fold_event
from workers.ranking import (
    BEHAVIOUR_KINDS,
    BlendWeights,
    RelatedTable,
    VectorRows,
    pooled_user_vector,
    popularity_prior,
    profile_text,
    rank,
)

logger = logging.getLogger(__name__)

HISTORY_EDGES = (1, 3, 6, 11, 21)
POSITIVE_ORDER: tuple[EventType, ...] = ("purchase", "add_to_cart", "click")
# Vector-search candidates per user, as RecommenderSettings.candidates.
DEFAULT_CANDIDATES = 100
# The seed's profile-text baseline: the user's last titles, encoded as one text. Its cost is
# one transformer pass per user over the whole text (17 of 21 minutes of a Beauty run at 10
# titles and 128 tokens); 5 titles cut at 64 tokens (most Beauty titles run 15-25 tokens, so
# about the last 3 titles in full) halve the tokens encoded.
PROFILE_TITLES = 5
PROFILE_MAX_TOKENS = 64

# Baseline weights: each isolates one signal of the same ranking function.
_OFF = {
    "vector": 0.0,
    "bought_together": 0.0,
    "also_bought": 0.0,
    "also_viewed": 0.0,
    "next_item": 0.0,
    "popularity": 0.0,
}
BASELINES: dict[str, dict[str, float]] = {
    "popularity": {**_OFF, "popularity": 1.0},
    # Item co-occurrence kNN: cosine of co-occurrence in baskets, sessions and histories,
    # summed over the user's recent items (same recency weighting as the hybrid's default).
    "cooccurrence": {**_OFF, "bought_together": 1.0, "also_bought": 1.0, "also_viewed": 1.0},
    "transitions": {**_OFF, "next_item": 1.0},
    "profile-text": {**_OFF, "vector": 1.0},
    "pooled": {**_OFF, "vector": 1.0},
}
DEFAULT_METHOD = "hybrid"


class EvaluationError(click.ClickException):
    """A data set or artifact cannot be evaluated (missing files, no usable users)."""


# ---------------------------------------------------------------------------------------------
# Data and protocol


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise EvaluationError(f"{data_dir} has no {stem}.jsonl[.gz]")


def load_items(data_dir: Path) -> list[CatalogItem]:
    return [CatalogItem.model_validate(row) for row in read_jsonl(_find(data_dir, "items"))]


def load_events(data_dir: Path) -> list[BehaviorEvent]:
    """All events, sorted by time (stable), invalid lines skipped with a count."""
    events: list[BehaviorEvent] = []
    bad = 0
    for row in read_jsonl(_find(data_dir, "events")):
        try:
            events.append(BehaviorEvent.model_validate(row))
        except ValueError:
            bad += 1
    if bad:
        logger.warning("skipped invalid events count=%d", bad)
    events.sort(key=lambda e: e.ts)
    return events


def positive_type(events: Sequence[BehaviorEvent]) -> EventType:
    """The strongest positive event type present: purchase, else add_to_cart, else click."""
    present = {e.event_type for e in events}
    for t in POSITIVE_ORDER:
        if t in present:
            return t
    raise EvaluationError(f"no positive events ({', '.join(POSITIVE_ORDER)}) in the data set")


@dataclass(frozen=True)
class Case:
    user_id: str
    target: str


@dataclass
class Split:
    """Targets and the events that may be learned from (histories only)."""

    cases: list[Case]
    history_events: list[BehaviorEvent]
    skipped: Counter[str] = field(default_factory=Counter)


def target_index(events: Sequence[BehaviorEvent], positive: EventType) -> int | None:
    """Index of the user's last positive event on an item not seen before it, or None."""
    first_seen: dict[str, int] = {}
    for n, e in enumerate(events):
        first_seen.setdefault(e.item_id, n)
    for n in range(len(events) - 1, 0, -1):
        e = events[n]
        if e.event_type == positive and first_seen[e.item_id] == n:
            return n
    return None


def split_users(events: Sequence[BehaviorEvent], *, positive: EventType, holdout: int = 1) -> Split:
    """Leave-one-out split. holdout=2 drops the final target first and takes the one before
    it (the internal validation split of `relata train`); its history never holds the
    evaluation target."""
    by_user: dict[str, list[BehaviorEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    cases: list[Case] = []
    kept: list[BehaviorEvent] = []
    skipped: Counter[str] = Counter()
    for user_id, seq in by_user.items():
        cut: int | None = len(seq)
        target: int | None = None
        usable = len(seq)  # events that may be learned from: before the first held-out target
        for n in range(holdout):
            target = target_index(seq[:cut], positive) if cut else None
            if target is None:
                break
            if n == 0 and holdout > 1:
                usable = target
            cut = target
        if target is None:
            skipped["no new positive target"] += 1
            # Their events before any held-out target still teach the statistics.
            kept.extend(seq[:usable])
            continue
        history = seq[:target]
        if not any(e.event_type != "return" for e in history):
            skipped["empty history"] += 1
            continue
        cases.append(Case(user_id=user_id, target=seq[target].item_id))
        kept.extend(history)
    kept.sort(key=lambda e: e.ts)
    return Split(cases=cases, history_events=kept, skipped=skipped)


@dataclass
class State:
    """What the live system would hold after the history events: profiles and associations."""

    profiles: dict[str, list[HistoryEntry]]
    index: AssociationIndex
    popularity: list[tuple[str, float]]
    item_counts: dict[str, float]
    _related: dict[str, RelatedItems | None] = field(default_factory=dict)
    _table: RelatedTable = field(default_factory=RelatedTable)

    def related(self, item_id: str) -> RelatedItems | None:
        if item_id not in self._related:
            found = self._related[item_id] = self.index.related(item_id)
            if found is not None:
                self._table.put(found)
        return self._related[item_id]

    def related_for(self, history: Sequence[HistoryEntry], max_sources: int) -> RelatedTable:
        """The related lists `rank` reads for this history (the table holds every list looked
        up so far; rank reads only the history's)."""
        for e in history[:max_sources]:
            self.related(e.item_id)
        return self._table


def build_state(
    events: Sequence[BehaviorEvent],
    settings: StreamsSettings,
    *,
    positive: EventType,
    popular_n: int = 300,
    progress: bool = True,
) -> State:
    """Fold events (time order) into profiles and association statistics with the live code."""
    fold_config = FoldConfig.from_settings(settings)
    index = AssociationIndex(AssociationConfig.from_settings(settings))
    profiles: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    it: Iterable[BehaviorEvent] = events
    if progress:
        from tqdm import tqdm

        it = tqdm(events, desc="fold histories", unit="ev", mininterval=1.0)
    for event in it:
        result = fold_event(profiles.get(event.user_id), event, fold_config)
        profiles[event.user_id] = result.profile
        index.observe_event(result, event)
        if event.event_type == positive:
            counts[event.item_id] += 1
    popular = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:popular_n]
    return State(
        profiles={u: list(p.history) for u, p in profiles.items()},
        index=index,
        popularity=[(i, float(c)) for i, c in popular],
        item_counts={i: float(c) for i, c in counts.items()},
    )


# ---------------------------------------------------------------------------------------------
# Vectors


def _texts_key(version: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(version.encode())
    for t in texts:
        digest.update(t.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def cached_encode(
    texts: Sequence[str], *, encoder: Any, cache_dir: Path, label: str, progress: bool = True
) -> np.ndarray:
    """Encode texts, cached on disk by model version + hash of the texts."""
    path = (
        cache_dir
        / f"{label}-{encoder.name.replace('/', '_')}-{_texts_key(encoder.version, texts)}.npy"
    )
    if path.is_file():
        arr = np.load(path)
        if arr.shape == (len(texts), encoder.dim):
            logger.info("embeddings from cache path=%s rows=%d", path, len(texts))
            return arr
    start = time.perf_counter()
    from tqdm import tqdm

    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    # Length-sorted over the whole set (the encoder sorts only within one call), so every
    # batch pads to about its own length; chunks keep the progress bar moving.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    step = 512
    with tqdm(total=len(texts), desc=f"encode {label}", unit="text", disable=not progress) as bar:
        for s in range(0, len(order), step):
            idx = order[s : s + step]
            out[idx] = encoder.encode([texts[i] for i in idx])
            bar.update(len(idx))
    logger.info(
        "encoded label=%s rows=%d seconds=%.1f", label, len(texts), time.perf_counter() - start
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def vector_hits(
    user_vectors: np.ndarray,
    item_matrix: np.ndarray,
    item_ids: Sequence[str],
    excluded: Sequence[Sequence[int]],
    *,
    top: int,
    batch: int = 512,
) -> list[list[tuple[str, float]]]:
    """Exact top-`top` cosine hits per user (rows of user_vectors; zero rows get none)."""
    out: list[list[tuple[str, float]]] = []
    top = min(top, item_matrix.shape[0])
    for s in range(0, user_vectors.shape[0], batch):
        u = user_vectors[s : s + batch]
        sims = u @ item_matrix.T
        for r, ex in enumerate(excluded[s : s + batch]):
            if ex:
                sims[r, list(ex)] = -np.inf
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        for r in range(sims.shape[0]):
            if not u[r].any():
                out.append([])
                continue
            idx = part[r][np.argsort(-sims[r, part[r]], kind="stable")]
            out.append([(item_ids[j], float(sims[r, j])) for j in idx if np.isfinite(sims[r, j])])
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class MethodResult:
    ranks: list[int | None]
    lists: list[list[str]]


def rank_users(
    *,
    cases: Sequence[Case],
    state: State,
    weights: BlendWeights,
    k: int,
    hits: Sequence[Sequence[tuple[str, float]]] | None,
    desc: str = "",
    progress: bool = True,
    user_vectors: np.ndarray | None = None,
    item_vectors: Mapping[str, np.ndarray] | None = None,
) -> MethodResult:
    """Rank every case's user with `workers.ranking.rank`; collect the target's rank."""
    needs_related = any(weights.kind_weight(kind) > 0 for kind in (*BEHAVIOUR_KINDS, "similar"))
    ranks: list[int | None] = []
    lists: list[list[str]] = []
    it: Iterable[tuple[int, Case]] = enumerate(cases)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(cases), desc=desc or "rank", unit="user", mininterval=1.0)
    prior = popularity_prior(state.popularity, weights)  # the same for every user
    for n, case in it:
        history = state.profiles[case.user_id]
        recs = rank(
            history=history,
            related=state.related_for(history, weights.max_sources) if needs_related else {},
            vector_hits=hits[n] if hits is not None and weights.vector > 0 else (),
            k=k,
            weights=weights,
            popularity=state.popularity,
            prior_of=prior,
            user_vector=None if user_vectors is None else user_vectors[n],
            candidate_vectors=item_vectors if user_vectors is not None else None,
        )
        ids = [r.item_id for r in recs]
        lists.append(ids)
        ranks.append(target_rank(ids, case.target))
    return MethodResult(ranks=ranks, lists=lists)


def ndcg(result: MethodResult, k: int) -> float:
    return summarize(result.ranks, k=k).ndcg


@dataclass
class Prepared:
    """Everything the methods share: split, state, item vectors, user vectors."""

    split: Split
    state: State
    item_ids: list[str]
    titles: dict[str, str]
    item_matrix: np.ndarray | None = None
    history_idx: list[list[int]] = field(default_factory=list)


def prepare(
    data_dir: Path,
    *,
    holdout: int = 1,
    settings: StreamsSettings | None = None,
    max_users: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Prepared:
    """Load a data set, split it and fold the histories."""
    items = load_items(data_dir)
    events = load_events(data_dir)
    positive = positive_type(events)
    known = {it.item_id for it in items}
    unknown = sum(1 for e in events if e.item_id not in known)
    if unknown:
        logger.warning("events on items missing from items.jsonl count=%d (dropped)", unknown)
        events = [e for e in events if e.item_id in known]
    split = split_users(events, positive=positive, holdout=holdout)
    if max_users is not None and len(split.cases) > max_users:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(split.cases), size=max_users, replace=False).tolist())
        split.cases = [split.cases[i] for i in keep]
    if not split.cases:
        raise EvaluationError(f"no user of {data_dir} has a usable target ({dict(split.skipped)})")
    state = build_state(
        split.history_events, settings or StreamsSettings(), positive=positive, progress=progress
    )
    item_ids = [it.item_id for it in items]
    pos = {i: n for n, i in enumerate(item_ids)}
    history_idx = [[pos[e.item_id] for e in state.profiles[c.user_id]] for c in split.cases]
    titles = {it.item_id: it.title for it in items if it.title}
    prepared = Prepared(
        split=split, state=state, item_ids=item_ids, titles=titles, history_idx=history_idx
    )
    prepared._items = items  # type: ignore[attr-defined]
    return prepared


def item_vectors(
    prepared: Prepared, *, encoder: Any, cache_dir: Path, progress: bool = True
) -> np.ndarray:
    from workers.item_text import item_text

    texts = [item_text(it) for it in prepared._items]  # type: ignore[attr-defined]
    return cached_encode(
        texts, encoder=encoder, cache_dir=cache_dir, label="items", progress=progress
    )


@dataclass
class VectorInputs:
    """Per-user vectors and exact hits, and the item matrix they were computed on."""

    users: np.ndarray
    hits: list[list[tuple[str, float]]]
    items: VectorRows


def pooled_inputs(
    prepared: Prepared, matrix: np.ndarray, weights: BlendWeights, *, top: int
) -> VectorInputs:
    """Pooled user vectors (live `pooled` user vector) and their exact top hits."""
    users = pooled_users(prepared, matrix, weights)
    hits = vector_hits(users, matrix, prepared.item_ids, prepared.history_idx, top=top)
    pos = {i: n for n, i in enumerate(prepared.item_ids)}
    return VectorInputs(users=users, hits=hits, items=VectorRows(matrix, pos))


def pooled_hits(
    prepared: Prepared, matrix: np.ndarray, weights: BlendWeights, *, top: int
) -> list[list[tuple[str, float]]]:
    """Vector hits from the pooled history vector of each user (live `pooled` user vector)."""
    return pooled_inputs(prepared, matrix, weights, top=top).hits


def pooled_users(prepared: Prepared, matrix: np.ndarray, weights: BlendWeights) -> np.ndarray:
    """One pooled history vector per case (zero rows where no history item has a vector)."""
    pos = {i: n for n, i in enumerate(prepared.item_ids)}
    users = np.zeros((len(prepared.split.cases), matrix.shape[1]), dtype=np.float32)
    for n, case in enumerate(prepared.split.cases):
        history = prepared.state.profiles[case.user_id]
        vecs = {e.item_id: matrix[pos[e.item_id]] for e in history[: weights.max_sources]}
        v = pooled_user_vector(
            history,
            vecs,
            recency=weights.pool_recency,
            weight_exponent=weights.weight_exponent,
            max_items=weights.max_sources,
        )
        if v is not None:
            users[n] = v
    return users


def _table(results: Mapping[str, Mapping[str, float]], k: int, default: str) -> str:
    lines = [
        f"{'method':<22}{'HR@' + str(k):>9}{'NDCG@' + str(k):>10}{'MRR@' + str(k):>9}{'coverage':>10}"
    ]
    for name, m in results.items():
        mark = " *" if name == default else ""
        lines.append(
            f"{name + mark:<22}{m['hr']:>9.4f}{m['ndcg']:>10.4f}{m['mrr']:>9.4f}{m['coverage']:>10.3f}"
        )
    return "\n".join(lines)


def _chart(path: Path, report: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    methods = list(report["methods"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    values = [report["methods"][m]["ndcg"] for m in methods]
    colors = ["tab:orange" if m == report["default"] else "tab:blue" for m in methods]
    ax1.bar(range(len(methods)), values, color=colors)
    ax1.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax1.set_ylabel(f"NDCG@{k}")
    ax1.set_title(f"{report.get('data', '')}: NDCG@{k} by method ({report['users']} users)")
    for x, v in enumerate(values):
        ax1.text(x, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    by_len = report["breakdowns"]["history_length"]
    for m in methods:
        buckets = list(by_len[m])
        ax2.plot(buckets, [by_len[m][b]["ndcg"] for b in buckets], marker="o", label=m)
    ax2.set_xlabel("history length (distinct items)")
    ax2.set_ylabel(f"NDCG@{k}")
    ax2.set_title("by history length")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate(
    data_dir: Path,
    *,
    k: int = 10,
    methods: Sequence[str] | None = None,
    adapter_path: Path | None = None,
    blend_path: Path | None = None,
    encoder_settings: EncoderSettings | None = None,
    streams_settings: StreamsSettings | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    max_users: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> dict[str, Any]:
    """Run the protocol for the chosen methods; returns the JSON-able report."""
    started = time.perf_counter()
    enc_settings = encoder_settings or EncoderSettings()
    prepared = prepare(data_dir, settings=streams_settings, max_users=max_users, progress=progress)
    cases = prepared.split.cases
    state = prepared.state
    echo(
        f"{data_dir.name}: {len(cases)} users evaluated, skipped {sum(prepared.split.skipped.values())} "
        f"({', '.join(f'{r}: {n}' for r, n in sorted(prepared.split.skipped.items())) or 'none'}); "
        f"{len(prepared.item_ids)} items; {len(prepared.split.history_events)} history events"
    )
    defaults = BlendWeights()
    fitted = BlendWeights.load(blend_path) if blend_path else None
    wanted = list(methods) if methods else [*BASELINES, "behaviour", DEFAULT_METHOD]
    if fitted is not None and not methods:
        wanted.append(f"{DEFAULT_METHOD}+blend")
    if adapter_path and not methods:
        wanted += ["pooled+adapter", f"{DEFAULT_METHOD}+adapter"]
    if "hybrid+blend" in wanted and fitted is None:
        raise EvaluationError(
            "method hybrid+blend needs --blend PATH (write one with `relata train`)"
        )
    unknown = [m for m in wanted if m not in _all_methods()]
    if unknown:
        raise EvaluationError(f"unknown methods {unknown}; valid: {sorted(_all_methods())}")

    needs_vectors = any(
        m in ("pooled", "profile-text") or "hybrid" in m or "adapter" in m for m in wanted
    )
    encoder = None
    matrix = None
    if needs_vectors:
        from workers.encoder import TransformerEncoder

        base_settings = enc_settings.model_copy(update={"adapter_path": None})
        encoder = TransformerEncoder.from_settings(base_settings)
        matrix = item_vectors(
            prepared, encoder=encoder, cache_dir=enc_settings.cache_dir, progress=progress
        )
    adapted = None
    if any("adapter" in m for m in wanted):
        if adapter_path is None:
            raise EvaluationError(
                "methods with +adapter need --adapter PATH (write one with `relata train`)"
            )
        from workers.adapter import load_adapter

        assert matrix is not None
        adapted = load_adapter(adapter_path).apply(matrix)

    results: dict[str, MethodResult] = {}
    hits_cache: dict[str, VectorInputs] = {}
    for name in wanted:
        weights, hits, vin = _method_inputs(
            name,
            prepared=prepared,
            defaults=defaults,
            fitted=fitted,
            matrix=matrix,
            adapted=adapted,
            encoder=encoder,
            cache_dir=enc_settings.cache_dir,
            candidates=candidates,
            hits_cache=hits_cache,
            progress=progress,
        )
        # Hybrids also score behaviour candidates with the language model (as the live
        # recommender does with the vectors it holds); pure vector baselines do not need it.
        hybrid_like = vin is not None and name.split("+")[0] not in BASELINES
        results[name] = rank_users(
            cases=cases,
            state=state,
            weights=weights,
            k=k,
            hits=hits,
            desc=name,
            progress=progress,
            user_vectors=vin.users if hybrid_like and vin is not None else None,
            item_vectors=vin.items if hybrid_like and vin is not None else None,
        )

    # The configuration the live system runs with these artifacts is the default.
    default = next(
        (
            m
            for m in (f"{DEFAULT_METHOD}+adapter", f"{DEFAULT_METHOD}+blend", DEFAULT_METHOD)
            if m in results
        ),
        wanted[-1],
    )
    summary = {
        name: summarize(
            r.ranks, k=k, recommended=r.lists, catalog_size=len(prepared.item_ids), mrr_cutoff=k
        )
        for name, r in results.items()
    }
    hist_groups = [bucket_by_edges(len(state.profiles[c.user_id]), HISTORY_EDGES) for c in cases]
    head, torso = popularity_terciles(list(state.item_counts.values()))

    def pop_group(item: str) -> str:
        c = state.item_counts.get(item, 0.0)
        return "head" if c >= head else "torso" if c >= torso else "tail" if c > 0 else "unseen"

    pop_groups = [pop_group(c.target) for c in cases]
    pop_order = {"head": 0, "torso": 1, "tail": 2, "unseen": 3}
    report: dict[str, Any] = {
        "data": data_dir.name,
        "k": k,
        "users": len(cases),
        "skipped": dict(prepared.split.skipped),
        "items": len(prepared.item_ids),
        "default": default,
        "methods": {
            name: {key: s.as_dict()[key] for key in ("hr", "ndcg", "mrr", "coverage")}
            for name, s in summary.items()
        },
        "breakdowns": {
            "history_length": {
                name: breakdown(
                    r.ranks, hist_groups, k=k, order=lambda b: float(b.split("-")[0].rstrip("+"))
                )
                for name, r in results.items()
            },
            "target_popularity": {
                name: breakdown(r.ranks, pop_groups, k=k, order=lambda g: pop_order[g])
                for name, r in results.items()
            },
        },
        "protocol": {
            "target": "last positive event on a new item per user; history = events before it",
            "ranking": "full catalog, history excluded; MRR truncated at k",
            "vector_search": f"exact cosine (numpy), top {candidates} candidates",
            "model": None
            if encoder is None
            else {"name": encoder.name, "version": encoder.version},
            "blend": str(blend_path) if blend_path else "defaults",
            "adapter": str(adapter_path) if adapter_path else None,
            "hybrid_weights": defaults.model_dump(exclude={"fitted_on"}),
            "fitted_weights": None if fitted is None else fitted.model_dump(),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    echo(_table(report["methods"], k, default))
    return report


def _all_methods() -> set[str]:
    return {
        *BASELINES,
        "behaviour",
        DEFAULT_METHOD,
        f"{DEFAULT_METHOD}+blend",
        "pooled+adapter",
        f"{DEFAULT_METHOD}+adapter",
    }


def _method_inputs(
    name: str,
    *,
    prepared: Prepared,
    defaults: BlendWeights,
    fitted: BlendWeights | None,
    matrix: np.ndarray | None,
    adapted: np.ndarray | None,
    encoder: Any,
    cache_dir: Path,
    candidates: int,
    hits_cache: dict[str, VectorInputs],
    progress: bool = True,
) -> tuple[BlendWeights, list[list[tuple[str, float]]] | None, VectorInputs | None]:
    if name == "behaviour":
        return defaults.model_copy(update={"vector": 0.0}), None, None
    base = name.split("+")[0]
    if base in BASELINES:
        weights = BlendWeights(**BASELINES[base])  # type: ignore[arg-type]
    elif name == DEFAULT_METHOD:
        weights = defaults
    else:  # hybrid+blend, hybrid+adapter: the fitted weights (the built-in ones without --blend)
        weights = fitted or defaults
    if name in ("popularity", "cooccurrence", "transitions"):
        return weights, None, None
    if name == "profile-text":
        assert matrix is not None and encoder is not None
        texts = [
            profile_text(
                prepared.state.profiles[c.user_id], prepared.titles, max_items=PROFILE_TITLES
            )
            for c in prepared.split.cases
        ]
        short = copy.copy(encoder)
        short.max_length = PROFILE_MAX_TOKENS
        users = cached_encode(
            texts,
            encoder=short,
            cache_dir=cache_dir,
            label=f"profiles-{PROFILE_MAX_TOKENS}tok",
            progress=progress,
        )
        users[[not t for t in texts]] = 0.0
        return (
            weights,
            vector_hits(users, matrix, prepared.item_ids, prepared.history_idx, top=candidates),
            None,
        )
    use = adapted if "adapter" in name else matrix
    assert use is not None
    key = f"{'adapted' if 'adapter' in name else 'base'}-{weights.pool_recency}-{weights.weight_exponent}-{weights.max_sources}"
    if key not in hits_cache:
        hits_cache[key] = pooled_inputs(prepared, use, weights, top=candidates)
    vin = hits_cache[key]
    return weights, vin.hits, vin


@click.command(name="evaluate")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="RELATA_EVAL_DATA",
    show_envvar=True,
    help="Data set directory (items/events .jsonl.gz).",
)
@click.option(
    "--k",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1000),
    envvar="RELATA_EVAL_K",
    show_envvar=True,
    help="Cut-off of HR/NDCG/MRR.",
)
@click.option(
    "--methods",
    default=None,
    envvar="RELATA_EVAL_METHODS",
    show_envvar=True,
    help="Comma-separated subset; default: every baseline, behaviour, hybrid (+adapter ones).",
)
@click.option(
    "--task",
    type=click.Choice(["next-item", "basket"]),
    default="next-item",
    show_default=True,
    envvar="RELATA_EVAL_TASK",
    show_envvar=True,
    help="next-item (this module) or basket completion.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_JSON",
    show_envvar=True,
    help="Write the report here (and a PNG beside it).",
)
@click.option(
    "--adapter",
    "adapter_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_ADAPTER",
    show_envvar=True,
    help="Adapter artifact (relata train).",
)
@click.option(
    "--blend",
    "blend_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_BLEND",
    show_envvar=True,
    help="Blend weights (relata train).",
)
@click.option(
    "--candidates",
    default=DEFAULT_CANDIDATES,
    show_default=True,
    type=click.IntRange(1, 10000),
    envvar="RELATA_EVAL_CANDIDATES",
    show_envvar=True,
    help="Vector-search candidates per user.",
)
@click.option(
    "--max-users",
    default=None,
    type=click.IntRange(1),
    envvar="RELATA_EVAL_MAX_USERS",
    show_envvar=True,
    help="Evaluate a seeded random sample of users (quick runs).",
)
@click.option("--no-progress", is_flag=True, default=False, help="Hide progress bars.")
def command(
    data_dir: Path,
    k: int,
    methods: str | None,
    task: str,
    json_out: Path | None,
    adapter_path: Path | None,
    blend_path: Path | None,
    candidates: int,
    max_users: int | None,
    no_progress: bool,
) -> None:
    """Offline next-item evaluation (leave-one-out, full ranking) with the live ranking code."""
    if task == "basket":
        from relata.lab.evaluate_basket import run_basket

        run_basket(data_dir=data_dir, k=k, json_out=json_out)
        return
    report = evaluate(
        data_dir,
        k=k,
        methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
        adapter_path=adapter_path,
        blend_path=blend_path,
        candidates=candidates,
        max_users=max_users,
        progress=not no_progress,
    )
    click.echo(f"default method: {report['default']}; {report['seconds']} s")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        png = json_out.with_suffix(".png")
        _chart(png, report)
        click.echo(f"wrote {json_out} and {png}")
