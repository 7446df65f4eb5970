//! Stripe in tests: objects from Stripe's own fixtures (copied into
//! `tests/fixtures/stripe/`), events built from them, signed the way Stripe
//! signs webhooks.

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

const FIXTURES: &str = include_str!("fixtures/stripe/fixtures.json");

/// One of Stripe's example objects (`subscription`, `customer`, ...).
pub fn object(name: &str) -> Value {
    let all: Value = serde_json::from_str(FIXTURES).unwrap_or(Value::Null);
    all["resources"][name].clone()
}

/// A webhook event of `kind` about `data_object`, built on Stripe's example
/// event.
pub fn event(id: &str, kind: &str, created: i64, data_object: Value) -> Value {
    let mut event = object("event");
    event["id"] = json!(id);
    event["type"] = json!(kind);
    event["created"] = json!(created);
    event["data"] = json!({ "object": data_object });
    event
}

/// `Stripe-Signature: t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, as
/// Stripe computes it, written here independently of the crate Plinth uses.
pub fn signature(body: &str, secret: &str, t: i64) -> String {
    format!("t={t},v1={}", v1(body, secret, t))
}

pub fn v1(body: &str, secret: &str, t: i64) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(format!("{t}.{body}").as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Stripe's example subscription, as `id` of `customer` on `price`.
pub fn subscription(id: &str, customer: &str, status: &str, price: &str) -> Value {
    let mut sub = object("subscription");
    sub["id"] = json!(id);
    sub["customer"] = json!(customer);
    sub["status"] = json!(status);
    sub["cancel_at_period_end"] = json!(false);
    sub["items"]["data"][0]["price"]["id"] = json!(price);
    sub
}

/// Stripe's example checkout session, completed by `tenant` as `customer`.
pub fn checkout_session(tenant: &str, customer: &str, subscription: &str) -> Value {
    let mut session = object("checkout.session");
    session["mode"] = json!("subscription");
    session["client_reference_id"] = json!(tenant);
    session["customer"] = json!(customer);
    session["subscription"] = json!(subscription);
    session
}

/// Stripe's example invoice, of `customer`.
pub fn invoice(id: &str, customer: &str) -> Value {
    let mut invoice = object("invoice");
    invoice["id"] = json!(id);
    invoice["customer"] = json!(customer);
    invoice
}
