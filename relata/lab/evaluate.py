"""Offline next-item quality on a data set, with the live code paths: the methods and the loop.

Protocol (leave-one-out, full ranking; `relata.lab.protocol`): per user, events in time order;
the target is the user's last positive event (purchase; add_to_cart, then click, where a data
set has none) whose item the user had not interacted with before; everything before it is the
history. Histories are folded with `streams.profile.fold_event` and feed `streams.association`
(the targets never do); every method ranks with `workers.ranking.rank` over all catalog items,
history excluded. Vector hits are exact cosine over the item matrix with numpy (the same
top-`candidates` list the live recommender gets from Qdrant, without HNSW approximation).
The default method, `hybrid+fit` (`relata.lab.autofit`), is the recommender's own fit
procedure run on the training histories, ranked at the live MMR lambda.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from relata.lab import baselines
from relata.lab.autofit import FIT_METHOD, AutoFit, auto_fit
from relata.lab.datasets import EvaluationError
from relata.lab.eval_metrics import (
    breakdown,
    bucket_by_edges,
    popularity_terciles,
    summarize,
    target_rank,
)
from relata.lab.protocol import Case, Prepared, State, prepare
from relata.lab.report import breakdown_table, results_table
from relata.lab.vectors import (
    VectorInputs,
    cached_encode,
    item_vectors,
    pooled_inputs,
    vector_hits,
)
from schemas.fit_settings import FitSettings
from schemas.settings import EncoderSettings, RecommenderSettings, StreamsSettings
from workers.fitting import Evidence, ModelBundle, load_ranker, rank_offline
from workers.fitting.refit import user_encoder_step
from workers.ranking import (
    BlendWeights,
    Reranker,
    VectorRows,
    profile_text,
    strategy_weights,
)

# History length buckets (distinct items): 1, 2-3, 4-7, 8+. Sparse users are where the
# language model has to carry the ranking, so the first buckets are narrow.
HISTORY_EDGES = (1, 2, 4, 8)
# Vector-search candidates per user, as RecommenderSettings.candidates.
DEFAULT_CANDIDATES = 100
# The seed's profile-text baseline: the user's last titles, encoded as one text. Its cost is
# one transformer pass per user over the whole text, most of an evaluation's time; 5 titles
# cut at 64 tokens (product titles run 15-25 tokens, so about the last 3 titles in full) halve
# the tokens encoded.
PROFILE_TITLES = 5
PROFILE_MAX_TOKENS = 64

# Baselines: each isolates one signal of the same ranking, by a strategy of the live
# recommender (`workers.ranking.STRATEGIES`) applied to the built-in weights.
BASELINES: dict[str, str] = {
    "popularity": "popularity",
    # Item co-occurrence kNN: cosine of co-occurrence in baskets, sessions and histories,
    # summed over the user's recent items (same recency weighting as the hybrid's default).
    "cooccurrence": "cooccurrence",
    "transitions": "transitions",
    "profile-text": "vector",
    "pooled": "vector",
}
# Plain collaborative filtering, fitted on the histories the textbook way (not the live code):
# the yardstick the live ranking has to beat (`relata.lab.baselines`).
PLAIN_METHODS = tuple(baselines.PLAIN_METHODS)
DEFAULT_METHOD = "hybrid"
# Methods with the sequence user encoder's user vectors (`--user-encoder`): alone (as
# `pooled`), and in the hybrid ranking (the fitted blend when given, as hybrid+blend).
SEQUENCE_METHODS = ("sequence", f"{DEFAULT_METHOD}+sequence")
# Users ranked per call of the core (the recommender's micro-batches are of this order).
RANK_BATCH = 256


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
    mmr_lambda: float = 1.0,
    reranker: Reranker | None = None,
) -> MethodResult:
    """Rank every case's user with the live recommendation core (`workers.ranking.recommend`,
    through `workers.fitting.rank_offline`, as the fit's validation does) and collect the
    target's rank. `hits` and `user_vectors` are per case (a zero row: no user vector); the
    look-ups answer from them, from the item vectors and from the state, where the
    recommender asks Qdrant and the related-items topic. `mmr_lambda`: the core's diversity
    re-ranking (1: none); `reranker`: a fitted model's learned ranker."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc=desc or "rank", unit="user", mininterval=1.0)
    lists = rank_offline(
        [state.profiles[c.user_id] for c in cases],
        evidence=Evidence(related=state.related, popularity=state.popularity),
        available=state.available,
        weights=weights,
        k=k,
        mmr_lambda=mmr_lambda,
        user_vectors=user_vectors,
        hits=hits,
        item_vectors=item_vectors,
        progress=None if bar is None else bar.update,
        reranker=reranker,
    )
    if bar is not None:
        bar.close()
    return MethodResult(
        ranks=[target_rank(ids, c.target) for ids, c in zip(lists, cases, strict=True)],
        lists=lists,
    )


