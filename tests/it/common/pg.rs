//! A PostgreSQL server for the tests, in a schema of their own.
//!
//! The server is `JE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Each [`PgSchema`] is a fresh schema, dropped when it goes out of scope;
//! its [`url`](PgSchema::url) points a store (or the CLI) at it. When no
//! server answers, [`schema`] says so on stderr and returns `None` — unless
//! `JE_REQUIRE_PG=1` (as in CI), where a missing server fails the test.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server the tests use.
pub fn server_url() -> String {
    std::env::var("JE_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn required() -> bool {
    std::env::var("JE_REQUIRE_PG").is_ok_and(|v| v == "1")
}

/// A schema of its own on the test server, dropped on drop.
pub struct PgSchema {
    name: String,
    server: String,
}

impl PgSchema {
    /// A connection string for the schema (the server's, with the schema
    /// as its search path).
    pub fn url(&self) -> String {
        let separator = if self.server.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.server, self.name
        )
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A plain client on the schema, for raw SQL (as an attacker or an
    /// inspector would use).
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("the test server answers")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// A fresh schema on the test server, or `None` (said loudly) when there is
/// no server and none is required.
pub fn schema(test: &str) -> Option<PgSchema> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let server = server_url();
    let mut client = match postgres::Client::connect(&server, postgres::NoTls) {
        Ok(client) => client,
        Err(e) if !required() => {
            // Straight to the process's stderr: the harness keeps what a
            // passing test prints with eprintln!, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: no PostgreSQL server at {server} ({e}); set JE_PG_URL to run it (JE_REQUIRE_PG=1 makes this a failure)"
            );
            return None;
        }
        Err(e) => panic!("JE_REQUIRE_PG=1 but no PostgreSQL server at {server}: {e}"),
    };
    let name = format!(
        "je_test_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst),
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..8)
            .unwrap_or("x")
    );
    client
        .batch_execute(&format!("CREATE SCHEMA {name}"))
        .expect("the test server lets the tests create schemas");
    Some(PgSchema { name, server })
}
