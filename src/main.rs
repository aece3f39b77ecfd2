//! The `job-executor` binary: a thin shell over [`job_executor::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    job_executor::cli::main(job_executor::cli::Cli::parse())
}
