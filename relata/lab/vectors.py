"""Item and user vectors of the offline evaluation: encodings cached on disk, exact cosine
hits with numpy (the same top-`candidates` list the live recommender gets from Qdrant, without
HNSW approximation), and the live pooled user vector."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relata.lab.protocol import Prepared
from workers.fitting import exact_hits
from workers.ranking import BlendWeights, VectorRows, pooled_user_vector

logger = logging.getLogger(__name__)


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
        arr: np.ndarray = np.load(path)
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
) -> list[list[tuple[str, float]]]:
    """Exact top-`top` cosine hits per user (rows of user_vectors; zero rows get none): the
    fit's exact search (`workers.fitting.exact_hits`)."""
    return exact_hits(user_vectors, item_matrix, item_ids, excluded, top=top)


def item_vectors(
    prepared: Prepared, *, encoder: Any, cache_dir: Path, progress: bool = True
) -> np.ndarray:
    from workers.item_text import item_text

    texts = [item_text(it) for it in prepared.items]
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
