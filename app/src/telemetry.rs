//! Logging and traces. Messages read on their own; fields use dotted names
//! (`tenant.slug`, `request.id`); emails, tokens and secrets are never logged.
//!
//! With `PLINTH_OTLP_ENDPOINT` set, the same spans are also exported as
//! OpenTelemetry traces over OTLP/HTTP (protobuf): each request, the tenant
//! transactions and Stripe calls it makes, the jobs it queues and the mail
//! they deliver, in one trace that a caller's `traceparent` can start.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The filter without `RUST_LOG`: `info`, but nothing from actix-http's
/// connection dispatcher, which reports a client's malformed request (an
/// unparseable head, more bytes than `Content-Length` declared, a client gone
/// mid-write) at ERROR: those are the client's mistakes, not the server's,
/// and any client could otherwise fill the error log.
/// `RUST_LOG=info,actix_http=debug` shows them again.
pub const DEFAULT_FILTER: &str = "info,actix_http::h1::dispatcher=off";

/// What must be flushed before the process ends.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered (waits for the exporter, a few seconds
    /// at most).
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(err) = traces.shutdown()
        {
            tracing::warn!(error = %err, "flushing the last traces failed");
        }
    }
}

/// Installs the global subscriber: logs as text by default, JSON lines with
/// `PLINTH_LOG_FORMAT=json`, filtered by `RUST_LOG` (default
/// [`DEFAULT_FILTER`]); and, given an OTLP endpoint (`http://collector:4318`),
/// the trace exporter.
///
/// Traces take every INFO span and event, and Plinth's own DEBUG spans (its
/// tenant transactions), whatever `RUST_LOG` says: those are too many for
/// logs but are what a trace is read for.
pub fn init(json: bool, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json().with_current_span(true).with_span_list(false).with_filter(filter).boxed()
    } else {
        logs.compact().with_filter(filter).boxed()
    };
    let provider = otlp_endpoint.map(exporter).transpose()?;
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("plinth")).with_filter(filter_fn(|meta| {
            *meta.level() <= tracing::Level::INFO
                || (meta.is_span() && *meta.level() <= tracing::Level::DEBUG && meta.target().starts_with("plinth"))
        }))
    });
    // A second init (tests) keeps the first subscriber.
    if tracing_subscriber::registry().with(logs).with(traces).try_init().is_ok() && provider.is_some() {
        plinth_tenants::trace::set_exporting();
    }
    Ok(Telemetry { traces: provider })
}

/// The OTLP/HTTP exporter to `{endpoint}/v1/traces`, batching on its own
/// thread. The SDK's `OTEL_*` variables apply (`OTEL_EXPORTER_OTLP_HEADERS`
/// for a collector's credentials, `OTEL_SERVICE_NAME`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_BSP_SCHEDULE_DELAY`).
fn exporter(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    // reqwest's rustls takes the process's crypto provider: ring, which the
    // Stripe client and mail use too. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .context("PLINTH_OTLP_ENDPOINT: building the trace exporter")?;
    let mut resource =
        Resource::builder().with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("plinth");
    }
    let resource = resource.build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}
