#!/usr/bin/env bash
# WebSocket fan-out: ingestion at 100,000 events/s with and without 1,000 clients
# subscribed to every alert plus 100 subscribed to every prediction (release build,
# default settings, fresh SQLite store each run, all on loopback).
#
#   cargo build --release --bins && scripts/bench-ws.sh
#   SECONDS_PER_RUN=60 SENSORS=1000 RATE=100000 scripts/bench-ws.sh
#
# Prints per run: events/s achieved by the load generator, and for the run with clients
# what they received, the server's window fire → WebSocket send p50/p99 (HDR histogram
# in /api/status, measured after the socket flush) and the clients' stored → received
# p50/p99.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release"
seconds="${SECONDS_PER_RUN:-60}"
sensors="${SENSORS:-1000}"
rate="${RATE:-100000}"
http=127.0.0.1:18082
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true

start_tidemark() {
  rm -rf "$work/store" && mkdir -p "$work/store"
  TIDEMARK__HTTP__LISTEN="$http" TIDEMARK__STORE__URL="sqlite://$work/store/tidemark.db" \
    TIDEMARK__INGEST__LOG_DIR="$work/store/log" TIDEMARK__LOG__LEVEL=warn "$bin/tidemark" run >"$work/tidemark.log" 2>&1 &
  tm=$!
  pids+=($tm)
  until curl -sf "http://$http/health" >/dev/null; do sleep 0.05; done
}
stop_tidemark() { kill -TERM "$tm"; wait "$tm" 2>/dev/null || true; }
load() {
  "$bin/tidemark-sim" load --url "http://$http" --mode ndjson --batch-size 1000 --concurrency 4 \
    --sensors "$sensors" --rate "$rate" --duration "${seconds}s" --quiet 2>/dev/null | tail -1 |
    python3 -c '
import sys, json
r = json.load(sys.stdin)
print("{:,.0f} events/s, request p99 {:.1f} ms, {} refused".format(r["eventsPerSecond"], r["latencyP99Ms"], r["refused503"]))'
}

echo "== without WebSocket clients ($sensors sensors, target $rate events/s, ${seconds}s)"
start_tidemark
load
stop_tidemark

echo "== with 1,000 alert + 100 prediction subscribers"
start_tidemark
"$bin/tidemark-sim" ws-clients --url "ws://$http/ws" --alerts 1000 --predictions 100 \
  --duration "$((seconds + 40))s" >"$work/clients.json" &
clients=$!
pids+=($clients)
until [ "$(curl -s "http://$http/api/status" | python3 -c 'import sys,json; print(json.load(sys.stdin)["websocketConnections"])')" -ge 1100 ]; do sleep 0.2; done
load
# The last windows fire at the next boundary; let them reach the clients.
sleep 35
curl -s "http://$http/api/status" | python3 -c '
import sys, json
d = json.load(sys.stdin)["latency"]
w, s = d["windowFireToWebSocketSend"], d["windowFireToStoreAck"]
print("server: fire -> WebSocket send p50 {:.1f} ms, p99 {:.1f} ms over {:,} sends; fire -> store ack p99 {:.1f} ms".format(
    w["p50Ms"], w["p99Ms"], w["count"], s["p99Ms"]))'
wait "$clients" || true
python3 -c '
import sys, json
r = json.load(open(sys.argv[1]))
print("clients: {} connected, {} closed by the server; {:,} predictions, {:,} alerts; {} lagged ({} missed); stored -> received p50 {:.0f} ms, p99 {:.0f} ms".format(
    r["connected"], r["closedByServer"], r["predictionsReceived"], r["alertsReceived"], r["laggedMessages"], r["missed"],
    r["storeToClientP50Ms"], r["storeToClientP99Ms"]))' "$work/clients.json"
curl -s "http://$http/metrics" | grep -E '^tidemark_ws_(messages_dropped|disconnects)' || true
stop_tidemark
