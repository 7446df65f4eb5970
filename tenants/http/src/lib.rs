//! The HTTP edge shared by every crate that serves routes. Only this layer
//! knows status codes: the crates below it return their own errors, and
//! [`ApiError`] turns them into the JSON envelope.
//!
//! - [`cors`]: cross-origin access for the listed origins.
//! - [`error`]: [`ApiError`], [`FieldError`] and the envelope
//!   `{"error": {"code", "message", "details"?}}`.
//! - [`request`]: request ids, the request span and the security headers
//!   of every answer, the JSON body extractor
//!   with size and time limits, field validation, cursor pagination, the
//!   client address.
//! - [`idempotency`]: `Idempotency-Key` on the routes that create something.
//! - [`openapi`]: what every operation of the OpenAPI document shares (the
//!   error answers, the bearer schemes, the tenant header, pagination).
//! - [`ratelimit`]: in-process fixed-window limits keyed by hashed client
//!   keys, bounded in memory.

pub mod cors;
pub mod error;
pub mod idempotency;
pub mod openapi;
pub mod ratelimit;
pub mod request;

pub use error::{ApiError, FieldError};
pub use request::{Json, Page, PageParams, RequestId};
