//! Logging. Messages read on their own; fields use dotted names
//! (`tenant.slug`, `request.id`); emails, tokens and secrets are never logged.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: text by default, JSON lines with
/// `PLINTH_LOG_FORMAT=json`. `RUST_LOG` filters (default `info`).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.compact().try_init()
    };
}
