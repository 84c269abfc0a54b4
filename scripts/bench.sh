#!/usr/bin/env bash
# The benchmark figures of docs/benchmarks.md, reproduced. Loopback only; every load is
# bounded in time. Run on an otherwise idle machine.
#
#   scripts/bench.sh replay     # 5M-event file through the pipeline (sink none), 3 runs
#   scripts/bench.sh keys       # resident bytes per open key with 1,000,000 keys
#   scripts/bench.sh keys-http  # the server's resident growth per key: 200,000 sensors posted over HTTP
#   scripts/bench.sh startup    # process start-up: replay of 1,000 events; server to /health
#   scripts/bench.sh http       # ingestion: batched NDJSON and single-event POSTs
#   scripts/bench.sh durability # batched NDJSON with ingest.durability memory, os, fsync
#   scripts/bench.sh latency    # window fire -> store ack at 100,000 events/s for 3 min
#   scripts/bench.sh all
#
# Workloads are written to $BENCH_DIR (default /tmp/tidemark-bench) once and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${BENCH_DIR:-/tmp/tidemark-bench}"
mkdir -p "$dir"
bin=target/release
cargo build --release --bins -q

workload() {
  # 1,000 sensors, 10,000 events/s of event time for 500 s, 10 % out of order by up to
  # 4 s (inside the 5 s bound), 20 injected anomalies: 4,997,000 events.
  [ -s "$dir/w5m.ndjson" ] || $bin/tidemark-sim --sensors 1000 --rate 10000 --duration 500s --disorder 0.1 \
    --max-disorder 4s --anomalies 20 --anomalies-after 300s --anomaly-duration 60s --seed 1 --write "$dir/w5m.ndjson"
}

replay() {
  workload
  for _ in 1 2 3; do
    $bin/tidemark replay --input "$dir/w5m.ndjson" 2>&1 >/dev/null | grep replayed
  done
}

keys() {
  # One event for each of 1,000,000 sensors: every key holds one open window.
  [ -s "$dir/keys1m.ndjson" ] || $bin/tidemark-sim --sensors 1000000 --rate 1000000 --duration 1s --anomalies 0 \
    --write "$dir/keys1m.ndjson"
  $bin/tidemark replay --input "$dir/keys1m.ndjson" 2>/dev/null | python3 -c \
    'import json,sys; d=json.load(sys.stdin); print("open keys %d, %.0f bytes per open key (RSS %d -> %d MiB)" % (d["openKeys"], d["bytesPerOpenKey"], d["rssBeforeInputBytes"]>>20, d["rssAfterInputBytes"]>>20))'
}

keys_http() {
  # The whole process, as an operator sees it: a server on the default configuration,
  # then one event for each of 200,000 sensors over HTTP (NDJSON, 10,000 per request);
  # resident growth / keys once every event is processed. Then the same sensors one hour
  # of event time later: every key's first window fires and is scored, so each key holds
  # a model that has learned (the `context` model's tables are allocated then) and one
  # open window. Per scoring model.
  [ -s "$dir/keys200k.ndjson" ] || $bin/tidemark-sim --sensors 200000 --rate 200000 --duration 1s --anomalies 0 \
    --write "$dir/keys200k.ndjson"
  rm -rf "$dir/keys200k" && mkdir -p "$dir/keys200k"
  split -l 10000 -d -a 3 "$dir/keys200k.ndjson" "$dir/keys200k/a."
  # +3,600,000 ms: every timestamp of the workload starts with 17672256.
  sed 's/"timestamp":17672256/"timestamp":17672292/' "$dir/keys200k.ndjson" | split -l 10000 -d -a 3 - "$dir/keys200k/b."
  status='http://127.0.0.1:18183/api/status'
  for model in ${MODELS:-context ewma}; do
    rm -rf "$dir/keys-http"
    TIDEMARK__SCORING__MODEL=$model TIDEMARK__HTTP__LISTEN=127.0.0.1:18183 \
      TIDEMARK__STORE__URL="sqlite://$dir/keys-http/k.db" TIDEMARK__LOG__LEVEL=warn $bin/tidemark run 2>/dev/null &
    server=$!
    until curl -sf http://127.0.0.1:18183/health >/dev/null; do sleep 0.05; done
    before=$(awk '/VmRSS/ {print $2}' /proc/$server/status)
    for round in a b; do
      for part in "$dir"/keys200k/$round.*; do
        curl -sf -o /dev/null -H 'content-type: application/x-ndjson' --data-binary @"$part" \
          http://127.0.0.1:18183/api/events
      done
      fired=$([ $round = a ] && echo 0 || echo 200000)
      until curl -sf $status | python3 -c '
import json, sys
d = json.load(sys.stdin); p = d["partitions"]; fired = int(sys.argv[1])
done = sum(x["openKeys"] for x in p) >= 200000 and all(x["inFlightEvents"] == 0 for x in p)
done = done and sum(x["windowsFired"] for x in p) >= fired and all(s["pendingResults"] == 0 for s in d["sinks"])
sys.exit(0 if done else 1)' $fired; do
        sleep 0.5
      done
      sleep 2 # let the store sink and checkpoints settle
      after=$(awk '/VmRSS/ {print $2}' /proc/$server/status)
      what=$([ $round = a ] && echo "one event per key" || echo "every key scored once")
      echo "$model, $what: RSS $((before / 1024)) -> $((after / 1024)) MiB, $(( (after - before) * 1024 / 200000 )) bytes per key"
    done
    kill -TERM $server; wait $server || true
  done
}

