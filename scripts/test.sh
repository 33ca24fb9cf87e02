#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (warnings are errors), unit tests, the
# sqllogictest files, the randomized oracle test and the client compatibility tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
