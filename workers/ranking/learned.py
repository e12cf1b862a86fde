"""The learned ranker: a gradient-boosted model that re-orders each user's best blend
candidates from the evidence behind them.

The blend (`score.py`) adds its terms linearly, with one recency decay per signal. Some data
sets hold more than a sum can use: on invoice data, for instance, what follows the very last
item matters in ways a weighted sum of transition probabilities misses. The ranker sees, per
candidate, each term apart and where it came from (which history positions, how many rows,
the strongest row, the vector's rank and the blend's) and learns the order from the fit's
validation targets (`workers.fitting.ranker_step`), which keeps it only when it wins on
users it was not trained on.

The core calls a `Reranker` on each batch's scored candidates (`core.recommend_answers`);
the fit records the same features through the same call (`FeatureRecorder`), so the model
is trained on exactly what it is served.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from schemas import vocabulary
from schemas.messages import HistoryEntry

from .score import Scored

F32 = npt.NDArray[np.float32]
History = Sequence[HistoryEntry]

# Blend candidates per user the ranker re-orders (the best of the blend, before availability):
# the list diversity re-ranking chooses from at k = 10. Deeper lists cost a model evaluation
# per row for every user served and brought no more on the shipped data sets.
DEPTH = 30
# History positions whose evidence is a feature of its own (0: the most recent source).
POSITIONS = 3
# Minimum source position of a candidate without association evidence.
NO_SOURCE = 99.0


def feature_names() -> list[str]:
    """The ranker's inputs, in column order (the behaviour kinds are the vocabulary's)."""
    names: list[str] = []
    for kind in vocabulary.behaviour_kinds():
        names += [f"{kind}", f"{kind}_rows"]
    names += [f"sequence_at_{p}" for p in range(POSITIONS)]
    names += [f"cooccurrence_at_{p}" for p in range(POSITIONS)]
    names += ["max_value", "min_source", "scaled_cosine", "vector_rank", "prior", "history"]
    names += ["blend", "blend_rank", "blend_relative"]
    return names


class _Layout(NamedTuple):
    """Where each input sits (from the vocabulary; built once per batch)."""

    width: int
    kind_slot: npt.NDArray[np.intp]  # relation kind code -> its slot among the kinds (-1: none)
    kinds: int
    sequence: npt.NDArray[np.bool_]  # relation kind code -> is a sequence kind


def _layout() -> _Layout:
    codes = vocabulary.relation_kinds()
    behaviour = vocabulary.behaviour_kinds()
    slot = np.array([behaviour.index(k) if k in behaviour else -1 for k in codes], dtype=np.intp)
    sequence = np.array(
        [vocabulary.relation_kind(k).signal == "sequence" for k in codes], dtype=np.bool_
    )
    return _Layout(len(feature_names()), slot, len(behaviour), sequence)


def candidate_features(history: History, scored: Scored, layout: _Layout | None = None) -> F32:
    """One row per scored item (`scored.items`, in order), columns `feature_names()`."""
    lay = layout or _layout()
    ids = [i for i, _ in scored.items]
    n = len(ids)
    x = np.zeros((n, lay.width), dtype=np.float64)
    if not n:
        return x.astype(np.float32)
    base = 2 * lay.kinds
    max_value, min_source = base + 2 * POSITIONS, base + 2 * POSITIONS + 1
    x[:, min_source] = NO_SOURCE
    assoc = scored.assoc
    if assoc is not None and len(assoc.row_candidate):
        at = {item: r for r, item in enumerate(ids)}
        # The association candidate of each row -> its row here (-1: not among the items).
        where = np.array([at.get(i, -1) for i in assoc.ids], dtype=np.intp)
        row = where[assoc.row_candidate]
        slot = lay.kind_slot[assoc.row_kind]
        keep = (row >= 0) & (slot >= 0)
        row, slot, codes = row[keep], slot[keep], assoc.row_kind[keep]
        value, source = assoc.row_value[keep], assoc.row_source[keep]
        # Per kind: the rows' strength without the kind weight (recency share x value), and
        # their count; one bincount over (item, kind) keys.
        key = row * lay.kinds + slot
        size = n * lay.kinds
        shared = assoc.row_share[keep] * value
        x[:, 0:base:2] = np.bincount(key, shared, minlength=size).reshape(n, lay.kinds)
        x[:, 1:base:2] = np.bincount(key, minlength=size).reshape(n, lay.kinds)
        # Per history position of the source (the last POSITIONS): sequence, then the others.
        near = source < POSITIONS
        column = np.where(lay.sequence[codes], 0, POSITIONS) + source
        key = row[near] * 2 * POSITIONS + column[near]
        x[:, base : base + 2 * POSITIONS] = np.bincount(
            key, value[near], minlength=n * 2 * POSITIONS
        ).reshape(n, 2 * POSITIONS)
        np.maximum.at(x[:, max_value], row, value)
        np.minimum.at(x[:, min_source], row, source.astype(np.float64))
    c = min_source + 1
    cos = np.full(n, np.nan)
    if scored.scaled is not None:
        cos_of = dict(zip(scored.scaled[0], scored.scaled[1].tolist(), strict=True))
        cos = np.array([cos_of.get(i, np.nan) for i in ids], dtype=np.float64)
    has = ~np.isnan(cos)
    x[:, c] = np.where(has, cos, -1.0)
    # Rank among the items with a cosine (1: closest); those without rank after them all.
    order = np.argsort(np.where(has, -cos, np.inf), kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(1, n + 1)
    x[:, c + 1] = np.where(has, ranks, n + 1)
    pop = scored.pop_score
    x[:, c + 2] = [pop.get(i, 0.0) / scored.prior_weight for i in ids] if pop else 0.0
    x[:, c + 3] = len(history)
    blend = np.array([s for _, s in scored.items], dtype=np.float64)
    x[:, c + 4] = blend
    x[:, c + 5] = np.arange(1, n + 1)
    top = blend.max()
    x[:, c + 6] = blend / top if top > 0 else 0.0
    return x.astype(np.float32)


class Reranker(Protocol):
    """What the core calls on each batch's scored candidates (`depth` of them per user): the
    candidates re-ordered, `keep` of them per user."""

    @property
    def depth(self) -> int: ...

    def __call__(
        self, histories: Sequence[History], scored: Sequence[Scored], keep: int
    ) -> list[Scored]: ...


def _kept(scored: Scored, keep: int) -> Scored:
    return scored._replace(items=scored.items[:keep])


@dataclass
class FeatureRecorder:
    """A reranker that changes nothing and records each user's candidates and features, in
    call order (the fit's training rows)."""

    depth: int = DEPTH
    ids: list[list[str]] = field(default_factory=list)
    features: list[F32] = field(default_factory=list)

    def __call__(
        self, histories: Sequence[History], scored: Sequence[Scored], keep: int
    ) -> list[Scored]:
        layout = _layout()
        for history, one in zip(histories, scored, strict=True):
            self.ids.append([i for i, _ in one.items])
            self.features.append(candidate_features(history, one, layout))
        return [_kept(one, keep) for one in scored]


FORMAT = "relata.learned-ranker"
VERSION = 1


class RankerError(ValueError):
    """A learned-ranker artifact is missing, malformed or of another version."""


@dataclass(frozen=True)
class LearnedRanker:
    """A fitted model over `feature_names()`: re-orders each user's best `depth` blend
    candidates by the model's odds that the item is the user's next new one."""

    model: Any  # a scikit-learn classifier with decision_function
    names: tuple[str, ...]
    depth: int = DEPTH
    meta: dict[str, Any] = field(default_factory=dict)
    # What the model version names: set once when fitted and kept in the artifact (a model
    # pickled again after loading need not give the same bytes).
    digest: str = ""

    def __post_init__(self) -> None:
        # Checked once, whether fitted here or loaded: the vocabulary's kinds name its inputs.
        if list(self.names) != feature_names():
            raise RankerError(
                "the learned ranker was fitted on other features (another vocabulary of "
                "relation kinds): refit it, or remove the .ranker file beside the model"
            )
        if not self.digest:
            model_bytes = pickle.dumps(self.model, protocol=5)
            object.__setattr__(self, "digest", hashlib.sha256(model_bytes).hexdigest()[:10])

    def __call__(
        self, histories: Sequence[History], scored: Sequence[Scored], keep: int
    ) -> list[Scored]:
        layout = _layout()
        blocks = [candidate_features(h, s, layout) for h, s in zip(histories, scored, strict=True)]
        sizes = [len(b) for b in blocks]
        if not sum(sizes):
            return [_kept(s, keep) for s in scored]
        p = self.model.decision_function(np.concatenate(blocks))
        out: list[Scored] = []
        start = 0
        for one, size in zip(scored, sizes, strict=True):
            mine = p[start : start + size]
            start += size
            # Stable: equal scores keep the blend's order. The score is the model's log-odds:
            # diversity re-ranking scales it to [0, 1] per list, and a probability would put
            # all but the first few items near 0 there.
            order = np.argsort(-mine, kind="stable")[:keep]
            out.append(
                one._replace(items=[(one.items[j][0], float(mine[j])) for j in order.tolist()])
            )
        return out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "names": list(self.names),
            "digest": self.digest,
        }
        pickle.dump((doc, self.model, self.depth, self.meta), buf, protocol=5)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LearnedRanker:
        """Read `to_bytes`' output. The file is a pickle: load only rankers this deployment
        wrote (the model directory is the workers' own)."""
        try:
            doc, model, depth, meta = pickle.loads(data)
        except Exception as exc:
            raise RankerError(f"cannot read a learned ranker: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RankerError("not a learned-ranker artifact")
        if doc.get("version") != VERSION:
            raise RankerError(f"learned-ranker version {doc.get('version')!r}; reads {VERSION}")
        return cls(
            model=model,
            names=tuple(doc.get("names", ())),
            depth=int(depth),
            meta=dict(meta),
            digest=str(doc.get("digest", "")),
        )


def train_model(x: F32, y: npt.NDArray[np.float64], *, seed: int = 0) -> Any:
    """A gradient-boosted classifier of 'is the target' over candidate rows."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_depth=4, learning_rate=0.1, max_iter=100, early_stopping=False, random_state=seed
    )
    return model.fit(x, y)
