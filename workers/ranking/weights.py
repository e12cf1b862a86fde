"""The weights of the hybrid ranking, their artifact, and the named strategies.

A strategy is a function of the weights: `hybrid` uses them as given, the others isolate one
signal of the same ranking. The live recommender (`RELATA_RECOMMENDER_STRATEGY`) and
`relata evaluate` (its baseline methods) both take their weights from `strategy_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas import vocabulary
from schemas.vocabulary import RelationKindSpec

BLEND_FORMAT = "relata.blend-weights"
BLEND_VERSION = 2

# The relation kinds that have a weight field of their own (the artifact's format).
_KIND_FIELDS = frozenset({"similar", "bought_together", "also_bought", "also_viewed", "next_item"})


class BlendError(ValueError):
    """A blend-weights artifact is missing, malformed or of an unknown version."""


class BlendWeights(BaseModel):
    """Weights of the hybrid ranking; defaults work on both shipped data sets, `relata train`
    refits them per data set on an internal validation split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vector: float = Field(0.04, ge=0, description="Weight of the vector-similarity term.")
    bought_together: float = Field(1.0, ge=0, description="Weight of bought-together evidence.")
    also_bought: float = Field(
        1.0, ge=0, description="Weight of also-bought (same customers' histories) evidence."
    )
    also_viewed: float = Field(1.0, ge=0, description="Weight of also-viewed (same session).")
    # Transitions are probabilities P(next | source), item kNN cosines: the textbook blend of
    # the two weighs transitions about 3x kNN (transitions + 0.3 kNN); `relata train` refits it.
    next_item: float = Field(
        3.0, ge=0, description="Weight of item-to-next-item transitions, P(next | item)."
    )
    similar: float = Field(0.0, ge=0, description="Weight of `similar` related-items entries.")
    popularity: float = Field(0.02, ge=0, description="Weight of the popularity prior.")
    recency: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Source weight decay per step back in the user's history (co-occurrence).",
    )
    sequence_recency: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Source weight decay per step back for transitions (next-item evidence).",
    )
    weight_exponent: float = Field(
        0.5, ge=0, le=2, description="Exponent on a history item's folded weight (0 ignores it)."
    )
    vector_sharpness: float = Field(
        1.0, gt=0, le=20, description="Exponent on the scaled cosine (higher: trust top hits)."
    )
    vector_floor: float = Field(
        0.0,
        ge=-1,
        le=0,
        description="Lowest scaled cosine (below 0: behaviour candidates far from the user's "
        "taste are pushed down; measured on Beauty, 0 was better).",
    )
    vector_recency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Recency decay of the pooled user vector (None: the same as `recency`).",
    )
    max_sources: int = Field(20, ge=1, le=1000, description="Most recent history items used.")
    max_related: int = Field(50, ge=1, le=1000, description="Related items read per source.")
    kinds: dict[str, float] = Field(
        default_factory=dict,
        description="Weights of relation kinds without a field of their own (default: the "
        "vocabulary's).",
    )
    fitted_on: dict[str, Any] | None = Field(
        None, description="Provenance of fitted weights (data set, split, metric)."
    )

    @property
    def prior_weight(self) -> float:
        """What the popularity prior is multiplied by: its weight plus a tiny floor, so that
        the popularity fill still works at weight 0."""
        return self.popularity + 1e-6

    @property
    def pool_recency(self) -> float:
        """Recency decay used to pool the user vector."""
        return self.recency if self.vector_recency is None else self.vector_recency

    def kind_weight(self, kind: str) -> float:
        """Weight of a relation kind: its own field, else `kinds`, else the vocabulary's
        default (0 for an undeclared kind)."""
        if kind in _KIND_FIELDS:
            return float(getattr(self, kind))
        found = self.kinds.get(kind)
        if found is not None:
            return found
        try:
            return vocabulary.relation_kind(kind).weight
        except KeyError:
            return 0.0

    def with_kind_weights(self, weight_of: Callable[[RelationKindSpec], float]) -> BlendWeights:
        """A copy with every declared relation kind's weight set by `weight_of`."""
        fields: dict[str, Any] = {}
        others: dict[str, float] = dict(self.kinds)
        for spec in vocabulary.relation_kind_specs():
            if spec.name in _KIND_FIELDS:
                fields[spec.name] = weight_of(spec)
            else:
                others[spec.name] = weight_of(spec)
        return self.model_copy(update={**fields, "kinds": others})

    def save(self, path: Path) -> None:
        """Write the weights as a versioned JSON artifact."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": BLEND_FORMAT, "version": BLEND_VERSION, "weights": self.model_dump()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> BlendWeights:
        """Read an artifact written by `save`; raise BlendError naming what is wrong."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BlendError(f"cannot read blend weights {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != BLEND_FORMAT:
            raise BlendError(f"{path} is not a blend-weights artifact (format={BLEND_FORMAT!r})")
        if doc.get("version") != BLEND_VERSION:
            raise BlendError(
                f"{path} has blend-weights version {doc.get('version')!r}; "
                f"this relata reads version {BLEND_VERSION}"
            )
        try:
            return cls.model_validate(doc.get("weights", {}))
        except ValueError as exc:
            raise BlendError(f"invalid blend weights in {path}: {exc}") from exc


def _only(
    weights: BlendWeights,
    *,
    vector: float,
    popularity: float,
    kind: Callable[[RelationKindSpec], float],
) -> BlendWeights:
    return weights.with_kind_weights(kind).model_copy(
        update={"vector": vector, "popularity": popularity}
    )


def _off(spec: RelationKindSpec) -> float:
    return 0.0


STRATEGIES: dict[str, Callable[[BlendWeights], BlendWeights]] = {
    # Every signal, as weighted.
    "hybrid": lambda w: w,
    # The language model alone: the user vector's nearest items.
    "vector": lambda w: _only(w, vector=1.0, popularity=0.0, kind=_off),
    # Everything but the language model.
    "behaviour": lambda w: w.model_copy(update={"vector": 0.0}),
    # Baselines, one signal each.
    "popularity": lambda w: _only(w, vector=0.0, popularity=1.0, kind=_off),
    "cooccurrence": lambda w: _only(
        w, vector=0.0, popularity=0.0, kind=lambda s: float(s.signal == "co-occurrence")
    ),
    "transitions": lambda w: _only(
        w, vector=0.0, popularity=0.0, kind=lambda s: float(s.signal == "sequence")
    ),
}


class StrategyError(ValueError):
    """An unknown strategy name."""


def strategy_weights(strategy: str, weights: BlendWeights) -> BlendWeights:
    """The weights `strategy` ranks with, from the configured (or fitted) `weights`."""
    try:
        return STRATEGIES[strategy](weights)
    except KeyError:
        msg = f"unknown ranking strategy {strategy!r}; valid: {sorted(STRATEGIES)}"
        raise StrategyError(msg) from None
