//! Billing: the plan catalog, Stripe customers, checkout and portal, the
//! webhook inbox and subscription state, and turning a subscription into the
//! tenant's plan in the access policy.
//!
//! - [`webhook`]: the verified webhook inbox.
//! - [`process`]: stored events → subscription state → the tenant's plan;
//!   replay and sync.
//! - [`stripe`]: Stripe's API behind a circuit breaker, its error classes,
//!   and each call Plinth makes; [`client`] sends them.
//! - [`api`]: the routes: checkout, portal and the subscription view.
//! - [`change`]: plan changes from inside the product: preview, change,
//!   cancel and resume.
//! - [`object`]: Stripe's objects read by field, in any API version.
//! - [`customers`]: tenants' Stripe customers.
//! - [`invoices`]: the local mirror of the tenants' invoices and its route.
//! - [`usage`]: metered usage: recorded with the work, sent to Stripe's
//!   meter events API in batches, and `GET /v1/usage`.
//! - [`summary`]: the organization's billing state, for `GET /v1/tenant`
//!   and the subscription view.
//! - [`schema`]: diesel's declarations of billing's tables.
//! - [`config`], [`mail`] (the billing notices), [`error`] (billing's own
//!   error, converted to `ApiError` only by routes).
//!
//! `docs/billing.md` has the operator's set-up and the state machine.

pub mod api;
pub mod change;
pub mod client;
pub mod config;
pub mod console;
pub mod customers;
pub mod error;
pub mod invoices;
pub mod mail;
pub mod object;
pub mod process;
pub mod schema;
pub mod stripe;
pub mod summary;
pub mod usage;
pub mod webhook;
