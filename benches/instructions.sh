#!/usr/bin/env bash
# Instructions per event, counted by callgrind (repeatable whatever else the
# machine does): the engine (`workload --generate`) and the same-commit raw
# baselines (`workload --baseline-only`: into a table of the same shape with
# no rules, and, with --same-table, into the log's own table, its CHECKs and
# triggers included), each at two sizes, so that what the
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
count() { # jobs mode [flag]
    valgrind --tool=callgrind --callgrind-out-file="$scratch/cg.out" \
        target/release/examples/workload "--$2" "$scratch/$2-$1.db" ${3:+"$3"} --jobs "$1" \
        --steps 20 --threads "$threads" --sync "$sync" 2>&1 >/dev/null |
        sed -n 's/.*refs: *//p' | tr -d ,
}
for what in generate baseline-only "baseline-only --same-table"; do
    read -r mode flag <<< "$what"
    small=$(count 100 "$mode" "$flag")
    large=$(count 200 "$mode" "$flag")
    rm -f "$scratch"/*.db*
    # 100 more jobs of 20 steps: 100 × 42 events.
    echo "{\"what\":\"$what\",\"threads\":$threads,\"sync\":\"$sync\",\"instructions_per_event\":$(( (large - small) / 4200 ))}"
done
