"""Pure ranking-quality metrics for leave-one-out evaluation (one target per user).

A rank is 1-based; None means the target was not in the ranked list (a miss).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


def target_rank(ranked: Sequence[str], target: str) -> int | None:
    """1-based position of `target` in `ranked`, None if absent."""
    for pos, item in enumerate(ranked, start=1):
        if item == target:
            return pos
    return None


def hit_at(rank: int | None, k: int) -> float:
    """1 if the target is within the top k."""
    return 1.0 if rank is not None and rank <= k else 0.0


def ndcg_at(rank: int | None, k: int) -> float:
    """NDCG@k with one relevant item: 1/log2(rank+1) within the top k (ideal DCG is 1)."""
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0


def reciprocal_rank(rank: int | None, cutoff: int | None = None) -> float:
    """1/rank, 0 beyond `cutoff` (when given) or for a miss."""
    if rank is None or (cutoff is not None and rank > cutoff):
        return 0.0
    return 1.0 / rank


@dataclass(frozen=True)
class Summary:
    users: int
    hr: float
    ndcg: float
    mrr: float
    coverage: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "users": self.users,
            "hr": self.hr,
            "ndcg": self.ndcg,
            "mrr": self.mrr,
            "coverage": self.coverage,
        }


def summarize(
    ranks: Sequence[int | None],
    *,
    k: int,
    recommended: Iterable[Sequence[str]] = (),
    catalog_size: int = 0,
    mrr_cutoff: int | None = None,
) -> Summary:
    """Mean HR@k, NDCG@k, MRR over users, and catalog coverage of the top-k lists."""
    n = len(ranks)
    cov = coverage(recommended, k=k, catalog_size=catalog_size) if catalog_size else 0.0
    if n == 0:
        return Summary(users=0, hr=0.0, ndcg=0.0, mrr=0.0, coverage=cov)
    return Summary(
        users=n,
        hr=sum(hit_at(r, k) for r in ranks) / n,
        ndcg=sum(ndcg_at(r, k) for r in ranks) / n,
        mrr=sum(reciprocal_rank(r, mrr_cutoff) for r in ranks) / n,
        coverage=cov,
    )


def coverage(recommended: Iterable[Sequence[str]], *, k: int, catalog_size: int) -> float:
    """Share of the catalog that appears in at least one user's top-k list."""
    if catalog_size <= 0:
        return 0.0
    seen: set[str] = set()
    for items in recommended:
        seen.update(items[:k])
    return len(seen) / catalog_size


def bucket_by_edges(value: float, edges: Sequence[float]) -> str:
    """Label of the half-open bucket [edges[i], edges[i+1]) holding value ("1-2", or "1"
    for a bucket of one integer); the last is open ("8+")."""
    for lo, hi in itertools.pairwise(edges):
        if lo <= value < hi:
            if float(hi - 1).is_integer():
                return f"{lo:g}" if hi - 1 == lo else f"{lo:g}-{hi - 1:g}"
            return f"{lo:g}-{hi:g}"
    return f"{edges[-1]:g}+"


def breakdown(
    ranks: Sequence[int | None],
    groups: Sequence[str],
    *,
    k: int,
    order: Callable[[str], float] | None = None,
) -> dict[str, dict[str, float | int]]:
    """Per-group users, HR@k and NDCG@k (groups[i] is user i's group label)."""
    if len(ranks) != len(groups):
        raise ValueError(f"ranks ({len(ranks)}) and groups ({len(groups)}) differ in length")
    members: dict[str, list[int | None]] = {}
    for r, g in zip(ranks, groups, strict=True):
        members.setdefault(g, []).append(r)
    labels = sorted(members, key=order) if order else sorted(members)
    out: dict[str, dict[str, float | int]] = {}
    for label in labels:
        s = summarize(members[label], k=k)
        out[label] = {"users": s.users, "hr": s.hr, "ndcg": s.ndcg}
    return out


def popularity_terciles(counts: Sequence[float]) -> tuple[float, float]:
    """Count thresholds splitting items (by interaction count) into head/torso/tail thirds
    of interactions: items above t_head carry the top third of all interactions."""
    ordered = sorted(counts, reverse=True)
    total = sum(ordered)
    if total <= 0:
        return (math.inf, math.inf)
    acc = 0.0
    t_head = t_torso = ordered[-1]
    head_done = False
    for c in ordered:
        acc += c
        if not head_done and acc >= total / 3:
            t_head, head_done = c, True
        if acc >= 2 * total / 3:
            t_torso = c
            break
    return (t_head, t_torso)
