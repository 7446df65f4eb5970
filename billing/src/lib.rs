//! Billing: the plan catalog, Stripe customers, checkout and portal, the
//! webhook inbox and subscription state, and turning a subscription into the
//! tenant's plan in the access policy.
//!
//! - [`webhook`]: the verified webhook inbox.
//! - [`process`]: stored events → subscription state → the tenant's plan;
//!   replay and sync.
//! - [`api`]: Stripe's API behind a circuit breaker; checkout, portal and
//!   the subscription view.
//! - [`schema`]: diesel's declarations of billing's tables.
//! - [`config`], [`mail`] (the billing notices), [`error`] (billing's own
//!   error, converted to `ApiError` only by routes).
//!
//! `docs/billing.md` has the operator's set-up and the state machine.

pub mod api;
pub mod client;
pub mod config;
pub mod error;
pub mod mail;
pub mod process;
pub mod schema;
pub mod webhook;
