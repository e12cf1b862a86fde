"""Fitting the adaptive parts of the ranking from user histories, and refitting them live.

One procedure (`procedure.fit`): histories and item vectors in; each user's latest new
positive item held out for validation (`split.py`); the association evidence learned from the
rest only (injected: the stream processor's fold); the blend weights searched vectorised
(`search.py`), with pluggable fitted parts (a user encoder; offline, an item adapter); the
candidate and the current model validated by the live ranking core (`offline.py`) on the same
targets. The recommender's background fitter (`refit.py`), `relata evaluate` and
`relata train` run it. Pure: numpy, no Kafka, Qdrant or torch (the sequence user encoder's
step, `encoder_step.py`, needs torch: it is imported only where a fit uses it).
"""

from .bundle import BUILTIN, ItemAdapterFit, ModelBundle, UserEncoder, load_bundle, load_ranker
from .offline import (
    Evidence,
    ItemSpace,
    VectorInputs,
    exact_hits,
    ndcg_at,
    pooled_vectors,
    rank_offline,
    search_inputs,
    user_matrix,
    vector_inputs,
)
from .procedure import (
    EvidenceSource,
    FitError,
    FitResult,
    ItemStep,
    TrainingData,
    UserEncoderStep,
    Validation,
    fit,
    prepare_validation,
)
from .search import GRID, BlendSearch, coordinate_search
from .split import ValidationCase, ValidationSplit, split_histories

__all__ = [
    "BUILTIN",
    "GRID",
    "BlendSearch",
    "Evidence",
    "EvidenceSource",
    "FitError",
    "FitResult",
    "ItemAdapterFit",
    "ItemSpace",
    "ItemStep",
    "ModelBundle",
    "TrainingData",
    "UserEncoder",
    "UserEncoderStep",
    "Validation",
    "ValidationCase",
    "ValidationSplit",
    "VectorInputs",
    "coordinate_search",
    "exact_hits",
    "fit",
    "load_bundle",
    "load_ranker",
    "ndcg_at",
    "pooled_vectors",
    "prepare_validation",
    "rank_offline",
    "search_inputs",
    "split_histories",
    "user_matrix",
    "vector_inputs",
]
