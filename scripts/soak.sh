#!/usr/bin/env bash
# Memory over a steady run: tidemark (release) on a fresh SQLite store, fed by
# `tidemark-sim load` at a fixed rate; the server's resident memory is sampled every
# 10 s. Prints the samples and the growth from the end of warm-up to the end.
#
#   scripts/soak.sh [duration=10m] [rate=50000] [port=18080]
#
# The store is SQLite in a temp directory unless SOAK_STORE_URL names another (e.g. a
# PostgreSQL database, whose cache then lives outside the measured process). rss_anon
# is the heap; rss_file includes SQLite's memory-mapped database pages.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10m}"; rate="${2:-50000}"; port="${3:-18080}"
cargo build --release --bins -q
work="$(mktemp -d)"
TIDEMARK__HTTP__LISTEN="127.0.0.1:$port" TIDEMARK__STORE__URL="${SOAK_STORE_URL:-sqlite://$work/soak.db}" TIDEMARK__LOG__LEVEL=warn \
  target/release/tidemark run 2>"$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
target/release/tidemark-sim load --url "http://127.0.0.1:$port" --mode ndjson --batch-size 500 --concurrency 4 \
  --rate "$rate" --duration "$duration" --quiet >"$work/load.json" 2>"$work/load.err" &
load=$!
echo "seconds,rss_kib,rss_anon_kib,rss_file_kib"
start=$(date +%s)
while kill -0 $load 2>/dev/null; do
  echo "$(( $(date +%s) - start )),$(awk '/^VmRSS/ {r=$2} /^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {print r","a","f}' /proc/$server/status)"
  sleep 10
done
cat "$work/load.err" >&2
curl -s "http://127.0.0.1:$port/api/status" | python3 -c \
  'import json,sys; d=json.load(sys.stdin); print("fire->ack", d["latency"]["windowFireToStoreAck"], file=sys.stderr)'
