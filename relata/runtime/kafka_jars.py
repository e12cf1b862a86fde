"""The embedded broker's jars: resolved once by Maven (`relata/runtime/kafka/pom.xml`) into a
cache directory outside git, atomically, so that concurrent or interrupted runs never leave a
half cache."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from schemas.settings import EmbeddedKafkaSettings

logger = logging.getLogger(__name__)

_MARKER = "RELATA_RESOLVED"


class EmbeddedKafkaError(RuntimeError):
    """The embedded broker could not be resolved, started or reached."""


def resource_text(name: str) -> str:
    return resources.files("relata.runtime").joinpath("kafka", name).read_text(encoding="utf-8")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_complete(jars: Path) -> bool:
    return (jars / _MARKER).is_file()


def resolve_jars(settings: EmbeddedKafkaSettings, *, mvn: str = "mvn") -> Path:
    """Return the directory of the broker's jars, resolving them with Maven on first use.

    Maven writes into a temp dir next to the cache, which is renamed into place only when
    complete; a file lock serialises concurrent resolvers so the work happens once.
    """
    jars = settings.jars_dir()
    if _cache_complete(jars):
        return jars
    with _file_lock(jars.parent / f".{jars.name}.lock"):
        if _cache_complete(jars):
            return jars
        if shutil.which(mvn) is None:
            msg = f"Maven ({mvn!r}) is not on PATH; it is needed once to resolve Kafka into {jars}"
            raise EmbeddedKafkaError(msg)
        # Under the lock nobody else resolves: any partial dir is a leftover of a killed run.
        for leftover in jars.parent.glob(f".{jars.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{jars.name}.partial-", dir=jars.parent))
        try:
            pom = staging / "pom.xml"
            pom.write_text(resource_text("pom.xml"), encoding="utf-8")
            out = staging / "jars"
            cmd = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-Dkafka.version={settings.version}",
                f"-DoutputDirectory={out}",
            ]
            logger.info("resolving kafka jars version=%s into=%s", settings.version, jars)
            started = time.monotonic()
            proc = subprocess.run(cmd, cwd=staging, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not any(out.glob("kafka_2.13-*.jar")):
                tail = (proc.stdout + proc.stderr)[-4000:]
                msg = f"mvn failed to resolve Kafka {settings.version} (exit {proc.returncode}):\n{tail}"
                raise EmbeddedKafkaError(msg)
            names = sorted(p.name for p in out.glob("*.jar"))
            (out / _MARKER).write_text(f"kafka {settings.version}\n" + "\n".join(names) + "\n")
            if jars.exists():  # an incomplete leftover of something other than us
                shutil.rmtree(jars)
            os.rename(out, jars)
            logger.info(
                "resolved kafka jars count=%d seconds=%.1f dir=%s",
                len(names),
                time.monotonic() - started,
                jars,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return jars