def ndcg(result: MethodResult, k: int) -> float:
    return summarize(result.ranks, k=k).ndcg


def evaluate(
    data_dir: Path,
    *,
    k: int = 10,
    methods: Sequence[str] | None = None,
    adapter_path: Path | None = None,
    blend_path: Path | None = None,
    user_encoder_path: Path | None = None,
    encoder_settings: EncoderSettings | None = None,
    streams_settings: StreamsSettings | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    max_users: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
    mmr_lambda: float | None = None,
) -> dict[str, Any]:
    """Run the protocol for the chosen methods; returns the JSON-able report. `mmr_lambda`:
    the diversity re-ranking of the default method, `hybrid+fit` (None: the recommender's
    setting, as served); the other methods rank in score order. The sequence methods read the
    item vectors the user encoder was fitted on: adapted by `adapter_path` when given."""
    started = time.perf_counter()
    live_lambda = RecommenderSettings().mmr_lambda if mmr_lambda is None else mmr_lambda
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
    wanted = (
        list(methods)
        if methods
        else [*BASELINES, *PLAIN_METHODS, "behaviour", DEFAULT_METHOD, FIT_METHOD]
    )
    if fitted is not None and not methods:
        wanted.append(f"{DEFAULT_METHOD}+blend")
    if adapter_path and not methods:
        wanted += ["pooled+adapter", f"{DEFAULT_METHOD}+adapter"]
    if user_encoder_path and not methods:
        wanted += list(SEQUENCE_METHODS)
    if "hybrid+blend" in wanted and fitted is None:
        raise EvaluationError(
            "method hybrid+blend needs --blend PATH (write one with `relata train`)"
        )
    unknown = [m for m in wanted if m not in _all_methods()]
    if unknown:
        raise EvaluationError(f"unknown methods {unknown}; valid: {sorted(_all_methods())}")

    needs_vectors = any(
        m in ("pooled", "profile-text", "sequence") or "hybrid" in m or "adapter" in m
        for m in wanted
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
    if any("adapter" in m for m in wanted) or (adapter_path and FIT_METHOD in wanted):
        if adapter_path is None:
            raise EvaluationError(
                "methods with +adapter need --adapter PATH (write one with `relata train`)"
            )
        from workers.adapter import load_adapter

        assert matrix is not None
        adapted = load_adapter(adapter_path).apply(matrix)
    user_encoder = None
    if any(m in SEQUENCE_METHODS for m in wanted):
        user_encoder = _load_user_encoder(user_encoder_path, adapter_path)
        if adapted is None and adapter_path is not None:
            from workers.adapter import load_adapter

            assert matrix is not None
            adapted = load_adapter(adapter_path).apply(matrix)

    results: dict[str, MethodResult] = {}
    hits_cache: dict[str, VectorInputs] = {}
    plain: baselines.PlainModel | None = None
    autofit: AutoFit | None = None
    for name in wanted:
        if name == FIT_METHOD:
            assert matrix is not None
            # What the recommender fits on: the vectors it searches (adapted ones with an
            # adapter), from the weights it starts with (the blend given, else built-in).
            autofit = auto_fit(
                prepared,
                matrix if adapted is None else adapted,
                # The model `relata train` saved (its learned ranker with it), as the
                # recommender starts from it.
                current=ModelBundle(
                    weights=fitted or defaults,
                    ranker=load_ranker(blend_path) if blend_path else None,
                ),
                k=k,
                candidates=candidates,
                mmr_lambda=live_lambda,
                user_encoder_step=user_encoder_step(FitSettings()),
                learned_ranker=FitSettings().learned_ranker,
                echo=echo,
            )
            results[name] = rank_users(
                cases=cases,
                state=state,
                weights=autofit.chosen.weights,
                k=k,
                hits=None if autofit.inputs is None else autofit.inputs.hits,
                desc=name,
                progress=progress,
                user_vectors=None if autofit.inputs is None else autofit.inputs.users,
                item_vectors=autofit.items.vectors,
                mmr_lambda=live_lambda,
                reranker=autofit.chosen.ranker,
            )
            continue
        if name in baselines.PLAIN_METHODS:
            if plain is None:
                plain = baselines.fit(
                    baselines.sequences(prepared.split.history_events), prepared.item_ids
                )
            results[name] = plain_result(prepared, plain, baselines.PLAIN_METHODS[name], k=k)
            continue
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
            user_encoder=user_encoder,
        )
        results[name] = rank_users(
            cases=cases,
            state=state,
            weights=weights,
            k=k,
            hits=hits,
            desc=name,
            progress=progress,
            user_vectors=None if vin is None else vin.users,
            item_vectors=None if vin is None else vin.items,
        )

    # What the live system serves is the default: the auto-fit, else the artifacts given.
    default = next(
        (
            m
            for m in (
                FIT_METHOD,
                f"{DEFAULT_METHOD}+adapter",
                f"{DEFAULT_METHOD}+blend",
                DEFAULT_METHOD,
            )
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
            "user_encoder": None
            if user_encoder is None
            else {"path": str(user_encoder_path), "name": user_encoder.name},
            "hybrid_weights": defaults.model_dump(exclude={"fitted_on"}),
            "fitted_weights": None if fitted is None else fitted.model_dump(),
            "fit_mmr_lambda": live_lambda,
        },
        "fit": None if autofit is None else autofit.report(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    echo(results_table(report["methods"], k, default))
    echo(f"NDCG@{k} by history length (distinct items):")
    echo(breakdown_table(report["breakdowns"]["history_length"]))
    return report


def plain_result(
    prepared: Prepared, model: baselines.PlainModel, method: baselines.PlainMethod, *, k: int
) -> MethodResult:
    """A plain baseline's top k for every case, from the case user's history events."""
    seqs = baselines.sequences(prepared.split.history_events)
    touched: dict[str, set[str]] = {}
    for e in prepared.split.history_events:
        touched.setdefault(e.user_id, set()).add(e.item_id)
    cases = prepared.split.cases
    lists = baselines.recommend(
        model,
        method,
        [baselines.recent_first(seqs.get(c.user_id, [])) for c in cases],
        k=k,
        # Returned items are history too: the protocol never ranks them.
        excluded=[touched.get(c.user_id, set()) for c in cases],
        available=prepared.state.available,
    )
    return MethodResult(
        ranks=[target_rank(ids, c.target) for ids, c in zip(lists, cases, strict=True)],
        lists=lists,
    )


def _all_methods() -> set[str]:
    return {
        *BASELINES,
        *PLAIN_METHODS,
        "behaviour",
        DEFAULT_METHOD,
        FIT_METHOD,
        f"{DEFAULT_METHOD}+blend",
        "pooled+adapter",
        f"{DEFAULT_METHOD}+adapter",
        *SEQUENCE_METHODS,
    }


def _load_user_encoder(path: Path | None, adapter_path: Path | None) -> Any:
    """The user encoder of the sequence methods, checked against the item vectors it reads."""
    if path is None:
        raise EvaluationError(
            f"methods {list(SEQUENCE_METHODS)} need --user-encoder PATH (write one with "
            "`relata train`)"
        )
    from workers.adapter import load_adapter
    from workers.user_encoder import UserEncoderError, load_user_encoder

    try:
        user_encoder = load_user_encoder(path)
    except UserEncoderError as exc:
        raise EvaluationError(str(exc)) from exc
    fitted = user_encoder.meta.get("item_vectors", {})
    if "adapter" in fitted:
        given = load_adapter(adapter_path).fingerprint if adapter_path else None
        if fitted["adapter"] != given:
            raise EvaluationError(
                f"user encoder {path} was fitted on item vectors with adapter "
                f"{fitted['adapter']}; this evaluation's adapter is {given} (pass the --adapter "
                "it was trained with)"
            )
    return user_encoder


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
    user_encoder: Any = None,
) -> tuple[BlendWeights, list[list[tuple[str, float]]] | None, VectorInputs | None]:
    if name == "behaviour":
        return strategy_weights("behaviour", defaults), None, None
    base = name.split("+")[0]
    if name == "sequence":
        weights = strategy_weights("vector", BlendWeights())
    elif name == f"{DEFAULT_METHOD}+sequence":
        weights = fitted or defaults
    elif base in BASELINES:
        weights = strategy_weights(BASELINES[base], BlendWeights())
    elif name == DEFAULT_METHOD:
        weights = defaults
    else:  # hybrid+blend, hybrid+adapter: the fitted weights (the built-in ones without --blend)
        weights = fitted or defaults
    if name in ("popularity", "cooccurrence", "transitions"):
        return weights, None, None
    if name in SEQUENCE_METHODS:
        from relata.lab.sequences import sequence_inputs

        use = adapted if adapted is not None else matrix
        assert use is not None and user_encoder is not None
        key = f"sequence-{weights.pool_recency}-{weights.weight_exponent}-{weights.max_sources}"
        if key not in hits_cache:
            hits_cache[key] = sequence_inputs(prepared, user_encoder, use, weights, top=candidates)
        vin = hits_cache[key]
        return weights, vin.hits, vin
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
        hits = vector_hits(users, matrix, prepared.item_ids, prepared.history_idx, top=candidates)
        pos = {i: n for n, i in enumerate(prepared.item_ids)}
        return weights, hits, VectorInputs(users=users, hits=hits, items=VectorRows(matrix, pos))
    use = adapted if "adapter" in name else matrix
    assert use is not None
    key = f"{'adapted' if 'adapter' in name else 'base'}-{weights.pool_recency}-{weights.weight_exponent}-{weights.max_sources}"
    if key not in hits_cache:
        hits_cache[key] = pooled_inputs(prepared, use, weights, top=candidates)
    vin = hits_cache[key]
    return weights, vin.hits, vin
