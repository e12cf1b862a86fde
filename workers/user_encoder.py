"""The sequence user encoder: a user's recent history in, a unit vector in the item space out.

A small learned model over the frozen item vectors as indexed (the transformer's, through the
adapter when one is in use): a linear input projection (the query side's own adapter), event
type, position, age and count embeddings, `layers` pre-norm self-attention layers, attention
pooling, and an output projection added to the pooled history vector (the `pooled` user
vector, `workers.ranking.pooled_user_vector`) before the L2 norm. The output projection starts
at zero, so an untrained encoder is exactly pooling. The item side never changes: the store
is searched by cosine with the encoder's vectors as with pooled ones, so swapping encoders
needs no reindex.

The artifact is a directory: `config.json` (architecture, input features, provenance) and
`weights.safetensors` (tensors only: loading runs no code). `fingerprint` hashes both, so a
recommendation's strategy can name the encoder that made it. `fit_user_encoder`
(`workers.user_encoder_fit`) trains one; `UserEncoderSlot` holds the live one and swaps it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from schemas.messages import HistoryEntry
from workers.sequence_inputs import HistoryArrays, InputConfig, history_arrays

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
ARTIFACT_FORMAT = "relata.user-encoder"
ARTIFACT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class UserEncoderError(ValueError):
    """A user-encoder artifact is missing, malformed or does not fit the item vectors."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture; with the input config it rebuilds the model from its weights."""

    item_dim: int = 384
    hidden: int = 128
    # One self-attention layer: with it a two-minute fit on two CPU cores reaches about three
    # epochs of amazon-beauty's histories (docs/benchmarks.md).
    layers: int = 1
    heads: int = 4
    ff: int = 256
    dropout: float = 0.1


