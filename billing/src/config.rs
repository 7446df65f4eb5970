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
    /// `PLINTH_BILLING_GRACE_DAYS` (default 14, the length of Stripe's
    /// default retry schedule): how long a past-due subscription keeps its
    /// plan unrestricted.
    pub grace: std::time::Duration,
    /// `PLINTH_BILLING_OFFLINE` (default false): process events from their
    /// own payloads, in timestamp order, without re-reading subscriptions
    /// from Stripe (always so without a secret key).
    pub offline: bool,
    /// `PLINTH_BILLING_SYNC_MINUTES` (default 60; 0 turns it off): how often
    /// the worker re-reads every subscription from Stripe.
    pub sync_every: std::time::Duration,
    /// `PLINTH_BILLING_SEATS_DEBOUNCE_SECS` (default 10): how long after a
    /// membership change a per-seat quantity is updated (later changes
    /// within it make one update).
    pub seats_debounce: std::time::Duration,
    /// `PLINTH_BILLING_METER_SECS` (default 60): how often metered usage is
    /// sent to Stripe.
    pub meter_every: std::time::Duration,
    /// `PLINTH_BILLING_FEATURES=stripe` (default `catalog`): a tenant's
    /// features come from its Stripe entitlements (each active
    /// entitlement's lookup key names a Plinth feature) instead of its
    /// plan.
    pub features_from_stripe: bool,
    /// `PLINTH_STRIPE_BREAKER_SECS` (default 30): how long the circuit
    /// breaker keeps calls from Stripe after 5 failures in a row.
    pub breaker_open: std::time::Duration,
    /// Whether events must be live-mode (`true`) or test-mode (`false`):
    /// `PLINTH_STRIPE_MODE` (`live` or `test`), else the secret key's own
    /// mode (`sk_live_`/`rk_live_` or `sk_test_`/`rk_test_`). Unknown
    /// (neither set) compares nothing.
    pub livemode: Option<bool>,
}

/// The mode a Stripe secret key works in, from its prefix.
pub fn key_livemode(key: &str) -> Option<bool> {
    match key.get(..8) {
        Some("sk_live_" | "rk_live_") => Some(true),
        Some("sk_test_" | "rk_test_") => Some(false),
        _ => None,
    }
}

impl StripeConfig {
    /// Parses the comma-separated webhook secrets.
    pub fn secrets(raw: Option<&str>) -> Vec<Secret> {
        raw.map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Secret::new).collect())
            .unwrap_or_default()
    }
}
