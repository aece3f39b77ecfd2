//! `/metrics`, `/healthz` and `/readyz` over HTTP, on a thread of their own
//! (`tiny_http`: the engine is synchronous, and a scrape is one small
//! request).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::registry::Registry;
use tiny_http::{Header, Request, Response, Server};

use super::{Health, encode_openmetrics, encode_prometheus};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// The server [`serve`] started: it answers until dropped.
pub struct MetricsServer {
    server: Arc<Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// The address it listens on (the port chosen, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves, at `addr` (`HOST:PORT`), `/metrics` — `registry` in the
/// OpenMetrics text format to a scraper whose `Accept` names it, else in
/// the Prometheus text format 0.0.4 — and the probes `/healthz` and
/// `/readyz` from `health`: 200 `ok`, or 503 with the reason.
///
/// # Errors
/// The address cannot be bound.
pub fn serve(
    addr: &str,
    registry: Arc<Registry>,
    health: Arc<Health>,
) -> io::Result<MetricsServer> {
    let server = Arc::new(Server::http(addr).map_err(io::Error::other)?);
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other(format!("{addr}: not an IP address")))?;
    let serving = server.clone();
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in serving.incoming_requests() {
                answer(request, &registry, &health);
            }
        })?;
    Ok(MetricsServer {
        server,
        addr: bound,
        thread: Some(thread),
    })
}

/// Answers one request.
fn answer(request: Request, registry: &Registry, health: &Health) {
    let path = request.url().split('?').next().unwrap_or_default();
    let (status, content_type, body) = match path {
        "/metrics" if wants_openmetrics(&request) => {
            (200, OPENMETRICS, encode_openmetrics(registry))
        }
        "/metrics" => (200, PROMETHEUS_TEXT, encode_prometheus(registry)),
        "/healthz" => probe(health.live()),
        "/readyz" => probe(health.ready()),
        _ => (
            404,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::from_string(body).with_status_code(status);
    if let Ok(header) = Header::from_bytes("Content-Type", content_type) {
        response = response.with_header(header);
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "a metrics client went away before its answer");
    }
}

fn probe(answer: Result<(), String>) -> (u16, &'static str, String) {
    match answer {
        Ok(()) => (200, PLAIN, "ok\n".to_owned()),
        Err(reason) => (503, PLAIN, format!("{reason}\n")),
    }
}

fn wants_openmetrics(request: &Request) -> bool {
    request.headers().iter().any(|h| {
        h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
    })
}
