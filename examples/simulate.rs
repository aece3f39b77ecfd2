//! The deterministic simulation of the worker fleet (`tests/sim/`): runs
//! seeds, prints each failing seed's violations and the command that
//! replays it, and ends with one JSON line of totals. Exits 1 when a seed
//! failed.
//!
//! ```text
//! cargo run --release --example simulate -- --seeds N [--start S] [--trace]
//! ```
//!
//! `--trace` prints every seed's trace (what the scheduler did, and the
//! log it left) and its SHA-256: a seed run twice prints the same.

use std::process::ExitCode;

#[path = "../tests/sim/mod.rs"]
mod sim;

struct Options {
    seeds: u64,
    start: u64,
    trace: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        seeds: 100,
        start: 0,
        trace: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let value = args.next().ok_or(format!("{name} needs a number"))?;
            value
                .parse()
                .map_err(|_| format!("{name}: not a number: {value}"))
        };
        match arg.as_str() {
            "--seeds" => options.seeds = number("--seeds")?,
            "--start" => options.start = number("--start")?,
            "--trace" => options.trace = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("simulate: {e}\nusage: simulate --seeds N [--start S] [--trace]");
            return ExitCode::from(2);
        }
    };
    let totals = sim::run_seeds(options.start, options.seeds, options.trace, |report| {
        for line in &report.trace {
            println!("{line}");
        }
        show(report, options.trace);
    });
    println!("{}", totals.json());
    if totals.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints what a seed came to: its violations and how to replay it, when
/// it failed; its trace's hash, when asked.
fn show(report: &sim::SeedReport, hash: bool) {
    if hash {
        println!("seed {}: trace sha256:{}", report.seed, report.trace_hash);
    }
    if report.violations.is_empty() {
        return;
    }
    println!(
        "seed {}: {} violations",
        report.seed,
        report.violations.len()
    );
    for violation in &report.violations {
        println!("  - {violation}");
    }
    println!("  replay: {}", sim::replay_command(report.seed));
}
