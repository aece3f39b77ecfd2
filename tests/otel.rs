//! Traces over OTLP (feature `otel`): a worker run with `--otlp-endpoint`
//! exports its spans to a receiver this test runs — an HTTP server taking
//! `POST /v1/traces` and decoding each body with `opentelemetry-proto`, as
//! a collector does — and the claim, job and step spans arrive with their
//! parents, attributes and status.
//!
//! A binary of its own: it needs the crate built with `otel`
//! (`cargo test --features otel --test otel`).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use prost::Message;
use serde_json::json;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_job-executor");

/// What the receiver took: each request's resource attributes and spans.
#[derive(Default)]
struct Received {
    resources: Vec<Vec<KeyValue>>,
    spans: Vec<Span>,
    /// Requests refused: wrong method, path or content type, or a body
    /// that does not decode.
    refused: Vec<String>,
}

/// An OTLP/HTTP receiver of traces on a port of its own.
struct Receiver {
    url: String,
    received: Arc<Mutex<Received>>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let received = Arc::new(Mutex::new(Received::default()));
        let thread = {
            let (server, received) = (server.clone(), received.clone());
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    take(request, &received);
                }
            })
        };
        Receiver {
            url,
            received,
            server,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Received {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Takes one export request, as a collector's OTLP/HTTP receiver does.
fn take(mut request: tiny_http::Request, received: &Mutex<Received>) {
    let content_type = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Content-Type"))
        .map(|h| h.value.to_string());
    let mut body = Vec::new();
    let read = request.as_reader().read_to_end(&mut body);
    let what = format!("{} {} {content_type:?}", request.method(), request.url());
    let decoded = (request.method() == &tiny_http::Method::Post
        && request.url() == "/v1/traces"
        && content_type.as_deref() == Some("application/x-protobuf")
        && read.is_ok())
    .then(|| ExportTraceServiceRequest::decode(body.as_slice()).ok())
    .flatten();
    let mut received = received.lock().unwrap();
    let status = match decoded {
        Some(export) => {
            for resource_spans in export.resource_spans {
                let resource = resource_spans.resource.unwrap_or_default();
                received.resources.push(resource.attributes);
                for scope in resource_spans.scope_spans {
                    received.spans.extend(scope.spans);
                }
            }
            200
        }
        None => {
            received.refused.push(what);
            400
        }
    };
    drop(received);
    // An empty ExportTraceServiceResponse: a full success.
    let response = tiny_http::Response::from_data(Vec::new())
        .with_status_code(status)
        .with_header(
            "Content-Type: application/x-protobuf"
                .parse::<tiny_http::Header>()
                .unwrap(),
        );
    let _ = request.respond(response);
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .env("JE_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn value(attributes: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v: AnyValue| v.value)
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match value(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(i),
        _ => None,
    }
}

fn status(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |s| s.code)
}

/// Submits a job of two steps, the second with no handler, and runs a
/// worker `w1` exporting to `receiver` until it is idle: the job's id, and
/// what the receiver took.
fn run_worker(receiver: Receiver) -> (String, Received) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = json!({"contract_id": Uuid::nil(), "steps": [
        {"step_index": 0, "step_type": "capability_enable", "target": "a"},
        {"step_index": 1, "step_type": "no_such_type", "target": "b"}]});
    std::fs::write(d.join("plan.json"), plan.to_string()).unwrap();
    let out = cli(d, &["submit", "plan.json", "--db", "o.db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job = text(&out.stdout).trim().to_owned();
    let args = [
        "worker",
        "--db",
        "o.db",
        "--worker-id",
        "w1",
        "--until-idle",
        "--otlp-endpoint",
        &receiver.url,
    ];
    let out = cli(d, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let received = receiver.stop();
    assert!(received.refused.is_empty(), "{:?}", received.refused);
    (job, received)
}

/// The spans of one name.
fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// A worker's run of a job with a failing step: its claim, its job and
/// both steps arrive as one trace, each child under its parent, with the
/// fields the logs carry and the failed job marked ERROR with `error.type`,
/// under a resource naming the service.
#[test]
fn a_worker_exports_its_claim_job_and_steps_over_otlp() {
    let (job, received) = run_worker(Receiver::start());
    assert!(!received.resources.is_empty());
    for resource in &received.resources {
        assert_eq!(
            string(resource, "service.name").as_deref(),
            Some("job-executor")
        );
        assert_eq!(
            string(resource, "service.version").as_deref(),
            Some(job_executor::EXECUTOR_VERSION)
        );
    }
    let [claim] = named(&received.spans, "claim")[..] else {
        panic!("{:?}", received.spans);
    };
    let [job_span] = named(&received.spans, "job")[..] else {
        panic!("{:?}", received.spans);
    };
    let mut steps = named(&received.spans, "step");
    steps.sort_by_key(|s| int(&s.attributes, "step_index"));
    assert_eq!(steps.len(), 2, "{steps:?}");

    // One trace, rooted at the claim: claim → job → steps.
    assert!(claim.parent_span_id.is_empty());
    assert_eq!(job_span.parent_span_id, claim.span_id);
    assert_eq!(job_span.trace_id, claim.trace_id);
    for step in &steps {
        assert_eq!(step.parent_span_id, job_span.span_id);
        assert_eq!(step.trace_id, claim.trace_id);
        // A step lies within its job.
        assert!(step.start_time_unix_nano >= job_span.start_time_unix_nano);
        assert!(step.end_time_unix_nano <= job_span.end_time_unix_nano);
    }

    let claimed = &claim.attributes;
    assert_eq!(string(claimed, "worker_id").as_deref(), Some("w1"));
    assert_eq!(string(claimed, "job_id"), Some(job.clone()));
    assert_eq!(int(claimed, "epoch"), Some(1));
    assert_eq!(string(&job_span.attributes, "job_id"), Some(job));
    assert_eq!(
        string(&job_span.attributes, "worker_id").as_deref(),
        Some("w1")
    );
    assert_eq!(status(job_span), StatusCode::Error as i32);
    assert_eq!(
        string(&job_span.attributes, "error.type").as_deref(),
        Some("no_handler")
    );
    check_steps(steps[0], steps[1]);
}

/// The step that succeeded has no error; the one with no handler is
/// marked ERROR, with `error.type` and its error as the description.
fn check_steps(ok: &Span, failed: &Span) {
    assert_eq!(int(&ok.attributes, "step_index"), Some(0));
    assert_eq!(
        string(&ok.attributes, "step_type").as_deref(),
        Some("capability_enable")
    );
    assert_ne!(status(ok), StatusCode::Error as i32);
    assert_eq!(string(&ok.attributes, "error.type"), None);
    assert_eq!(int(&failed.attributes, "step_index"), Some(1));
    assert_eq!(
        string(&failed.attributes, "step_type").as_deref(),
        Some("no_such_type")
    );
    assert_eq!(status(failed), StatusCode::Error as i32);
    assert_eq!(
        string(&failed.attributes, "error.type").as_deref(),
        Some("no_handler")
    );
    let message = failed.status.as_ref().map(|s| s.message.clone());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("No handler registered for step type: no_such_type")),
        "{message:?}"
    );
}

/// An endpoint the exporter cannot use is bad input: exit 2, one line,
/// nothing run.
#[test]
fn an_https_or_malformed_endpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for endpoint in ["https://collector:4318", "collector:4318"] {
        let out = cli(
            dir.path(),
            &["jobs", "--db", "x.db", "--otlp-endpoint", endpoint],
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("--otlp-endpoint"), "{stderr}");
        assert!(stderr.contains("http://"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!dir.path().join("x.db").exists());
    }
}

/// A collector's base URL gets the traces' path once; anything but a
/// plain http:// URL with a host is refused.
#[test]
fn a_base_url_gets_the_traces_path_once() {
    use job_executor::otel::{OtelError, traces_url};
    for (given, url) in [
        ("http://c:4318", "http://c:4318/v1/traces"),
        ("http://c:4318/", "http://c:4318/v1/traces"),
        ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
        ("http://c/otlp", "http://c/otlp/v1/traces"),
    ] {
        assert_eq!(traces_url(given).unwrap(), url);
    }
    for refused in ["https://c:4318", "c:4318", "http://", "http:///v1/traces"] {
        assert!(matches!(
            traces_url(refused),
            Err(OtelError::Endpoint { .. })
        ));
    }
}
