//! Billing: the plan catalog, Stripe customers, checkout and portal, the
//! webhook inbox and subscription state, and turning a subscription into the
//! tenant's plan in the access policy.
//!
//! Implemented so far: [`mail`], the billing notices. The tenant registry already records each
//! tenant's `plan` (every tenant starts on `free`), which this crate will
//! keep in step with Stripe.

pub mod mail;
