//! The integration tests, one binary with a module per subject, so that a
//! change links the crate into one test executable. One module runs with
//! `cargo test --test it api::`; `common` and `browser` are the helpers.
//!
//! Two files keep binaries of their own, because their tests need the
//! process to themselves: `tests/command.rs` (one test installs a signal
//! handler for the whole process and signals every thread of it) and
//! `tests/pool.rs` (it counts the process's handler threads).

mod browser;
mod common;

mod api;
mod audit;
mod bus;
mod cli;
mod concurrency;
mod crash;
mod faults;
mod fleet;
mod fuzz;
mod lifecycle;
mod machine;
mod ops;
mod process;
mod proofs;
mod properties;
mod report;
mod report_browser;
mod simulation;
mod store;
mod tamper;
