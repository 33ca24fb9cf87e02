#!/usr/bin/env bash
# Builds and starts the Kappa server with its embedded defaults on 127.0.0.1:5466.
# Extra arguments go to `kappa serve` (e.g. --listen 0.0.0.0:5466).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
cargo build --release --workspace --bins
exec "$CARGO_TARGET_DIR/release/kappa" serve "$@"
