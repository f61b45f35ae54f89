# shellcheck shell=bash
# build_bins: builds the gateway and loadgen binaries for $PROFILE (debug unless
# release), unless SKIP_BUILD is set: scripts/test builds them once with the
# test suite's features, and a `cargo build -p gateway -p loadgen` after that
# would rebuild the crates for another feature set.
build_bins() {
  if [[ -n "${SKIP_BUILD:-}" ]]; then
    return
  elif [[ "${PROFILE:-debug}" == release ]]; then
    cargo build --locked --release -p gateway -p loadgen
  else
    cargo build --locked -p gateway -p loadgen
  fi
}
