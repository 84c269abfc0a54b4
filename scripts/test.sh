#!/usr/bin/env bash
# The project's test command: sets up what the tests need on loopback, then runs the
# format check, clippy and the whole test suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh api        # only tests whose name matches "api"
#
# Services (installed from Debian packages if missing, started on loopback with
# throw-away data directories, reused when already running):
#   PostgreSQL 15  TIDEMARK_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:55432/postgres)
#   Mosquitto      TIDEMARK_TEST_MQTT_URL     (default mqtt://127.0.0.1:51883)
#   schemathesis   TIDEMARK_SCHEMATHESIS      (PyPI, in a virtualenv under the state directory)
#   Python tools   TIDEMARK_TEST_PYTHON       (the same virtualenv: jsonschema, PyYAML and
#                                             kubernetes-validate, for tests/deploy.rs)
#   openssl        the CLI, for the JWT test's RSA key
#   Chromium       chromium + chromium-driver; chromedriver on TIDEMARK_TEST_CHROMEDRIVER
#                  (default http://127.0.0.1:59515), for the dashboard test
#   buildah        builds the Dockerfile's runtime stage from the local binary (tests/deploy.rs)
#   Prometheus     the Debian package's prometheus and promtool (TIDEMARK_TEST_PROMETHEUS,
#                  TIDEMARK_TEST_PROMTOOL); each observability test starts its own on loopback
# Kafka tests use librdkafka's in-process mock cluster and need no service.
set -euo pipefail
cd "$(dirname "$0")/.."

state_dir="${TIDEMARK_TEST_STATE:-/tmp/tidemark-test-services}"
mkdir -p "$state_dir"

. scripts/lib.sh

# A clean build gains nothing from incremental state, and it costs gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The port of a URL (`scheme://[user@]host:port[/path]`), or $2 when it names none: the
# services are started where the URLs given to this script say.
url_port() {
  local rest="${1#*://}"
  rest="${rest#*@}"
  rest="${rest%%/*}"
  case "$rest" in
    *:*) echo "${rest##*:}" ;;
    *) echo "$2" ;;
  esac
}

start_postgres() {
  export TIDEMARK_TEST_DATABASE_URL="${TIDEMARK_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:55432/postgres}"
  local port; port="$(url_port "$TIDEMARK_TEST_DATABASE_URL" 5432)"
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p "$port"; then return; fi
  apt_install postgresql postgresql-contrib
  local bin; bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
  local data="$state_dir/pg"
  local run=()
  if [ "$(id -u)" = 0 ]; then
    run=(runuser -u postgres --)
    chown postgres "$state_dir" 2>/dev/null || true
  fi
  if [ ! -s "$data/PG_VERSION" ]; then
    rm -rf "$data"; mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres "$data"
    "${run[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  "${run[@]}" "$bin/pg_ctl" -D "$data" -l "$state_dir/pg.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $state_dir -c fsync=off -c max_connections=400" start >/dev/null
  pg_isready -q -h 127.0.0.1 -p "$port" -t 30
  echo "postgresql on 127.0.0.1:$port (log $state_dir/pg.log)" >&2
}

start_mosquitto() {
  export TIDEMARK_TEST_MQTT_URL="${TIDEMARK_TEST_MQTT_URL:-mqtt://127.0.0.1:51883}"
  local port; port="$(url_port "$TIDEMARK_TEST_MQTT_URL" 1883)"
  # The MQTT tests also start brokers of their own (restarts, TLS) and use mosquitto_passwd.
  apt_install mosquitto mosquitto-clients
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
  # max_queued_messages: Mosquitto's default (1000 per client) drops what a busy
  # subscriber has not taken yet; tidemark's sessions need a real backlog.
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' "$port" \
    >"$state_dir/mosquitto.conf"
  mosquitto -c "$state_dir/mosquitto.conf" -d
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  echo "mosquitto on 127.0.0.1:$port" >&2
}

# Python tools from PyPI, in one virtualenv: schemathesis for the OpenAPI conformance
# test (tests/openapi.rs); jsonschema, PyYAML and kubernetes-validate for the deployment
# checks (tests/deploy.rs).
install_python_tools() {
  local venv="$state_dir/venv"
  if [ ! -x "$venv/bin/schemathesis" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    apt_install python3 python3-venv
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis>=4.32,<5' 'jsonschema>=4.20,<5' 'PyYAML>=6,<7' 'kubernetes-validate>=1.30,<2'
    # Byte-compiled up front, so the tests' time budget is not spent on it.
    "$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null 2>&1 || true
  fi
  export TIDEMARK_SCHEMATHESIS="$venv/bin/schemathesis"
  export TIDEMARK_TEST_PYTHON="$venv/bin/python"
  echo "schemathesis $("$TIDEMARK_SCHEMATHESIS" --version | awk '{print $NF}'), kubernetes-validate $("$venv/bin/kubernetes-validate" --version)" >&2
}

# The dashboard test (tests/dashboard.rs) drives headless Chromium over WebDriver.
start_chromedriver() {
  export TIDEMARK_TEST_CHROMEDRIVER="${TIDEMARK_TEST_CHROMEDRIVER:-http://127.0.0.1:59515}"
  local port; port="$(url_port "$TIDEMARK_TEST_CHROMEDRIVER" 9515)"
  apt_install chromium chromium-driver
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
  nohup chromedriver --port="$port" --allowed-ips=127.0.0.1 >"$state_dir/chromedriver.log" 2>&1 &
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  echo "chromedriver on 127.0.0.1:$port ($(chromium --version 2>/dev/null))" >&2
}

build_prerequisites
apt_install openssl prometheus buildah
start_postgres
start_mosquitto
install_python_tools
start_chromedriver

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features chaos -- -D warnings

# The suite runs with the `chaos` feature so fault-injection tests are included; with
# every chaos setting at its default (0) the build behaves exactly like a release.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --features chaos --no-fail-fast "$@"
else
  cargo test --features chaos --no-fail-fast -- "$@"
fi
