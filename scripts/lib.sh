# Shared by the project's scripts (sourced, not run).

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root (or sudo) to run: $*" >&2; return 1; fi
}

# Install Debian packages that are missing.
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# What the build needs besides the Rust toolchain: OpenSSL (TLS to PostgreSQL, Kafka and
# Elasticsearch) found through pkg-config, and a C toolchain for the bundled C libraries.
build_prerequisites() {
  if command -v dpkg >/dev/null; then
    apt_install pkg-config libssl-dev gcc make
  fi
}
