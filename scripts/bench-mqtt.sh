#!/usr/bin/env bash
# MQTT ingestion throughput: Mosquitto → tidemark → results (release build, default
# settings plus mqtt.enabled), beside the broker's own limit measured in the same run
# with its own client (mosquitto_sub) on the same backlog.
#
#   cargo build --release --bins && scripts/bench-mqtt.sh          # 600,000 messages
#   EVENTS_SECONDS=300 scripts/bench-mqtt.sh                       # 300,000
#
# 1. broker limit: a persistent mosquitto_sub session is created, the backlog is
#    published into it (tidemark-sim, 4 QoS 1 publishers), then mosquitto_sub drains it
#    with QoS 1 — messages/s from its start to the last message.
# 2. tidemark, backlog: the same backlog is published into tidemark's session while it is
#    stopped; tidemark starts and drains it — messages/s from its start until every
#    event is processed by the partitions (in the ingest log, windows updated).
# 3. tidemark, live: tidemark runs while the publishers send as fast as they can —
#    messages/s over the publishing time, and how long after the last publish every
#    event was processed; beside mosquitto_sub in the same situation (1b).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release"
seconds="${EVENTS_SECONDS:-600}"
sensors=1000
rate=1000
expected=$((seconds * rate))
port=41883
http=127.0.0.1:18081
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"

now() { date +%s.%N; }
rate_of() { python3 -c "print(f'{$1 / ($3 - $2):,.0f}')"; }

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\nuser root\n' \
  "$port" > mosquitto.conf
mosquitto -c mosquitto.conf > mosquitto.log 2>&1 &
pids+=($!)
sleep 0.5
publish() {
  "$bin/tidemark-sim" --mqtt "mqtt://127.0.0.1:$port" --mqtt-topic "$1/{sensorId}/data" --no-pace --start 2026-01-01T00:00:00Z \
    --sensors "$sensors" --rate "$rate" --duration "${seconds}s" --anomalies 0 --mqtt-publishers 4 2>&1 | tail -1
}
processed() {
  curl -s "http://$http/api/status" | python3 -c \
    'import sys,json; d=json.load(sys.stdin); print(sum((p.get("positions") or {}).get("processed",0) for p in d["partitions"]))' \
    2>/dev/null || echo 0
}
wait_processed() {
  while [ "$(processed)" -lt "$1" ]; do sleep 0.05; done
}
run_tidemark() {
  TIDEMARK__MQTT__ENABLED=true TIDEMARK__MQTT__URL="mqtt://127.0.0.1:$port" TIDEMARK__MQTT__CLIENT_ID="$1" \
    TIDEMARK__MQTT__TOPICS="[\"$2/{sensorId}/data\"]" TIDEMARK__HTTP__LISTEN="$http" \
    TIDEMARK__STORE__URL="sqlite://$work/$1.db" "$bin/tidemark" run > "$1.log" 2>&1 &
  tm=$!
  pids+=($tm)
  until curl -s "http://$http/api/status" | grep -q '"subscribed":true'; do sleep 0.02; done
}
stop_tidemark() { kill -TERM "$tm"; wait "$tm" 2>/dev/null || true; }

echo "== $expected messages, $sensors sensors, QoS 1, $(nproc) cores"

# 1. The broker's own limit: mosquitto_sub drains a backlog of the same size.
mosquitto_sub -p "$port" -q 1 -c -i bench-sub -t 'limit/#' -W 1 > /dev/null 2>&1 || true
echo "publish backlog (broker limit): $(publish limit)"
start=$(now)
mosquitto_sub -p "$port" -q 1 -c -i bench-sub -t 'limit/#' -C "$expected" > /dev/null
end=$(now)
echo "broker limit, mosquitto_sub -q 1 draining the backlog: $(rate_of "$expected" "$start" "$end") messages/s"

# 1b. ... and live: mosquitto_sub subscribed while the publishers send.
mosquitto_sub -p "$port" -q 1 -t 'limitlive/#' -C "$expected" > /dev/null &
sub=$!
sleep 0.5
start=$(now)
echo "publish live (broker limit): $(publish limitlive)"
wait "$sub"
end=$(now)
echo "broker limit, mosquitto_sub -q 1 live: $(rate_of "$expected" "$start" "$end") messages/s end to end"

# 2. tidemark drains the same backlog into results (its session subscribed first).
run_tidemark backlog backlog
stop_tidemark
echo "publish backlog (tidemark stopped): $(publish backlog)"
start=$(now)
run_tidemark backlog backlog
wait_processed "$expected"
end=$(now)
echo "tidemark draining the backlog into results: $(rate_of "$expected" "$start" "$end") messages/s"
stop_tidemark

# 3. Live: tidemark runs while the publishers send.
run_tidemark live live
start=$(now)
echo "publish live: $(publish live)"
published=$(now)
wait_processed "$expected"
end=$(now)
echo "tidemark live: $(rate_of "$expected" "$start" "$end") messages/s end to end; last event processed $(python3 -c "print(f'{($end - $published) * 1000:.0f}')") ms after the last publish"
curl -s "http://$http/api/status" | python3 -c 'import sys,json; print("mqtt status:", json.load(sys.stdin)["mqtt"])'
stop_tidemark