startup() {
  head -n 1000 "$dir/w5m.ndjson" >"$dir/w1k.ndjson" 2>/dev/null || { workload; head -n 1000 "$dir/w5m.ndjson" >"$dir/w1k.ndjson"; }
  hyperfine --warmup 3 --runs 20 -N "$bin/tidemark replay --input $dir/w1k.ndjson"
  for _ in 1 2 3; do
    rm -rf "$dir/startup"
    start=$(date +%s%N)
    TIDEMARK__HTTP__LISTEN=127.0.0.1:18181 TIDEMARK__STORE__URL="sqlite://$dir/startup/s.db" TIDEMARK__LOG__LEVEL=warn \
      $bin/tidemark run 2>/dev/null &
    pid=$!
    until curl -sf http://127.0.0.1:18181/health >/dev/null; do sleep 0.002; done
    echo "server: exec to /health 200 in $(( ($(date +%s%N) - start) / 1000000 )) ms (new SQLite store)"
    kill -TERM $pid; wait $pid || true
  done
}

with_server() {
  rm -rf "$dir/http"
  TIDEMARK__INGEST__DURABILITY="${DURABILITY:-fsync}" \
    TIDEMARK__HTTP__LISTEN=127.0.0.1:18182 TIDEMARK__STORE__URL="sqlite://$dir/http/h.db" TIDEMARK__LOG__LEVEL=warn \
    $bin/tidemark run 2>"$dir/http.log" &
  server=$!
  until curl -sf http://127.0.0.1:18182/health >/dev/null; do sleep 0.05; done
  "$@"
  curl -s http://127.0.0.1:18182/api/status | python3 -c \
    'import json,sys; d=json.load(sys.stdin); print("status latency:", json.dumps(d["latency"]))'
  kill -TERM $server; wait $server || true
}

http() {
  with_server $bin/tidemark-sim load --url http://127.0.0.1:18182 --mode ndjson --batch-size 1000 --concurrency 4 \
    --duration 15s --quiet
  with_server $bin/tidemark-sim load --url http://127.0.0.1:18182 --mode single --concurrency 32 --duration 15s --quiet
}

durability() {
  for durability in memory os fsync; do
    for _ in 1 2 3; do
      echo "ingest.durability = $durability"
      DURABILITY=$durability with_server $bin/tidemark-sim load --url http://127.0.0.1:18182 --mode ndjson \
        --batch-size 1000 --concurrency 4 --duration 10s --quiet 2>&1 | grep -v "^{"
    done
  done
}

latency() {
  with_server $bin/tidemark-sim load --url http://127.0.0.1:18182 --mode ndjson --batch-size 100 --concurrency 4 \
    --rate 100000 --duration 185s --quiet
}

case "${1:-all}" in
  replay) replay ;;
  keys) keys ;;
  keys-http) keys_http ;;
  startup) startup ;;
  http) http ;;
  durability) durability ;;
  latency) latency ;;
  all) replay; keys; startup; http; latency ;;
  *) echo "usage: $0 replay|keys|keys-http|startup|http|durability|latency|all" >&2; exit 2 ;;
esac
