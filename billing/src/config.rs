//! Stripe settings, as the app reads them from `PLINTH_STRIPE_*`.

use plinth_tenants::crypto::Secret;

/// Default Stripe API base.
pub const STRIPE_API: &str = "https://api.stripe.com";

#[derive(Debug, Clone, Default)]
pub struct StripeConfig {
    /// `PLINTH_STRIPE_SECRET_KEY`; unset means billing is not configured.
    pub secret_key: Option<Secret>,
    /// `PLINTH_STRIPE_WEBHOOK_SECRET`: one or more endpoint secrets,
    /// comma-separated (during a rotation both are accepted).
    pub webhook_secrets: Vec<Secret>,
    /// `PLINTH_STRIPE_API_BASE` (default Stripe's own).
    pub api_base: String,
    /// `PLINTH_BILLING_GRACE_DAYS` (default 7): how long a past-due
    /// subscription keeps its plan.
    pub grace: std::time::Duration,
    /// `PLINTH_BILLING_OFFLINE` (default false): process events from their
    /// own payloads, in timestamp order, without re-reading subscriptions
    /// from Stripe (always so without a secret key).
    pub offline: bool,
    /// `PLINTH_BILLING_SYNC_MINUTES` (default 60; 0 turns it off): how often
    /// the worker re-reads every subscription from Stripe.
    pub sync_every: std::time::Duration,
}

impl StripeConfig {
    /// Parses the comma-separated webhook secrets.
    pub fn secrets(raw: Option<&str>) -> Vec<Secret> {
        raw.map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Secret::new).collect())
            .unwrap_or_default()
    }
}
