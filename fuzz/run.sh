#!/usr/bin/env bash
# Runs every fuzz target, one after another, each for SECONDS (default 20; 0 = no time
# limit), passing any further arguments to libFuzzer (e.g. -runs=10000000). Stops at the
# first crash and exits non-zero; the crashing input is in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh                              # CI: 20 s per target
#   nice -n 19 fuzz/run.sh 0 -runs=10000000  # the long campaign (docs/RELIABILITY.md)
#   fuzz/run.sh 60 -- frame_body             # only the targets named after `--`
#   FUZZ_SANITIZER=none fuzz/run.sh 0 -runs=10000000   # without AddressSanitizer
#   FUZZ_SANITIZER=none FUZZ_TRACE_COMPARES=0 fuzz/run.sh 0 -- interaction
#
# AddressSanitizer (the default, and what CI runs) finds memory errors in the unsafe
# code of dependencies; our own crates forbid unsafe code. It slows the public-key
# targets 3-4x, so the long campaign may run without it (its own build directory).
# FUZZ_TRACE_COMPARES=0 drops the comparison hooks, which cost `interaction` (whose input
# is a script, not a format to guess) most of its time inside curve25519's arithmetic.
#
# New inputs go to fuzz/corpus/<target>/ (not checked in); the checked-in seeds in
# fuzz/seeds/<target>/ are read as a second corpus.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
shift || true
flags=()
targets=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then
    shift
    targets=("$@")
    break
  fi
  flags+=("$1")
  shift
done

# cargo-fuzz needs nightly compiler flags (sanitizers, coverage); only stable is
# installed, so let it use them.
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}
build=(-s "$sanitizer")
build_dir=target/$sanitizer
if [ "${FUZZ_TRACE_COMPARES:-1}" = 0 ]; then
  build+=(--no-trace-compares)
  build_dir+=-notc
fi
if [ "$build_dir" != target/address ]; then
  build+=(--target-dir "$build_dir")
fi
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
  cargo fuzz build "${build[@]}"
else
  for target in "${targets[@]}"; do
    cargo fuzz build "${build[@]}" "$target"
  done
fi
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "== fuzz $target (${seconds}s, ${build[*]} ${flags[*]:-})"
  cargo fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=30 -print_final_stats=1 "${flags[@]}"
done
