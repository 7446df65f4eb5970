//! The HTTP edge shared by every crate that serves routes. Only this layer
//! knows status codes: the crates below it return their own errors, and
//! [`ApiError`] turns them into the JSON envelope.
//!
//! - [`error`]: [`ApiError`], [`FieldError`] and the envelope
//!   `{"error": {"code", "message", "details"?}}`.
//! - [`request`]: request ids and the request span, the JSON body extractor
//!   with size and time limits, field validation, cursor pagination, the
//!   client address.
//! - [`ratelimit`]: in-process fixed-window limits keyed by hashed client
//!   keys, bounded in memory.

pub mod error;
pub mod ratelimit;
pub mod request;

pub use error::{ApiError, FieldError};
pub use request::{Json, Page, PageParams, RequestId};
