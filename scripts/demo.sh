#!/usr/bin/env bash
# Build tidemark and run the demo on embedded defaults: SQLite in data/, an in-process
# simulator, 5-second windows. Installs the C build prerequisites if they are missing.
#
#   scripts/demo.sh                 # the demo
#   scripts/demo.sh --sensors 100   # options of `tidemark demo`
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
build_prerequisites
exec cargo run --release --bin tidemark -- demo "$@"
