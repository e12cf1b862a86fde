#!/usr/bin/env bash
# One command for a GPU machine: the encoder's ceiling (bf16, large length-sorted batches) on
# both shipped catalogs, then a short `relata bench` of the full pipeline with the encoder on
# CUDA. Prints the figures; writes JSON (and the latency PNG) under $OUT.
#
#   scripts/gpu_check.sh                 # OUT=/tmp/relata-gpu-check, RATE=1000, DURATION=20
#   OUT=$PWD/out RATE=2000 scripts/gpu_check.sh
#   SKIP_BENCH=1 scripts/gpu_check.sh    # encoder only (no Java/Kafka needed)
#
# The bench needs Java 17+ and the Kafka jars (resolved once by Maven into ~/.cache/relata),
# or an external broker in RELATA_KAFKA_BOOTSTRAP_SERVERS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/relata-gpu-check}
RATE=${RATE:-1000}
DURATION=${DURATION:-20}
BATCH_SIZES=${BATCH_SIZES:-"128 512 1024"}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda available:", ok); sys.exit(0 if ok else 1)' \
  || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 1; }

export RELATA_ENCODER_DEVICE=cuda RELATA_ENCODER_DTYPE=bfloat16

echo "== encoder ceiling (pure batched inference, bf16, length-sorted batches) =="
for BATCH in $BATCH_SIZES; do
  RELATA_ENCODER_BATCH_SIZE=$BATCH "$PY" - "$OUT/encoder_b$BATCH.json" <<'PYEOF'
import json, sys
from pathlib import Path

from relata.lab.bench_encoder import catalog_texts
from schemas.settings import EncoderSettings
from workers.encoder import TransformerEncoder, throughput_ceiling

settings = EncoderSettings()
encoder = TransformerEncoder.from_settings(settings)
result = {"batch_size": settings.batch_size, "device": str(encoder.device), "dtype": str(encoder.dtype)}
for name in ("online-retail", "amazon-beauty"):
    _, texts, _ = catalog_texts(Path("data") / name)
    # Repeat the catalog so a run lasts long enough to time on a fast GPU.
    texts = texts * max(1, 50_000 // len(texts))
    result[name] = {"texts": len(texts), "texts_per_s": round(throughput_ceiling(encoder, texts), 1)}
print(json.dumps(result))
Path(sys.argv[1]).write_text(json.dumps(result, indent=2) + "\n")
PYEOF
done

if [[ "${SKIP_BENCH:-0}" == "1" ]]; then
  echo "gpu_check: SKIP_BENCH=1, pipeline bench skipped"
  exit 0
fi

echo "== relata bench: full pipeline, rate $RATE/s for $DURATION s, encoder on CUDA =="
RELATA_ENCODER_BATCH_SIZE=${BENCH_BATCH:-512} "$PY" -c "from relata.cli.main import main; main(prog_name='relata')" bench \
  --data data/online-retail --rate "$RATE" --duration "$DURATION" --warmup 3 \
  --json "$OUT/bench.json"
"$PY" - "$OUT/bench.json" <<'PYEOF'
import json, sys

r = json.load(open(sys.argv[1]))
lat = r["latency_ms"]
print(f"offered {r['rate']}/s achieved {r['achieved_rate']}/s")
print(f"latency ms: p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']}")
print(f"encoder in pipeline {r.get('encoder_texts_per_s')} texts/s, ceiling {r.get('encoder_ceiling_texts_per_s')} texts/s")
print(f"rss MB: {r.get('rss_mb')}")
PYEOF
