#!/usr/bin/env bash
# tidemark's memory and readiness through an Elasticsearch outage under steady load
# (release build, default settings plus elasticsearch.enabled, the Elasticsearch
# stand-in `tidemark-sim es-double`). Prints one line per second: resident memory,
# /ready, replay-buffer events and rows written by the store and Elasticsearch sinks.
#
#   cargo build --release --bins && scripts/bench-es-outage.sh            # 50,000 events/s, outage at 30 s for 20 s
#   RATE=20000 DOWN_AT=20 DOWN_FOR=20 scripts/bench-es-outage.sh
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release"
work="$(mktemp -d)"
trap 'kill $tm $double $load 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
"$bin/tidemark-sim" es-double --listen 127.0.0.1:19200 > double.log 2>&1 &
double=$!
sleep 0.5
TIDEMARK__ELASTICSEARCH__ENABLED=true TIDEMARK__ELASTICSEARCH__URLS='["http://127.0.0.1:19200"]' \
  TIDEMARK__HTTP__LISTEN=127.0.0.1:18080 "$bin/tidemark" run > tidemark.log 2>&1 &
tm=$!
sleep 2
"$bin/tidemark-sim" load --url http://127.0.0.1:18080 --duration 70s --rate "${RATE:-50000}" --sensors 10000 --quiet > load.log 2>&1 &
load=$!
for t in $(seq 1 70); do
  sleep 1
  if [ "$t" = "${DOWN_AT:-30}" ]; then
    curl -s -XPOST "http://127.0.0.1:19200/_double/down?seconds=${DOWN_FOR:-20}" > /dev/null
  fi
  rss=$(awk '/VmRSS/{print int($2/1024)}' "/proc/$tm/status")
  ready=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18080/ready)
  state=$(curl -s http://127.0.0.1:18080/api/status | python3 -c \
    'import sys,json; d=json.load(sys.stdin); print(d["replayBufferEvents"], " ".join("%s=%s" % (s["name"], s["rowsWritten"]) for s in d["sinks"]))' 2>/dev/null)
  echo "t=${t}s rss=${rss}MiB ready=$ready buffered=$state"
done
wait $load
tail -1 load.log
