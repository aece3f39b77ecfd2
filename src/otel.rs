//! Traces over OTLP (feature `otel`): the spans the engine opens, exported
//! to an OpenTelemetry collector.
//!
//! A job's run is a span named `job` (`job_id`, and `worker_id` when a
//! worker claimed it), each step a child span named `step` (`step_index`,
//! `step_type`); a worker's claim is the root span of its trace, `claim`
//! (`worker_id`, `job_id`, `epoch`). A failed step or job has span status
//! ERROR and `error.type`, the failure kind (`handler_failed`, `timeout`,
//! `interrupted`…); a failed step's status description is its error.
//! The resource names the service (`service.name`: `job-executor` unless
//! `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` name it) and its
//! version (`service.version`).
//!
//! Spans go out in batches over OTLP/HTTP with protobuf bodies, from a
//! thread of the SDK's own through a blocking HTTP client: nothing here is
//! async, and a slow collector never holds a job up (a full queue drops
//! spans). Only plain `http://` endpoints are supported (no TLS client is
//! built in): point it at a collector or agent beside the process.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;

use crate::executor::EXECUTOR_VERSION;

/// `service.name` when the environment names none.
pub const SERVICE_NAME: &str = "job-executor";

/// The path OTLP/HTTP receives traces at, under a collector's base URL.
pub const TRACES_PATH: &str = "/v1/traces";

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtelError {
    /// The endpoint is not a plain `http://` URL.
    #[error(
        "OTLP endpoint {endpoint:?}: give the collector's http:// URL (e.g. http://127.0.0.1:4318); https is not supported"
    )]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
    },
    /// The exporter could not be built.
    #[error("cannot set up the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        /// Where traces were to go.
        endpoint: String,
        /// The SDK's reason.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Where spans are exported to; dropping it sends what is left and stops
/// the export thread.
#[derive(Debug)]
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Drop for Exporting {
    fn drop(&mut self) {
        // Sends the spans still queued; a collector that cannot take them
        // now is not waited for any longer than the SDK's timeout.
        let _ = self.provider.shutdown();
    }
}

/// The URL traces are posted to: `endpoint` (a collector's base URL, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` gives it) with [`TRACES_PATH`] added,
/// unless it ends with it already.
///
/// # Errors
/// [`OtelError::Endpoint`] for anything but an `http://` URL with a host.
pub fn traces_url(endpoint: &str) -> Result<String, OtelError> {
    let refused = || OtelError::Endpoint {
        endpoint: endpoint.to_owned(),
    };
    let rest = endpoint.strip_prefix("http://").ok_or_else(refused)?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(refused());
    }
    let base = endpoint.trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        Ok(base.to_owned())
    } else {
        Ok(format!("{base}{TRACES_PATH}"))
    }
}

/// A layer that exports the crate's spans (of level INFO and above) to
/// the OTLP/HTTP collector at `endpoint` (see [`traces_url`]), and the
/// guard that flushes them: keep it until the work is done.
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt as _;
/// use tracing_subscriber::util::SubscriberInitExt as _;
///
/// let (traces, exporting) = job_executor::otel::layer("http://127.0.0.1:4318").unwrap();
/// tracing_subscriber::registry().with(traces).init();
/// // … run jobs …
/// drop(exporting);
/// ```
///
/// # Errors
/// [`OtelError`]: a bad endpoint, or an exporter the SDK cannot build.
pub fn layer<S>(endpoint: &str) -> Result<(impl Layer<S> + Send + Sync, Exporting), OtelError>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let url = traces_url(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(|source| OtelError::Exporter {
            endpoint: url,
            source,
        })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer(SERVICE_NAME);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // The crate's own spans only: not the HTTP client's, nor the SDK's
        // diagnostics about its exports.
        .with_filter(Targets::new().with_target("job_executor", LevelFilter::INFO));
    Ok((layer, Exporting { provider }))
}

/// The resource every span is exported with: the service's name and
/// version, and what the environment adds (`OTEL_RESOURCE_ATTRIBUTES`).
fn resource() -> Resource {
    let service_name = Key::from_static_str("service.name");
    let detected = Resource::builder().build();
    let named = detected
        .get(&service_name)
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name(SERVICE_NAME);
    }
    builder
        .with_attribute(KeyValue::new("service.version", EXECUTOR_VERSION))
        .build()
}
