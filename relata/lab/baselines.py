"""Plain collaborative-filtering baselines of the offline evaluation, fitted on the histories.

They do not run the live code on purpose: they are the yardstick the live ranking is measured
against, computed the textbook way from the same training histories (targets never enter).

- `knn`: item-item cosine over the binary user x item matrix; a user's score for item i is
  the sum over history items h of cos(h, i).
- `knn+recency`: the same sum, each history item weighted exp(-0.5 r_h), r_h = 0 for the most
  recent history item, 1 for the one before, and so on.
- `knn+transitions`: first-order transitions P(i | h) (consecutive pairs h -> next in the
  histories, row-normalised) summed with weights exp(-0.7 r_h), plus 0.3 x `knn+recency`.

Every method adds popularity x 1e-9 to break ties, ranks the full catalog (available items)
and leaves out the user's history.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from schemas.messages import BehaviorEvent

# The recipe's constants (a well-known baseline; not fitted here, so it is the same yardstick
# on every data set).
KNN_DECAY = 0.5
TRANSITION_DECAY = 0.7
KNN_SHARE = 0.3
TIE_BREAK = 1e-9
# Users scored per dense block: a block is users x items float64.
BLOCK = 512


@dataclass(frozen=True)
class PlainMethod:
    knn_decay: float | None  # None: every history item counts 1
    transitions: bool


PLAIN_METHODS: dict[str, PlainMethod] = {
    "knn": PlainMethod(knn_decay=None, transitions=False),
    "knn+recency": PlainMethod(knn_decay=KNN_DECAY, transitions=False),
    "knn+transitions": PlainMethod(knn_decay=KNN_DECAY, transitions=True),
}


@dataclass
class PlainModel:
    """Item-item cosine, transition probabilities and popularity over an item index."""

    item_ids: list[str]
    cosine: sp.csr_matrix
    transitions: sp.csr_matrix
    popularity: npt.NDArray[np.float64]


def sequences(events: Iterable[BehaviorEvent]) -> dict[str, list[str]]:
    """Each user's chosen items in time order (returns are not a choice)."""
    out: dict[str, list[str]] = {}
    for e in events:
        if e.event_type != "return":
            out.setdefault(e.user_id, []).append(e.item_id)
    return out


def fit(seqs: Mapping[str, Sequence[str]], item_ids: Sequence[str]) -> PlainModel:
    """Cosine of the binary user x item matrix and row-normalised consecutive-pair counts."""
    pos = {i: n for n, i in enumerate(item_ids)}
    n_items = len(item_ids)
    rows: list[int] = []
    cols: list[int] = []
    src: list[int] = []
    dst: list[int] = []
    for u, seq in enumerate(seqs.values()):
        idx = [pos[i] for i in seq]
        for i in set(idx):
            rows.append(u)
            cols.append(i)
        for a, b in itertools.pairwise(idx):
            if a != b:
                src.append(a)
                dst.append(b)
    binary = sp.csr_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(max(len(seqs), 1), n_items), dtype=np.float64
    )
    counts = np.asarray(binary.sum(axis=0)).ravel()
    co = (binary.T @ binary).tocsr()
    co.setdiag(0.0)
    co.eliminate_zeros()
    inv = np.zeros(n_items)
    np.divide(1.0, np.sqrt(counts), out=inv, where=counts > 0)
    cosine = sp.diags(inv) @ co @ sp.diags(inv)
    pairs = sp.csr_matrix(
        (np.ones(len(src)), (src, dst)), shape=(n_items, n_items), dtype=np.float64
    )
    pairs.sum_duplicates()
    out_degree = np.asarray(pairs.sum(axis=1)).ravel()
    inv_out = np.zeros(n_items)
    np.divide(1.0, out_degree, out=inv_out, where=out_degree > 0)
    transitions = sp.diags(inv_out) @ pairs
    return PlainModel(
        item_ids=list(item_ids),
        cosine=sp.csr_matrix(cosine),
        transitions=sp.csr_matrix(transitions),
        popularity=counts,
    )


def recent_first(seq: Sequence[str]) -> list[str]:
    """Distinct items, most recent first (an item counts at its last occurrence)."""
    seen: set[str] = set()
    out: list[str] = []
    for item in reversed(seq):
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _weights(
    histories: Sequence[Sequence[str]], pos: Mapping[str, int], n_items: int, decay: float | None
) -> sp.csr_matrix:
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for u, history in enumerate(histories):
        for r, item in enumerate(history):
            rows.append(u)
            cols.append(pos[item])
            vals.append(1.0 if decay is None else math.exp(-decay * r))
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), n_items))


def scores(
    model: PlainModel, method: PlainMethod, histories: Sequence[Sequence[str]]
) -> npt.NDArray[np.float64]:
    """Every item's score for each history (distinct items, most recent first): a users x
    items matrix, history items included (the caller leaves them out)."""
    pos = {i: n for n, i in enumerate(model.item_ids)}
    n_items = len(model.item_ids)
    out = (_weights(histories, pos, n_items, method.knn_decay) @ model.cosine).toarray()
    if method.transitions:
        trans = _weights(histories, pos, n_items, TRANSITION_DECAY) @ model.transitions
        out = trans.toarray() + KNN_SHARE * out
    out += TIE_BREAK * model.popularity
    return np.asarray(out, dtype=np.float64)


def recommend(
    model: PlainModel,
    method: PlainMethod,
    histories: Sequence[Sequence[str]],
    *,
    k: int,
    excluded: Sequence[Iterable[str]] | None = None,
    available: Iterable[str] | None = None,
) -> list[list[str]]:
    """The top k items of each history (distinct items, most recent first), leaving out its
    items and those of `excluded`, and only `available` items when given."""
    pos = {i: n for n, i in enumerate(model.item_ids)}
    n_items = len(model.item_ids)
    allowed = np.ones(n_items, dtype=bool)
    if available is not None:
        allowed[:] = False
        allowed[[pos[i] for i in available if i in pos]] = True
    out: list[list[str]] = []
    for start in range(0, len(histories), BLOCK):
        stop = min(start + BLOCK, len(histories))
        block = scores(model, method, histories[start:stop])
        block[:, ~allowed] = -np.inf
        for r in range(stop - start):
            n = start + r
            banned = [pos[i] for i in histories[n] if i in pos]
            if excluded is not None:
                banned += [pos[i] for i in excluded[n] if i in pos]
            block[r, banned] = -np.inf
        top = min(k, n_items)
        part = np.argpartition(-block, top - 1, axis=1)[:, :top]
        for r in range(stop - start):
            # Best first; equal scores in item order, so the ranking is deterministic.
            order = part[r][np.lexsort((part[r], -block[r, part[r]]))]
            out.append([model.item_ids[j] for j in order if np.isfinite(block[r, j])])
    return out
