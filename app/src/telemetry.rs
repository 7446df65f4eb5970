//! Logging. Messages read on their own; fields use dotted names
//! (`tenant.slug`, `request.id`); emails, tokens and secrets are never logged.

use tracing_subscriber::EnvFilter;

/// The filter without `RUST_LOG`: `info`, but nothing from actix-http's
/// connection dispatcher, which reports a client's malformed request (an
/// unparseable head, more bytes than `Content-Length` declared, a client gone
/// mid-write) at ERROR: those are the client's mistakes, not the server's,
/// and any client could otherwise fill the error log.
/// `RUST_LOG=info,actix_http=debug` shows them again.
pub const DEFAULT_FILTER: &str = "info,actix_http::h1::dispatcher=off";

/// Installs the global subscriber: text by default, JSON lines with
/// `PLINTH_LOG_FORMAT=json`. `RUST_LOG` filters (default [`DEFAULT_FILTER`]).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.compact().try_init()
    };
}
