"""A linear adapter on top of the frozen encoder: the artifact `relata train` writes.

Convention (shared by the trainer and the encoder): the input is the L2-normalised pooled
embedding `x` (rows), the output is `normalise(x @ weight.T + bias)` (torch `nn.Linear`
layout: `weight` is out×in). Stored as one `.npz` holding `weight`, `bias` and the metadata
as JSON text under `meta_json`. numpy only, so evaluation can apply it to cached vectors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


class AdapterError(ValueError):
    """An adapter artifact is missing, malformed or does not fit the encoder."""


@dataclass(frozen=True)
class LinearAdapter:
    """`normalise(x @ weight.T + bias)`; `fingerprint` identifies the artifact's content."""

    weight: FloatArray
    bias: FloatArray
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, vectors: FloatArray) -> FloatArray:
        """Map L2-normalised rows through the adapter and re-normalise them."""
        if vectors.ndim != 2 or vectors.shape[1] != self.weight.shape[1]:
            msg = f"adapter expects rows of dim {self.weight.shape[1]}, got shape {vectors.shape}"
            raise AdapterError(msg)
        out = vectors.astype(np.float32, copy=False) @ self.weight.T + self.bias
        return normalise(out)


def normalise(vectors: FloatArray) -> FloatArray:
    """L2-normalise rows (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: FloatArray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return out


def _fingerprint(weight: FloatArray, bias: FloatArray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(bias, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def _validated(weight: Any, bias: Any) -> tuple[FloatArray, FloatArray]:
    w = np.asarray(weight, dtype=np.float32)
    b = np.asarray(bias, dtype=np.float32)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise AdapterError(f"adapter weight must be a square dim×dim matrix, got shape {w.shape}")
    if b.shape != (w.shape[0],):
        raise AdapterError(f"adapter bias must have shape ({w.shape[0]},), got {b.shape}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise AdapterError("adapter weight/bias contain NaN or infinity")
    return w, b


def save_adapter(path: Path, weight: Any, bias: Any, meta: dict[str, Any]) -> Path:
    """Write the adapter artifact to `path` (a `.npz`); `meta` must be JSON-serialisable."""
    w, b = _validated(weight, bias)
    meta_json = json.dumps(meta, sort_keys=True)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, weight=w, bias=b, meta_json=np.array(meta_json))
    tmp.replace(path)
    return path


def load_adapter(path: Path) -> LinearAdapter:
    """Read an artifact written by `save_adapter`; raise `AdapterError` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(
            f"adapter artifact {path} does not exist (write one with `relata train`)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"weight", "bias"} - set(data.files)
            if missing:
                msg = f"adapter artifact {path} lacks {sorted(missing)}; found {sorted(data.files)}"
                raise AdapterError(msg)
            w, b = _validated(data["weight"], data["bias"])
            meta = json.loads(str(data["meta_json"])) if "meta_json" in data.files else {}
    except (OSError, ValueError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"adapter artifact {path} is not a readable .npz: {exc}") from exc
    return LinearAdapter(weight=w, bias=b, meta=meta, fingerprint=_fingerprint(w, b))
