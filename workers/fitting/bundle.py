"""The fitted model a recommender serves with: blend weights, and the optional parts a fit may
add (a learned user encoder; an item adapter, offline only), under one content version.

The version names what ranked a list (`Recommendation.ranking_version`): `builtin` for the
built-in weights, else a digest of the weights and the parts, so the same fit gives the same
version in every process and a restart from a saved bundle serves under the same name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from schemas.messages import HistoryEntry
from workers.ranking import BlendWeights, LearnedRanker

FloatArray = npt.NDArray[np.float32]
BUILTIN = "builtin"


class UserEncoder(Protocol):
    """A learned user vector (the pluggable fit step's result): histories in, one vector per
    history out (None: none), read from the item vectors it is given."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def user_vectors(
        self, histories: Sequence[Sequence[HistoryEntry]], item_vectors: Mapping[str, np.ndarray]
    ) -> list[FloatArray | None]: ...

    def save(self, path: Path) -> None: ...


@dataclass(frozen=True)
class ItemAdapterFit:
    """An item adapter fitted offline (`relata train`): the adapted item matrix, the artifact
    that makes it (`workers.adapter.LinearAdapter`) and its provenance. It changes the indexed
    item vectors, so it is served only after `relata reindex`, never swapped in live."""

    matrix: FloatArray
    artifact: Any
    meta: dict[str, Any]
    digest: str


@dataclass(frozen=True)
class ModelBundle:
    """What ranks: the blend weights and the optional fitted parts."""

    weights: BlendWeights = field(default_factory=BlendWeights)
    user_encoder: UserEncoder | None = None
    item_adapter: ItemAdapterFit | None = None
    ranker: LearnedRanker | None = None

    @cached_property
    def version(self) -> str:
        """`builtin`, or a digest of what ranks (provenance excluded). An item adapter is not
        part of it: the item vectors it makes are named by the recommendation's
        `vectors_version` (the encoder's version covers its adapter)."""
        plain = self.weights.model_copy(update={"fitted_on": None})
        if plain == BlendWeights() and self.user_encoder is None and self.ranker is None:
            return BUILTIN
        doc = {
            "weights": plain.model_dump(),
            "user_encoder": None
            if self.user_encoder is None
            else f"{self.user_encoder.name}@{self.user_encoder.version}",
        }
        if self.ranker is not None:
            doc["ranker"] = self.ranker.digest
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return f"fit-{digest[:10]}"

    @property
    def score(self) -> float | None:
        """The validation NDCG the fit that made it recorded, if any."""
        found = (self.weights.fitted_on or {}).get("ndcg")
        return float(found) if isinstance(found, int | float) else None

    def save(self, path: Path) -> None:
        """Write the bundle's blend weights (`BlendWeights.save`, the `relata train`
        artifact) with its version in the provenance; a user encoder saves itself beside it
        (`<path>.user-encoder`), a learned ranker too (`<path>.ranker`)."""
        fitted = dict(self.weights.fitted_on or {})
        fitted["version"] = self.version
        encoder_path = user_encoder_path(path)
        if self.user_encoder is not None:
            self.user_encoder.save(encoder_path)
        elif encoder_path.is_dir():
            # A stale encoder beside weights fitted without one would be loaded with them.
            shutil.rmtree(encoder_path)
        ranker_path = learned_ranker_path(path)
        if self.ranker is not None:
            tmp = ranker_path.with_name(ranker_path.name + ".tmp")
            tmp.write_bytes(self.ranker.to_bytes())
            tmp.replace(ranker_path)
        else:
            ranker_path.unlink(missing_ok=True)
        self.weights.model_copy(update={"fitted_on": fitted}).save(path)


def user_encoder_path(path: Path) -> Path:
    """Where a bundle saved at `path` keeps its user encoder (a directory)."""
    return path.with_name(path.name + ".user-encoder")


def learned_ranker_path(path: Path) -> Path:
    """Where a bundle saved at `path` keeps its learned ranker (a file)."""
    return path.with_name(path.name + ".ranker")


def load_ranker(path: Path) -> LearnedRanker | None:
    """The learned ranker saved beside the bundle at `path`, if any."""
    ranker_path = learned_ranker_path(path)
    return LearnedRanker.from_bytes(ranker_path.read_bytes()) if ranker_path.is_file() else None


def load_bundle(path: Path) -> ModelBundle:
    """A bundle saved by `ModelBundle.save` (or any blend-weights artifact): its weights, and
    the sequence user encoder and learned ranker saved beside them, if any."""
    weights = BlendWeights.load(path)
    ranker = load_ranker(path)
    encoder_path = user_encoder_path(path)
    if not encoder_path.is_dir():
        return ModelBundle(weights=weights, ranker=ranker)
    from workers.user_encoder import load_user_encoder  # torch: only when there is one

    return ModelBundle(weights=weights, user_encoder=load_user_encoder(encoder_path), ranker=ranker)
