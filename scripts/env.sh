# Sourced by the other scripts: one build directory outside the clone, reused by every run.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kappa/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
