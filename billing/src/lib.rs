//! Billing: the plan catalog, Stripe customers, checkout and portal, the
//! webhook inbox and subscription state, and turning a subscription into the
//! tenant's plan in the access policy.
//!
//! Implemented so far: [`webhook`], the verified webhook inbox (events are
//! stored, not yet processed), [`config`], and [`mail`], the billing
//! notices. The tenant registry records each tenant's `plan` (every tenant
//! starts on `free`), which this crate will keep in step with Stripe.

pub mod api;
pub mod config;
pub mod mail;
pub mod process;
pub mod webhook;
