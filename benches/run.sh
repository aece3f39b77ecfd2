#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md and regenerates its data and plot.
# Takes a few minutes; not part of CI's test run.
#   bash benches/run.sh [OUT_DIR]      (default docs/bench)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench}
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cargo build --release --quiet --bin job-executor --example workload
workload=target/release/examples/workload
bin=target/release/job-executor

echo "== throughput: engine vs raw SQLite, T = 1, 2, 4, 8, FULL and NORMAL" >&2
"$workload" --jobs 300 --steps 20 --runs 7 --threads 1,2,4,8 --sync full,normal \
    --dir "$scratch" | tee "$out/workload.jsonl"

echo "== one job's replay as the log grows from 10k to 1M events" >&2
"$workload" --scale "$scratch/scale.db" --steps 20 --threads 2 | tee "$out/scale.jsonl"

echo "== peak memory of whole-log replay and verify at 10k and 100k jobs" >&2
: > "$out/memory.jsonl"
for jobs in 10000 100000; do
    db="$scratch/jobs-$jobs.db"
    "$workload" --generate "$db" --jobs "$jobs" --steps 2 --threads 2 > /dev/null
    for what in replay verify; do
        if [ "$what" = replay ]; then cmd=("$workload" --replay-only "$db"); else cmd=("$bin" verify --db "$db"); fi
        /usr/bin/time -f "%M %e" -o "$scratch/time" "${cmd[@]}" > /dev/null
        read -r rss_kb seconds < "$scratch/time"
        echo "{\"jobs\":$jobs,\"events\":$((jobs * 6)),\"what\":\"$what\",\"peak_rss_kb\":$rss_kb,\"seconds\":$seconds}" \
            | tee -a "$out/memory.jsonl"
    done
done

echo "== PostgreSQL: engine vs raw inserts with the same commits, T = 1 and 8" >&2
cargo build --release --quiet --example workload_pg
# Exits 3, saying SKIPPED, when no server answers at JE_PG_URL.
if target/release/examples/workload_pg --jobs 200 --steps 20 --runs 7 --threads 1,8 \
    > "$scratch/postgres.jsonl"; then
    cp "$scratch/postgres.jsonl" "$out/postgres.jsonl"
    cat "$out/postgres.jsonl"
fi

python3 benches/plot.py "$out/workload.jsonl" > docs/throughput.svg
python3 benches/table.py "$out/workload.jsonl" >&2
echo "wrote $out/*.jsonl and docs/throughput.svg" >&2
