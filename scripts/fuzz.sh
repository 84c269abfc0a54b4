#!/usr/bin/env bash
# Run every fuzz target for a while (default 600 s each) with cargo-fuzz (libFuzzer,
# AddressSanitizer). Needs a nightly toolchain; installs cargo-fuzz if missing. New
# inputs that reach new code are added to fuzz/corpus/<target>/ (kept in the
# repository); a crash leaves its input in fuzz/artifacts/<target>/ and fails the run.
#
#   scripts/fuzz.sh            # 10 minutes per target
#   scripts/fuzz.sh 60 cursor  # one minute, one target
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-600}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(body_parser query_params cursor config_loader search_query)
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in "${targets[@]}"; do
  echo "== $target: $seconds s" >&2
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10
  cargo +nightly fuzz cmin "$target" >/dev/null 2>&1 || true
done