class SequenceModel(nn.Module):
    """See the module docstring. Inputs are `HistoryArrays` as tensors plus the item rows."""

    def __init__(self, model: ModelConfig, inputs: InputConfig) -> None:
        super().__init__()
        h = model.hidden
        self.project = nn.Linear(model.item_dim, h)
        self.type_emb = nn.Embedding(max(1, len(inputs.event_types)), h)
        self.pos_emb = nn.Embedding(inputs.max_len, h)
        self.age_emb = nn.Embedding(inputs.age_buckets, h)
        self.count_emb = nn.Embedding(inputs.count_buckets, h)
        self.norm_in = nn.LayerNorm(h)
        self.drop = nn.Dropout(model.dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                h,
                model.heads,
                dim_feedforward=model.ff,
                dropout=model.dropout,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(model.layers)
        )
        self.norm_out = nn.LayerNorm(h)
        # How much each history item's own vector counts, on top of its pooled weight.
        self.weigh = nn.Linear(h, 1)
        self.query = nn.Parameter(torch.zeros(h))
        self.out = nn.Linear(h, model.item_dim)
        # Zero re-weighting and output: the untrained encoder is the pooled vector, and
        # training starts there.
        for layer in (self.weigh, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for emb in (self.type_emb, self.pos_emb, self.age_emb, self.count_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(
        self,
        vectors: torch.Tensor,  # [B, L, D] item vectors, zero in empty slots
        present: torch.Tensor,  # [B, L] bool: a vector in the slot
        types: torch.Tensor,  # [B, L] long
        ages: torch.Tensor,  # [B, L] long
        counts: torch.Tensor,  # [B, L] long
        pool: torch.Tensor,  # [B, L] float: pooled-base weights
    ) -> torch.Tensor:
        """Unit user vectors [B, D]; every row needs a present slot with a pool weight."""
        length = vectors.shape[1]
        positions = torch.arange(length, device=vectors.device)
        x = (
            self.project(vectors)
            + self.type_emb(types)
            + self.pos_emb(positions)[None]
            + self.age_emb(ages)
            + self.count_emb(counts)
        )
        x = self.drop(self.norm_in(x))
        padding = ~present
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        x = self.norm_out(x)
        # The base: the history's own item vectors, weighted by their pooled weights times a
        # learned factor per item in its context (exactly pooling at the start). Items
        # outside the pooled ones start at a negligible weight.
        logits = torch.log(pool.clamp(min=1e-6)) + self.weigh(x).squeeze(-1)
        alpha = torch.softmax(logits.masked_fill(padding, float("-inf")), dim=1)
        base = torch.nn.functional.normalize((alpha.unsqueeze(-1) * vectors).sum(1), dim=-1)
        # The correction: attention-pooled context, projected into the item space.
        scores = (x @ self.query).masked_fill(padding, float("-inf"))
        summary = (torch.softmax(scores, dim=1).unsqueeze(-1) * x).sum(1)
        return torch.nn.functional.normalize(base + self.out(summary), dim=-1)


def batch_tensors(
    arrays: HistoryArrays, matrix: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The model's inputs for `arrays`, cut to the longest row's width (short histories do not
    pay for the padding of long ones)."""
    used = np.flatnonzero((arrays.items >= 0).any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    items = torch.from_numpy(np.ascontiguousarray(arrays.items[:, :width])).to(device)
    present = items >= 0
    vectors = matrix[items.clamp(min=0)] * present.unsqueeze(-1)

    def long(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a[:, :width])).to(device).long()

    pool = torch.from_numpy(np.ascontiguousarray(arrays.pool[:, :width])).to(device)
    return vectors, present, long(arrays.types), long(arrays.ages), long(arrays.counts), pool


@dataclass
class UserEncoder:
    """A fitted sequence model with its configs; `encode` answers a recommender's batch."""

    model: SequenceModel
    model_config: ModelConfig
    input_config: InputConfig
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.model.eval()
        if not self.fingerprint:
            self.fingerprint = fingerprint_of(self.model, self.model_config, self.input_config)

    @property
    def name(self) -> str:
        """How recommendations name it: `sequence-<fingerprint>`."""
        return f"sequence-{self.fingerprint}"

    @property
    def version(self) -> str:
        """What a fitted model bundle names it by (`workers.fitting.ModelBundle.version`)."""
        return self.fingerprint

    def user_vectors(
        self, histories: Sequence[Sequence[HistoryEntry]], item_vectors: Mapping[str, np.ndarray]
    ) -> list[F32 | None]:
        """`encode`, as the fit procedure calls a user encoder."""
        return self.encode(histories, item_vectors)

    def save(self, path: Path) -> None:
        """`save_user_encoder` to the directory `path`."""
        save_user_encoder(path, self)

    def to(self, device: torch.device) -> UserEncoder:
        self.model.to(device)
        self.device = device
        return self

    def encode_arrays(self, arrays: HistoryArrays, matrix: F32, *, batch: int = 1024) -> F32:
        """User vectors of `arrays` (rows of `matrix`); zero rows where the encoder does not
        answer (`HistoryArrays.usable`)."""
        out = np.zeros((len(arrays), self.model_config.item_dim), dtype=np.float32)
        todo = np.flatnonzero(arrays.usable())
        if not len(todo):
            return out
        if matrix.shape[1] != self.model_config.item_dim:
            msg = (
                f"user encoder {self.name} reads item vectors of dim "
                f"{self.model_config.item_dim}, got {matrix.shape[1]}"
            )
            raise UserEncoderError(msg)
        # Rows in order of history length: each chunk pads to about its own width.
        lengths = (arrays.items[todo] >= 0).sum(axis=1)
        todo = todo[np.argsort(lengths, kind="stable")]
        # Only the rows these histories read go to the device, not the whole catalog.
        used, local = np.unique(arrays.items[todo], return_inverse=True)
        offset = 1 if used[0] < 0 else 0  # -1 (empty slots) sorts first
        local_rows: npt.NDArray[np.int32] = (local.reshape(len(todo), -1) - offset).astype(np.int32)
        rows = torch.from_numpy(np.ascontiguousarray(matrix[used[offset:]], dtype=np.float32))
        rows = rows.to(self.device)
        with torch.inference_mode():
            for s in range(0, len(todo), batch):
                part = arrays.take(todo[s : s + batch])
                part.items = local_rows[s : s + batch]
                found = self.model(*batch_tensors(part, rows, self.device))
                out[todo[s : s + batch]] = found.float().cpu().numpy()
        return out

    def encode(
        self, histories: Sequence[Sequence[HistoryEntry]], vectors: Mapping[str, np.ndarray]
    ) -> list[F32 | None]:
        """One vector per history (None: no item vector to start from, as pooling), in one
        forward pass per `batch` rows. `vectors`: the item vectors by id (a `VectorRows`
        hands its matrix over without copying)."""
        matrix, rows = _as_matrix(vectors, histories, self.input_config.max_len)
        arrays = history_arrays(histories, rows, self.input_config)
        found = self.encode_arrays(arrays, matrix)
        ok = arrays.usable()
        return [found[n] if ok[n] else None for n in range(len(histories))]


def _as_matrix(
    vectors: Mapping[str, np.ndarray], histories: Sequence[Sequence[HistoryEntry]], max_len: int
) -> tuple[F32, Mapping[str, int]]:
    matrix = getattr(vectors, "matrix", None)
    rows = getattr(vectors, "rows", None)
    if isinstance(matrix, np.ndarray) and isinstance(rows, Mapping):
        return matrix, rows
    ids = list(
        dict.fromkeys(e.item_id for h in histories for e in h[:max_len] if e.item_id in vectors)
    )
    if not ids:
        return np.zeros((0, 0), dtype=np.float32), {}
    stacked = np.stack([np.asarray(vectors[i], dtype=np.float32) for i in ids])
    return stacked, {i: n for n, i in enumerate(ids)}


def fingerprint_of(model: nn.Module, model_config: ModelConfig, input_config: InputConfig) -> str:
    """A content hash of the configs and every weight (changes with any of them)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_configs(model_config, input_config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _configs(model_config: ModelConfig, input_config: InputConfig) -> dict[str, Any]:
    inputs = asdict(input_config)
    inputs["event_types"] = list(input_config.event_types)
    return {"model": asdict(model_config), "inputs": inputs}


def save_user_encoder(path: Path, encoder: UserEncoder) -> Path:
    """Write the artifact directory `path` (config.json, weights.safetensors), replacing the
    files of one written before."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        **_configs(encoder.model_config, encoder.input_config),
        "fingerprint": encoder.fingerprint,
        "meta": encoder.meta,
    }
    state = {
        k: v.detach().float().cpu().contiguous() for k, v in encoder.model.state_dict().items()
    }
    # Weights first, then the config that names their fingerprint, each replaced by a rename.
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path / WEIGHTS_FILE)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(path / CONFIG_FILE)
    return path


def load_user_encoder(path: Path, *, device: torch.device | None = None) -> UserEncoder:
    """Read an artifact written by `save_user_encoder`; `UserEncoderError` names what is
    wrong (missing, another format, corrupt weights, weights that do not match the config)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        msg = (
            f"user encoder artifact {path} needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(write one with `relata train`)"
        )
        raise UserEncoderError(msg)
    try:
        doc = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserEncoderError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
        raise UserEncoderError(f"{config_path} is not a user-encoder artifact ({ARTIFACT_FORMAT})")
    if doc.get("version") != ARTIFACT_VERSION:
        msg = (
            f"{config_path} has user-encoder version {doc.get('version')!r}; "
            f"this relata reads version {ARTIFACT_VERSION}"
        )
        raise UserEncoderError(msg)
    try:
        model_config = ModelConfig(**doc["model"])
        inputs = dict(doc["inputs"])
        inputs["event_types"] = tuple(inputs["event_types"])
        input_config = InputConfig(**inputs)
        model = SequenceModel(model_config, input_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserEncoderError(f"invalid configuration in {config_path}: {exc}") from exc
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserEncoderError(f"{weights_path} is not readable safetensors: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserEncoderError(f"{weights_path} does not fit {config_path}: {exc}") from exc
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise UserEncoderError(f"{weights_path} holds NaN or infinite weights")
    encoder = UserEncoder(
        model=model, model_config=model_config, input_config=input_config, meta=doc.get("meta", {})
    )
    if doc.get("fingerprint") not in (None, encoder.fingerprint):
        msg = (
            f"{path}: weights do not match the fingerprint in {CONFIG_FILE} "
            f"({doc.get('fingerprint')} vs {encoder.fingerprint}): a partial or mixed copy"
        )
        raise UserEncoderError(msg)
    return encoder.to(device or torch.device("cpu"))


class UserEncoderSlot:
    """The live encoder, swappable while the recommender runs: a batch reads `current()` once
    and encodes with that encoder, whatever a concurrent `swap` does meanwhile."""

    def __init__(self, encoder: UserEncoder | None = None) -> None:
        self._lock = threading.Lock()
        self._encoder = encoder

    def current(self) -> UserEncoder | None:
        with self._lock:
            return self._encoder

    def swap(self, encoder: UserEncoder | None) -> UserEncoder | None:
        """Install `encoder` (None: back to pooling); returns the one it replaces."""
        with self._lock:
            old, self._encoder = self._encoder, encoder
        logger.info(
            "user encoder swapped old=%s new=%s",
            None if old is None else old.name,
            None if encoder is None else encoder.name,
        )
        return old
