"""The recommendation core: a batch of user histories in, ranked and explained items out.

Everything it needs from the outside (user vectors, vector search, item vectors,
availability, popularity) comes in as functions (`Lookups`), so the live recommender (Qdrant,
the related-items topic) and `relata evaluate` (exact search over the item matrix, the folded
histories) run the same ranking, the same over-fetch, the same availability filter, the same
diversity re-ranking (MMR, `diversity.py`) and the same answer to a user with no usable
history (trending items).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.messages import CandidatePool, HistoryEntry, RecommendedItem
from schemas.reranking import place_pins
from schemas.rules import BusinessRules

from .diversity import mmr
from .explain import explain, pinned, trending
from .learned import Reranker
from .pool import candidate_pool, item_attributes
from .related import RelatedTable
from .rules import apply_rules, pins_of
from .score import score, user_evidence
from .weights import BlendWeights

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
History = Sequence[HistoryEntry]
Popularity = tuple[list[tuple[str, float]], Mapping[str, float]]

# Items scored per user before the availability check: k of them are kept (behaviour
# candidates are not filtered by availability before scoring; vector hits are).
CANDIDATE_MARGIN = 2
# With diversity on, MMR chooses the k from this many scored items per k: room to swap a
# near-duplicate for the next-best different item without reaching far down the ranking.
DIVERSITY_MARGIN = 3


@dataclass(frozen=True, slots=True)
class Lookups:
    """What ranking a batch reads from the world, as functions of the batch."""

    # One vector per history (None: the user has none), in order.
    user_vectors: Callable[[Sequence[History]], list[FloatArray | None]]
    # The nearest available items of each row of a matrix of user vectors, best first,
    # leaving out each row's excluded ids.
    search: Callable[[FloatArray, list[set[str]]], list[list[tuple[str, float]]]]
    # The vectors of (at least) these items, as a mapping that holds every one it found.
    item_vectors: Callable[[Iterable[str]], Mapping[str, np.ndarray]]
    # The available ones among these items.
    available: Callable[[Set[str]], Set[str]]
    # Related-items lists by item (the association evidence).
    related: RelatedTable
    # The popularity ranking (most popular first) and its prior for these weights.
    popularity: Callable[[BlendWeights], Popularity]
    # Item titles for the reasons' wording (None: reasons name item ids).
    titles: Mapping[str, str] | None = None
    # Catalog attributes (categories, brand, price) of these items, for business rules
    # (None: rules can match item ids only).
    attributes: Callable[[Set[str]], Mapping[str, Mapping[str, Any]]] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One user's answer: the ranked items, the candidate pool published beside them (None:
    none asked for), and whether the business rules' filters removed every candidate and so
    were not applied."""

    items: list[RecommendedItem]
    pool: CandidatePool | None = None
    rules_fell_back: bool = False


def recommend(
    histories: Sequence[History],
    *,
    lookups: Lookups,
    weights: BlendWeights,
    k: int,
    mmr_lambda: float = 1.0,
    rules: BusinessRules | None = None,
    placement: str = "home",
    reranker: Reranker | None = None,
) -> list[list[RecommendedItem]]:
    """The k best available items for each history (most recent first), with reasons: the
    items of `recommend_answers`."""
    answers = recommend_answers(
        histories,
        lookups=lookups,
        weights=weights,
        k=k,
        mmr_lambda=mmr_lambda,
        rules=rules,
        placement=placement,
        reranker=reranker,
    )
    return [answer.items for answer in answers]


