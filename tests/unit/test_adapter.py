"""The linear adapter artifact: round trip, validation, application."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.adapter import AdapterError, load_adapter, normalise, save_adapter


def test_round_trip_keeps_weights_meta_and_fingerprint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4))
    bias = rng.standard_normal(4)
    path = save_adapter(tmp_path / "sub" / "adapter", weight, bias, {"epochs": 3, "loss": 0.5})
    assert path.suffix == ".npz"
    adapter = load_adapter(path)
    np.testing.assert_allclose(adapter.weight, weight.astype(np.float32))
    np.testing.assert_allclose(adapter.bias, bias.astype(np.float32))
    assert adapter.meta == {"epochs": 3, "loss": 0.5}
    assert adapter.dim == 4
    assert adapter.fingerprint == load_adapter(path).fingerprint
    other = save_adapter(tmp_path / "other.npz", weight * 2, bias, {})
    assert load_adapter(other).fingerprint != adapter.fingerprint


def test_apply_is_linear_then_normalised(tmp_path: Path) -> None:
    weight = np.diag([2.0, 1.0, 1.0]).astype(np.float32)
    adapter = load_adapter(save_adapter(tmp_path / "a.npz", weight, np.zeros(3), {}))
    x = normalise(np.array([[1.0, 1.0, 0.0]], dtype=np.float32))
    out = adapter.apply(x)
    np.testing.assert_allclose(
        out, normalise(np.array([[2.0, 1.0, 0.0]], dtype=np.float32)), atol=1e-6
    )
    assert out.dtype == np.float32
    with pytest.raises(AdapterError, match="dim 3"):
        adapter.apply(np.ones((1, 4), dtype=np.float32))


def test_identity_adapter_changes_nothing(tmp_path: Path) -> None:
    adapter = load_adapter(save_adapter(tmp_path / "i.npz", np.eye(5), np.zeros(5), {}))
    x = normalise(np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32))
    np.testing.assert_allclose(adapter.apply(x), x, atol=1e-6)


@pytest.mark.parametrize(
    ("weight", "bias", "match"),
    [
        (np.ones((3, 4)), np.zeros(3), "square"),
        (np.eye(3), np.zeros(4), "bias"),
        (np.full((2, 2), np.nan), np.zeros(2), "NaN"),
    ],
)
def test_save_rejects_bad_shapes(
    tmp_path: Path, weight: np.ndarray, bias: np.ndarray, match: str
) -> None:
    with pytest.raises(AdapterError, match=match):
        save_adapter(tmp_path / "bad.npz", weight, bias, {})


def test_load_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", weight=np.eye(2))
    with pytest.raises(AdapterError, match="lacks"):
        load_adapter(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(AdapterError, match="readable"):
        load_adapter(tmp_path / "junk.npz")
