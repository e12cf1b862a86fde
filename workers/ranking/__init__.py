"""Blend behaviour evidence and language-model similarity into explained recommendations.

Pure logic (numpy only): the live recommender and `relata evaluate` rank with the same code,
`recommend` (`core.py`), which scores (`score.py`) and words the reasons (`explain.py`) of a
batch of users from look-ups they are handed.

Score of a candidate item (each term on a [0, 1]-ish scale, so weights are comparable):
- association, two behaviour signals over the user's recent positive history items (sources),
  each with its own recency decay per step back and its source weights normalised to sum 1:
  item kNN (co-occurrence kinds: the related-items score, a cosine pair / sqrt(n_i n_j) from
  `streams.association`, decayed by `recency`) and transitions (sequence kinds: P(candidate |
  source), the evidence's confidence, decayed by `sequence_recency`), per relation kind
  weight (`schemas.vocabulary`);
- vector: cosine of the user vector with the candidate, scaled against this user's vector hits
  ((cos - weakest hit) / (best hit - weakest hit), bounded below by `vector_floor`). Behaviour
  candidates that are not vector hits get their cosine from `candidate_vectors` when given;
- popularity: log-scaled count, a weak prior and the fallback for sparse users.

After scoring, `recommend` may re-rank each list for diversity (MMR over the item vectors,
`diversity.py`), and answers a user with no usable history with trending items;
`recommend_answers` also gives each list its candidate pool (`pool.py`), what re-ranking it
per request needs.
"""

from .core import Answer, Lookups, recommend, recommend_answers
from .diversity import intra_list_diversity, mmr
from .explain import explain, rank, trending
from .learned import (
    FeatureRecorder,
    LearnedRanker,
    RankerError,
    Reranker,
    feature_names,
    train_model,
)
from .related import RelatedList, RelatedTable, VectorRows, kind_codes, popularity_of
from .score import (
    EvidenceRows,
    Scored,
    UserEvidence,
    evidence_rows,
    popularity_prior,
    score,
    user_evidence,
)
from .user_vector import pooled_user_vector, profile_text, source_weights
from .weights import (
    STRATEGIES,
    BlendError,
    BlendWeights,
    StrategyError,
    strategy_weights,
)

__all__ = [
    "STRATEGIES",
    "Answer",
    "BlendError",
    "BlendWeights",
    "EvidenceRows",
    "FeatureRecorder",
    "LearnedRanker",
    "Lookups",
    "RankerError",
    "RelatedList",
    "RelatedTable",
    "Reranker",
    "Scored",
    "StrategyError",
    "UserEvidence",
    "VectorRows",
    "evidence_rows",
    "explain",
    "feature_names",
    "intra_list_diversity",
    "kind_codes",
    "mmr",
    "pooled_user_vector",
    "popularity_of",
    "popularity_prior",
    "profile_text",
    "rank",
    "recommend",
    "recommend_answers",
    "score",
    "source_weights",
    "strategy_weights",
    "train_model",
    "trending",
    "user_evidence",
]
