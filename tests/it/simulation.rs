//! The deterministic simulation of the worker fleet (`tests/sim/`), over
//! the seeds CI runs: every seed clean, every kind of fault actually
//! struck, and a seed's run the same twice. Any number of seeds:
//! `cargo run --release --example simulate -- --seeds N [--start S]`.

#[path = "../sim/mod.rs"]
mod sim;

/// Seeds CI runs: a few seconds in a debug build.
const SEEDS: u64 = 500;

/// Every seed keeps every guarantee, and across them every fault the
/// simulation claims to inject came to pass: crashes, takeovers, appends
/// refused by the store's fence, steps recorded interrupted, cancels.
#[test]
fn every_seed_keeps_every_guarantee_under_faults() {
    let totals = sim::run_seeds(0, SEEDS, false, |_| {});
    let failed: Vec<String> = totals
        .failed
        .iter()
        .map(|r| {
            format!(
                "seed {}: {}\n  replay: {}",
                r.seed,
                r.violations.join("\n  - "),
                sim::replay_command(r.seed)
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{}\n{}",
        failed.join("\n"),
        totals.json()
    );
    let c = totals.counters;
    let struck = [
        ("jobs", c.jobs),
        ("steps", c.steps),
        ("crashes", c.crashes),
        ("takeovers", c.takeovers),
        ("fenced_appends", c.fenced_appends),
        ("interrupted", c.interrupted),
        ("cancels", c.cancels),
    ];
    for (what, count) in struck {
        assert!(count > 0, "no {what} in {SEEDS} seeds: {}", totals.json());
    }
}

/// The same seed runs the same: the same decisions, the same log, byte
/// for byte (the trace's hash covers both).
#[test]
fn a_seed_runs_the_same_twice() {
    for seed in 0..40 {
        let first = sim::run_seed(seed, true);
        let second = sim::run_seed(seed, true);
        if first.trace_hash != second.trace_hash {
            let diverged = first
                .trace
                .iter()
                .zip(&second.trace)
                .position(|(a, b)| a != b)
                .unwrap_or(first.trace.len().min(second.trace.len()));
            panic!(
                "seed {seed} ran two ways, from trace line {diverged}:\n{:?}\n{:?}",
                first.trace.get(diverged),
                second.trace.get(diverged)
            );
        }
        assert!(!first.trace.is_empty());
    }
}
