"""The real all-MiniLM-L6-v2, loaded offline: reference match, ordering, adapter, sanity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from schemas.settings import EncoderSettings
from workers.adapter import save_adapter
from workers.encoder import Encoder, EncoderError, TransformerEncoder, default_model_path

pytestmark = pytest.mark.integration

TEXTS = [
    "Maybelline Color Sensational Creamy Matte Lipstick, Touch of Spice",
    "Head & Shoulders Classic Clean Anti-Dandruff Shampoo 13.5 oz",
    "L'Oreal Paris Colour Riche Lipstick, Blushing Berry",
    "x",
    "OPI Nail Lacquer, Big Apple Red. Category: Nails > Nail Polish. " * 6,
    "Pantene Pro-V Daily Moisture Renewal Shampoo",
]


@pytest.fixture(scope="module")
def encoder() -> TransformerEncoder:
    return TransformerEncoder.from_settings(EncoderSettings(device="cpu", batch_size=2))


def _reference(texts: list[str]) -> np.ndarray:
    """Plain transformers mean pooling + L2 norm, one unsorted batch (sentence-transformers' recipe)."""
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_matches_plain_transformers_mean_pooling(encoder: TransformerEncoder) -> None:
    assert isinstance(encoder, Encoder)
    out = encoder.encode(TEXTS)
    assert out.shape == (len(TEXTS), 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Length-sorted batches of 2 vs one padded batch: same vectors, same order.
    np.testing.assert_allclose(out, _reference(TEXTS), atol=2e-5)


def test_cosine_sanity_on_real_titles(encoder: TransformerEncoder) -> None:
    lip_a, shampoo_a, lip_b, _, _, shampoo_b = encoder.encode(TEXTS)
    assert lip_a @ lip_b > lip_a @ shampoo_a
    assert lip_a @ lip_b > lip_b @ shampoo_b
    assert shampoo_a @ shampoo_b > shampoo_a @ lip_b


def test_empty_input_and_identity(encoder: TransformerEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.name == "all-MiniLM-L6-v2"
    assert len(encoder.version) == 12
    assert (
        TransformerEncoder.from_settings(EncoderSettings(device="cpu")).version == encoder.version
    )


def test_adapter_is_applied_and_changes_the_version(
    encoder: TransformerEncoder, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    weight = np.eye(384) + 0.05 * rng.standard_normal((384, 384))
    bias = 0.01 * rng.standard_normal(384)
    path = save_adapter(tmp_path / "adapter.npz", weight, bias, {"note": "test"})
    adapted = TransformerEncoder.from_settings(EncoderSettings(device="cpu", adapter_path=path))
    assert adapted.version != encoder.version
    assert adapted.name.endswith("+adapter")
    base = encoder.encode(TEXTS[:3])
    expected = base @ weight.T.astype(np.float32) + bias.astype(np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(adapted.encode(TEXTS[:3]), expected, atol=1e-5)


def test_bad_model_dir_and_device_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=r"config\.json"):
        TransformerEncoder.from_settings(EncoderSettings(model_path=tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="no CUDA"):
            TransformerEncoder.from_settings(EncoderSettings(device="cuda"))
