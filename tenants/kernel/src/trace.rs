//! The W3C trace context (`traceparent`, `tracestate`): a request or a job
//! that names a trace continues it, and what Plinth hands on (a call to
//! Stripe's API, a queued job) carries the current span's trace.
//!
//! Spans are OpenTelemetry spans only when the app installed an exporter
//! (`PLINTH_OTLP_ENDPOINT`). Without one a span has no trace context:
//! nothing is continued or handed on, and these functions cost next to
//! nothing.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use std::sync::atomic::{AtomicBool, Ordering};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Called by the app once it exports spans (`PLINTH_OTLP_ENDPOINT`).
pub fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether spans are exported: what only a trace shows (a span's display
/// name) is worth computing.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The header (and job column) naming a trace and its parent span.
pub const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Makes the trace that `get` names (`traceparent`, and `tracestate` if
/// any, as a request's headers hold them) the parent of `span`. Nothing
/// named, or a malformed `traceparent`: `span` starts a new trace.
pub fn continue_from<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    let Some(parent) = get(TRACEPARENT) else { return };
    let named = Named { parent, state: get(TRACESTATE) };
    let context = TraceContextPropagator::new().extract(&named);
    // Fails only when spans are not OpenTelemetry's (no exporter).
    let _ = span.set_parent(context);
}

/// The headers that carry the current span's trace on: `traceparent` and,
/// when the trace has one, `tracestate`. None without a trace.
pub fn outgoing() -> Vec<(&'static str, String)> {
    let context = tracing::Span::current().context();
    let mut headers = Outgoing(Vec::new());
    TraceContextPropagator::new().inject_context(&context, &mut headers);
    headers.0
}

/// Renames `span` in its trace (a request's span once its route is known).
/// Recording `otel.name` would not do: once a span has a trace context (a
/// caller's parent, a child's), tracing-opentelemetry ignores a new name.
pub fn rename(span: &tracing::Span, name: String) {
    use opentelemetry::trace::TraceContextExt as _;
    span.context().span().update_name(name);
}

/// The current span's `traceparent`, to continue the trace later (a job).
pub fn current_traceparent() -> Option<String> {
    outgoing().into_iter().find_map(|(name, value)| (name == TRACEPARENT).then_some(value))
}

struct Named<'a> {
    parent: &'a str,
    state: Option<&'a str>,
}

impl Extractor for Named<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.parent),
            TRACESTATE => self.state,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

struct Outgoing(Vec<(&'static str, String)>);

impl Injector for Outgoing {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE => TRACESTATE,
            // The W3C propagator writes no other header.
            _ => return,
        };
        self.0.push((name, value));
    }
}