def recommend_answers(
    histories: Sequence[History],
    *,
    lookups: Lookups,
    weights: BlendWeights,
    k: int,
    mmr_lambda: float = 1.0,
    rules: BusinessRules | None = None,
    placement: str = "home",
    pool_size: int = 0,
    reranker: Reranker | None = None,
) -> list[Answer]:
    """The k best available items for each history (most recent first), with reasons.

    `mmr_lambda` below 1 re-ranks the available scored items by maximal marginal relevance
    over the item vectors (`diversity.mmr`; 1: score order). A history that yields nothing
    (none usable: empty, or no evidence and no popularity to fill with) is answered with
    trending items: the most popular available ones, labelled `trending`. `rules` (business
    rules) filter, boost, cap and pin (the pins of `placement`) the available candidates
    before the k are chosen (`rules.py`). `pool_size` above 0 adds to each answer up to that
    many of the next candidates the ranking considered, with what re-ranking them needs
    (`pool.py`); the k items are the same with or without it. `reranker` (a fitted learned
    ranker, `learned.py`) re-orders each user's best `reranker.depth` blend candidates before
    availability, rules and diversity."""
    if not histories:
        return []
    vectors = lookups.user_vectors(histories)
    hits = _search(histories, vectors, lookups, weights)
    depth = k * (CANDIDATE_MARGIN if mmr_lambda >= 1.0 else DIVERSITY_MARGIN)
    # With a learned ranker, the blend scores its deeper list and the ranker keeps `depth`.
    scoring = max(depth, reranker.depth) if reranker is not None else depth
    # One look-up for every vector scoring may read: the hits it names a history item for,
    # and the behaviour candidates it scores against the user vector.
    wanted = [item_id for user_hits in hits for item_id, _ in user_hits[:scoring]]
    evidence = [user_evidence(history, lookups.related, weights) for history in histories]
    if weights.vector > 0:
        for found in evidence:
            wanted += found.candidates
    item_vectors = lookups.item_vectors(wanted)
    # One call for the batch: a ranking rebuilt between two users would not match its prior.
    popularity, prior = lookups.popularity(weights)
    scored = [
        score(
            history=history,
            related=lookups.related,
            vector_hits=user_hits,
            k=scoring,
            weights=weights,
            history_vectors=item_vectors,
            candidate_vectors=item_vectors,
            popularity=popularity,
            prior_of=prior,
            titles=lookups.titles,
            user_vector=user_vector,
            evidence=found,
        )
        for history, user_hits, user_vector, found in zip(
            histories, hits, vectors, evidence, strict=True
        )
    ]
    if reranker is not None:
        scored = reranker(histories, scored, depth)
    # Vector hits are available by construction (the search filters); the other candidates
    # are checked in one look-up, and only the k kept of each user are worded.
    vector_ids = [{i for i, _ in h} for h in hits]
    unchecked = {
        item_id
        for ranked, vec in zip(scored, vector_ids, strict=True)
        for item_id, _ in ranked.items
        if item_id not in vec
    }
    # Users nothing was scored for get trending items: the popular ones, checked in the same
    # look-up (a retired item can still head the popularity list).
    cold = [not ranked.items for ranked in scored]
    trend_pool = [i for i, _ in popularity[:depth]] if any(cold) else []
    unchecked.update(trend_pool)
    pins = pins_of(rules, placement)
    unchecked.update(i for i, _ in pins)
    available = lookups.available(unchecked) if unchecked else set()
    kept = [
        [(i, s) for i, s in ranked.items if i in vec or i in available]
        for ranked, vec in zip(scored, vector_ids, strict=True)
    ]
    fell_back = [False] * len(kept)
    trend_fell_back = False
    if rules is not None:
        kept, fell_back, trend_pool, trend_fell_back = _apply_rules(
            kept, trend_pool, lookups, rules
        )
    if mmr_lambda < 1.0:
        # The pools' vectors in one look-up; the mapping it returns is the one to read from
        # now (a cache may have moved rows to fetch them), for MMR and for the reasons.
        item_vectors = lookups.item_vectors([i for pool in kept for i, _ in pool])
        chosen = [mmr(pool, item_vectors, k=k, lam=mmr_lambda) for pool in kept]
        scored = [
            ranked._replace(history_vectors=item_vectors, candidate_vectors=item_vectors)
            for ranked in scored
        ]
    else:
        chosen = [[i for i, _ in pool[:k]] for pool in kept]
    counts = dict(popularity)
    answers: list[Answer] = []
    pooled: list[list[RecommendedItem]] = []  # each user's next candidates (pool_size > 0)
    for n, (history, ranked, ids, is_cold) in enumerate(
        zip(histories, scored, chosen, cold, strict=True)
    ):
        seen = {e.item_id for e in history}
        if is_cold:
            candidates = [i for i in trend_pool if i in available and i not in seen]
            ids = candidates[:k]
        else:
            candidates = [i for i, _ in kept[n]]
        own_pins = [(i, at) for i, at in pins if i in available and i not in seen]
        placed = place_pins(ids, own_pins, k=k) if own_pins else ids
        pinned_ids = {i for i, _ in own_pins}
        # A pinned item is worded as pinned; the others as the ranking found them.
        worded = [i for i in placed if i not in pinned_ids]
        answered = (
            trending(popularity, worded) if is_cold else explain(ranked, worded, item_counts=counts)
        )
        by_id = {item.item_id: item for item in answered}
        items = [by_id[i] if i in by_id else pinned(i) for i in placed]
        answers.append(Answer(items, rules_fell_back=trend_fell_back if is_cold else fell_back[n]))
        if pool_size <= 0:
            continue
        # The pool's items are worded apart: one call for list and pool would change the
        # list's cosines in their last float32 bits (a matrix product of another shape). A pool
        # is for re-ranking: each item keeps its strongest reason, a third of the wording.
        shown = set(placed)
        following = [i for i in candidates if i not in shown][:pool_size]
        pooled.append(
            trending(popularity, following, relative_to=worded)
            if is_cold
            else explain(ranked._replace(max_reasons=1), following, item_counts=counts)
        )
    if pool_size > 0:
        answers = _with_pools(answers, pooled, cold=cold, lookups=lookups, mmr_lambda=mmr_lambda)
    return answers


