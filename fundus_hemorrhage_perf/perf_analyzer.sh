#!/usr/bin/env bash
# perf_analyzer concurrency sweep of the ensemble with real photos. Not run in CI: perf_analyzer ships in the
# Triton SDK container, not in this venv. Start the server first (python serve.py, or make run), then:
#
#   python fundus_hemorrhage_perf/make_pa_input.py --photos ../shared/data/idrid_he/images        # -> fundus_hemorrhage_perf/results/pa_input.json
#   docker run --rm --net host -v "$PWD":/repo -w /repo \
#       nvcr.io/nvidia/tritonserver:24.10-py3-sdk bash fundus_hemorrhage_perf/perf_analyzer.sh
#
# Settings (environment variables):
#   URL=127.0.0.1:8001          server endpoint for PROTOCOL (use 127.0.0.1:8000 with PROTOCOL=http)
#   PROTOCOL=grpc               grpc | http
#   METRICS_URL=127.0.0.1:8002/metrics
#   BATCH=10                    photos per request (-b; the ensemble takes at most 16)
#   CONCURRENCY="1 2 4 8"       closed-loop concurrency levels, one perf_analyzer run each
#   WINDOW_MS=20000             measurement window (-p); a 10-photo request takes ~1 s, so keep it long
#   STABILITY=15                % max/min spread allowed over 3 windows (-s)
#   INPUT=fundus_hemorrhage_perf/results/pa_input.json     from fundus_hemorrhage_perf/make_pa_input.py
#   OUT=fundus_hemorrhage_perf/results/pa         CSV prefix: ${OUT}_c<concurrency>.csv
#   PROBABILITY=0               1: request parameter probability=true (gRPC only in perf_analyzer)
#
# What comes out, per level: throughput in inferences/s, where one inference is one photo (perf_analyzer counts
# batch elements), i.e. photos/s; client latency avg/p50/p90/p95/p99 of a whole BATCH-photo request; the
# server-side split (queue, compute input/infer/output) of the ensemble and of each composing model (verbose
# CSV); and, with --collect-metrics, Triton's Prometheus metrics sampled every second (on this CPU-only server
# mainly CPU utilisation/memory; the GPU columns stay empty).
set -euo pipefail

URL=${URL:-127.0.0.1:8001}
PROTOCOL=${PROTOCOL:-grpc}
METRICS_URL=${METRICS_URL:-127.0.0.1:8002/metrics}
BATCH=${BATCH:-10}
CONCURRENCY=${CONCURRENCY:-"1 2 4 8"}
WINDOW_MS=${WINDOW_MS:-20000}
STABILITY=${STABILITY:-15}
INPUT=${INPUT:-perf/results/pa_input.json}
OUT=${OUT:-perf/results/pa}
PROBABILITY=${PROBABILITY:-0}

if [[ ! -f "$INPUT" ]]; then
  echo "no $INPUT: run python fundus_hemorrhage_perf/make_pa_input.py first" >&2
  exit 2
fi
mkdir -p "$(dirname "$OUT")"

extra=()
if [[ "$PROBABILITY" == 1 ]]; then
  extra+=(--request-parameter probability:true:bool)
fi

for c in $CONCURRENCY; do
  echo "=== concurrency $c, batch $BATCH ==="
  perf_analyzer \
    -m hemorrhage_segmentation \
    -u "$URL" -i "$PROTOCOL" \
    -b "$BATCH" \
    --input-data "$INPUT" \
    --concurrency-range "$c:$c" \
    --measurement-mode time_windows -p "$WINDOW_MS" -s "$STABILITY" --max-trials 10 \
    --percentile 95 \
    --collect-metrics --metrics-url "$METRICS_URL" --metrics-interval 1000 \
    -f "${OUT}_c${c}.csv" --verbose-csv \
    ${extra[@]+"${extra[@]}"}
done
echo "CSV files: ${OUT}_c*.csv"
