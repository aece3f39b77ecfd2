#!/usr/bin/env bash
# Instructions per event, counted by callgrind (repeatable whatever else the
# machine does): the engine (`workload --generate`) and the same-commit raw
# baseline (`workload --baseline-only`), each at two sizes, so that what the
# program does once (start-up, schema) cancels out:
#   (Ir at 200 jobs - Ir at 100 jobs) / (events at 200 - events at 100).
# Valgrind's CPU has no SHA extensions: SHA-256 runs its software code under
# callgrind, so hashing weighs more here than on the real CPU.
#   bash benches/instructions.sh [THREADS] [SYNC]     (default 1 normal)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-1}
sync=${2:-normal}
cargo build --release --quiet --example workload
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
count() { # mode jobs
    valgrind --tool=callgrind --callgrind-out-file="$scratch/cg.out" \
        target/release/examples/workload "--$1" "$scratch/$1-$2.db" --jobs "$2" --steps 20 \
        --threads "$threads" --sync "$sync" 2>&1 >/dev/null |
        sed -n 's/.*refs: *//p' | tr -d ,
}
for mode in generate baseline-only; do
    small=$(count "$mode" 100)
    large=$(count "$mode" 200)
    # 100 more jobs of 20 steps: 100 × 42 events.
    echo "{\"what\":\"$mode\",\"threads\":$threads,\"sync\":\"$sync\",\"instructions_per_event\":$(( (large - small) / 4200 ))}"
done
