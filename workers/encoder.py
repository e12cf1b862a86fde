"""Text encoder: a Hugging Face transformer with mean pooling and L2 norm (sentence-transformers
compatible), loaded offline, with an optional linear adapter on top.

Batches are length-sorted (padding waste halves throughput otherwise) and the original order
is restored. On CUDA the model runs in bf16 and the next batch is tokenised on a helper thread
while the GPU works on the current one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModel, AutoTokenizer

from schemas.settings import EncoderSettings
from workers.adapter import LinearAdapter, load_adapter, normalise
from workers.model_identity import default_model_path, model_version

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# The packaged model's directory is named "model"; give it its real name.
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# CPU default dtype: without AMX or avx512_bf16, bf16 autocast runs several times slower than
# fp32. `dtype=bfloat16` turns it on for CPUs with AMX, where it is about twice as fast at a
# cosine of 0.9999 to the fp32 vectors.
CPU_DEFAULT_DTYPE = torch.float32


class EncoderError(RuntimeError):
    """The encoder could not be built (missing model files, bad device/dtype choice)."""


@runtime_checkable
class Encoder(Protocol):
    """Embeds texts as L2-normalised float32 rows of width `dim`."""

    name: str
    version: str
    dim: int

    def encode(self, texts: Sequence[str]) -> FloatArray: ...


def resolve_device(choice: str) -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise EncoderError(
            "RELATA_ENCODER_DEVICE=cuda but torch sees no CUDA device; use auto or cpu"
        )
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, the measured CPU default elsewhere."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else CPU_DEFAULT_DTYPE
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if choice == "float16" and device.type == "cpu":
        raise EncoderError("dtype float16 is not supported on CPU; choose float32 or bfloat16")
    return dtypes[choice]


class TransformerEncoder:
    """Mean-pooled transformer embeddings; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        version: str,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 32,
        max_length: int = 128,
        adapter: LinearAdapter | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.version = version
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_length = max_length
        self.adapter = adapter
        self.dim = int(model.config.hidden_size)
        if adapter is not None and adapter.dim != self.dim:
            msg = f"adapter dim {adapter.dim} does not match model {name} dim {self.dim}"
            raise EncoderError(msg)
        # Fast tokenizers fail ("Already borrowed") when one instance is used from two threads;
        # the indexer and recommender share one encoder in `relata workers --role all`.
        self._lock = threading.Lock()
        # One helper thread tokenises the next batch while the accelerator runs this one.
        self._tokenizer_pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
            if device.type == "cuda"
            else None
        )

    @classmethod
    def from_settings(cls, settings: EncoderSettings) -> TransformerEncoder:
        """Load model, tokenizer and adapter from local files only; never downloads."""
        model_dir = Path(settings.model_path) if settings.model_path else default_model_path()
        if not (model_dir / "config.json").is_file():
            msg = f"{model_dir} is not a Hugging Face model directory (no config.json)"
            raise EncoderError(msg)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        except OSError as exc:
            raise EncoderError(f"cannot load model from {model_dir}: {exc}") from exc
        model.eval()
        # On CUDA the weights themselves are cast; on CPU bf16 goes through autocast, which
        # keeps layer norms and softmax in fp32.
        model.to(device=device, dtype=dtype if device.type == "cuda" else torch.float32)
        adapter = load_adapter(settings.adapter_path) if settings.adapter_path else None
        name = DEFAULT_MODEL_NAME if settings.model_path is None else model_dir.name
        if adapter is not None:
            name = f"{name}+adapter"
        encoder = cls(
            model,
            tokenizer,
            name=name,
            version=model_version(model_dir, adapter),
            device=device,
            dtype=dtype,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            adapter=adapter,
        )
        logger.info(
            "encoder loaded name=%s version=%s dim=%d device=%s dtype=%s batch_size=%d",
            encoder.name,
            encoder.version,
            encoder.dim,
            device,
            dtype,
            settings.batch_size,
        )
        return encoder

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
        summed = (hidden.to(torch.float32) * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def _batches(self, texts: list[str], order: list[int]) -> Iterator[list[int]]:
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def encode(self, texts: Sequence[str]) -> FloatArray:
        """Embed `texts` (any order, any lengths) into L2-normalised float32 rows, in order."""
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        with self._lock:
            return self._encode(texts)

    def _encode(self, texts: list[str]) -> FloatArray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Characters are a cheap, good proxy of token counts for sorting.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = list(self._batches(texts, order))
        with torch.inference_mode():
            if self._tokenizer_pool is None:
                for idx in chunks:
                    vectors = self._forward(self._tokenize([texts[i] for i in idx]))
                    out[idx] = vectors.cpu().numpy()
            else:
                pending: Future[dict[str, torch.Tensor]] = self._tokenizer_pool.submit(
                    self._tokenize, [texts[i] for i in chunks[0]]
                )
                for n, idx in enumerate(chunks):
                    batch = pending.result()
                    if n + 1 < len(chunks):
                        pending = self._tokenizer_pool.submit(
                            self._tokenize, [texts[i] for i in chunks[n + 1]]
                        )
                    out[idx] = self._forward(batch).cpu().numpy()
        if self.adapter is not None:
            out = self.adapter.apply(out)
        return out

    def close(self) -> None:
        if self._tokenizer_pool is not None:
            self._tokenizer_pool.shutdown(wait=False)


def throughput_ceiling(encoder: Encoder, texts: Sequence[str], *, warmup: int = 64) -> float:
    """Pure batched inference rate (texts/s) of `encoder` on `texts`, after a short warm-up."""
    texts = list(texts)
    if not texts:
        raise ValueError("throughput_ceiling needs at least one text")
    encoder.encode(texts[: min(warmup, len(texts))])
    start = time.perf_counter()
    encoder.encode(texts)
    return len(texts) / (time.perf_counter() - start)


__all__ = [
    "Encoder",
    "EncoderError",
    "TransformerEncoder",
    "default_model_path",
    "model_version",
    "normalise",
    "throughput_ceiling",
]
