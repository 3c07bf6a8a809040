#!/usr/bin/env bash
# Runs every fuzz target, one after another, each for SECONDS (default 20; 0 = no time
# limit), passing any further arguments to libFuzzer (e.g. -runs=10000000). Stops at the
# first crash and exits non-zero; the crashing input is in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh                              # CI: 20 s per target
#   nice -n 19 fuzz/run.sh 0 -runs=10000000  # the long campaign (docs/RELIABILITY.md)
#   fuzz/run.sh 60 -- frame_body             # only the targets named after `--`
#   FUZZ_SANITIZER=none fuzz/run.sh 0 -runs=10000000   # without AddressSanitizer
#
# AddressSanitizer (the default, and what CI runs) finds memory errors in the unsafe
# code of dependencies; our own crates forbid unsafe code. It slows the public-key
# targets 3-4x, so the long campaign may run without it (its own build directory).
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
if [ "$sanitizer" != address ]; then
  build+=(--target-dir "target/$sanitizer")
fi
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build "${build[@]}"
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "== fuzz $target (${seconds}s, sanitizer $sanitizer ${flags[*]:-})"
  cargo fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=30 -print_final_stats=1 "${flags[@]}"
done