def _with_pools(
    answers: list[Answer],
    pooled: list[list[RecommendedItem]],
    *,
    cold: list[bool],
    lookups: Lookups,
    mmr_lambda: float,
) -> list[Answer]:
    """The answers with their candidate pools completed: the vectors and the attributes of
    every listed and pooled item of the batch in one look-up each (after every reason is
    worded: a look-up may move the rows of the vectors the reasons read)."""
    every = {item.item_id for answer in answers for item in answer.items}
    every.update(item.item_id for items in pooled for item in items)
    vectors = lookups.item_vectors(every)
    found = lookups.attributes(every) if lookups.attributes is not None and every else {}
    attributes = {i: item_attributes(found.get(i)) for i in every}
    return [
        Answer(
            answer.items,
            candidate_pool(
                answer.items,
                items,
                attributes=attributes,
                vectors=vectors,
                # Trending lists are not diversified: re-ranking them keeps the score order.
                mmr_lambda=1.0 if is_cold else mmr_lambda,
            ),
            answer.rules_fell_back,
        )
        for answer, items, is_cold in zip(answers, pooled, cold, strict=True)
    ]


def _apply_rules(
    kept: list[list[tuple[str, float]]],
    trend_pool: list[str],
    lookups: Lookups,
    rules: BusinessRules,
) -> tuple[list[list[tuple[str, float]]], list[bool], list[str], bool]:
    """Each user's candidates and the trending pool with the business rules applied, and
    for each whether its filters fell back (removed every candidate, so were not applied)."""
    wanted = {i for pool in kept for i, _ in pool} | set(trend_pool)
    attributes = lookups.attributes(wanted) if lookups.attributes is not None and wanted else {}
    ruled = [apply_rules(pool, attributes, rules) for pool in kept]
    fell_back = sum(r.fell_back for r in ruled)
    if fell_back:
        # Documented fallback: a filter that removes every candidate is not applied.
        logger.info(
            "business rules removed every candidate users=%d: filters not applied", fell_back
        )
    trend = apply_rules([(i, -n) for n, i in enumerate(trend_pool)], attributes, rules)
    return (
        [r.items for r in ruled],
        [r.fell_back for r in ruled],
        [i for i, _ in trend.items],
        trend.fell_back,
    )


def _search(
    histories: Sequence[History],
    vectors: list[FloatArray | None],
    lookups: Lookups,
    weights: BlendWeights,
) -> list[list[tuple[str, float]]]:
    hits: list[list[tuple[str, float]]] = [[] for _ in histories]
    if weights.vector <= 0:
        return hits
    todo = [n for n, v in enumerate(vectors) if v is not None]
    if not todo:
        return hits
    matrix = np.stack([v for v in vectors if v is not None]).astype(np.float32)
    excludes = [{e.item_id for e in histories[n]} for n in todo]
    for n, user_hits in zip(todo, lookups.search(matrix, excludes), strict=True):
        hits[n] = user_hits
    return hits
