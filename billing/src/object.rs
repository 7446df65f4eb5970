//! Stripe's objects, read field by field from their JSON, whatever API
//! version they were rendered in.
//!
//! async-stripe's types parse the shapes of the one version they are
//! generated for (`Stripe-Version: 2026-09-30.endive`); an event rendered
//! in an endpoint's older default version (periods on the subscription
//! rather than its items, no `billing_mode`, the invoice's subscription at
//! the top level) does not parse with them. Plinth needs a dozen fields of
//! three objects, so it reads those fields itself and accepts both places
//! where a field has lived.

use serde_json::Value;

/// An id field: a string, or an expanded object with an `id`.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// The object's `object` must be `expected` (when present at all).
fn check(v: &Value, expected: &str) -> Result<(), String> {
    match v.get("object").and_then(Value::as_str) {
        Some(o) if o != expected => Err(format!("the event's object is a {o}, not a {expected}")),
        _ if !v.is_object() => Err(format!("the event's object is not a {expected}")),
        _ => Ok(()),
    }
}

/// One item of a subscription: its price, quantity and (since 2025) its
/// period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// `si_...` (absent in some hand-made payloads).
    pub id: Option<String>,
    pub price: String,
    pub quantity: Option<u64>,
    pub period_end: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    /// Stripe's status (`active`, `past_due`, ...).
    pub status: String,
    pub items: Vec<Item>,
    /// The subscription's own period end (API versions before the periods
    /// moved to the items).
    pub period_end: Option<i64>,
    pub trial_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<i64>,
    pub pause_collection: Option<Value>,
    /// `metadata.tenant_id`, which Plinth sets at checkout.
    pub tenant: Option<String>,
    /// The subscription schedule that manages it, if any.
    pub schedule: Option<String>,
}

impl Subscription {
    pub fn read(v: &Value) -> Result<Self, String> {
        check(v, "subscription")?;
        let id = text(&v["id"]).ok_or("the subscription has no id")?;
        let customer = id_of(&v["customer"]).ok_or("the subscription has no customer")?;
        let status = text(&v["status"]).ok_or("the subscription has no status")?;
        let items = v["items"]["data"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| {
                        let price = id_of(&item["price"]).or_else(|| id_of(&item["plan"]))?;
                        Some(Item {
                            id: text(&item["id"]),
                            price,
                            quantity: item["quantity"].as_u64(),
                            period_end: item["current_period_end"].as_i64(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            id,
            customer,
            status,
            items,
            period_end: v["current_period_end"].as_i64(),
            trial_end: v["trial_end"].as_i64(),
            cancel_at_period_end: v["cancel_at_period_end"].as_bool().unwrap_or(false),
            cancel_at: v["cancel_at"].as_i64(),
            pause_collection: Some(v["pause_collection"].clone()).filter(|p| p.is_object()),
            tenant: text(&v["metadata"]["tenant_id"]),
            schedule: id_of(&v["schedule"]),
        })
    }

    /// The period end of `price`'s item, else the subscription's own.
    pub fn period_end_of(&self, price: Option<&str>) -> Option<i64> {
        let item = self.items.iter().find(|i| Some(i.price.as_str()) == price).or(self.items.first());
        item.and_then(|i| i.period_end).or(self.period_end)
    }

    /// The event kind that would report this state: a read subscription is
    /// applied as its update (or its deletion, once cancelled).
    pub fn as_event(&self) -> &'static str {
        if self.status == "canceled" { "customer.subscription.deleted" } else { "customer.subscription.updated" }
    }

    /// Stripe's statuses in the order a subscription lives through them:
    /// a later stage is newer whatever order its events arrived in.
    pub fn stage(status: &str) -> u8 {
        match status {
            "incomplete" => 0,
            "trialing" => 1,
            "canceled" | "incomplete_expired" => 3,
            _ => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutSession {
    pub customer: Option<String>,
    /// `client_reference_id`: the tenant, as Plinth sets it.
    pub tenant: Option<String>,
}

impl CheckoutSession {
    pub fn read(v: &Value) -> Result<Self, String> {
        check(v, "checkout.session")?;
        Ok(Self { customer: id_of(&v["customer"]), tenant: text(&v["client_reference_id"]) })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub customer: Option<String>,
    /// Its subscription: `parent.subscription_details.subscription` since
    /// 2025, `subscription` before.
    pub subscription: Option<String>,
    /// Stripe's page where the customer pays (and authenticates) it.
    pub hosted_url: Option<String>,
    /// `subscription_create` for a subscription's first invoice.
    pub billing_reason: Option<String>,
    /// `draft`, `open`, `paid`, `uncollectible`, `void`.
    pub status: Option<String>,
    pub number: Option<String>,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub currency: String,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub pdf_url: Option<String>,
    pub created: Option<i64>,
}

impl Invoice {
    pub fn read(v: &Value) -> Result<Self, String> {
        check(v, "invoice")?;
        Ok(Self {
            id: text(&v["id"]).ok_or("the invoice has no id")?,
            customer: id_of(&v["customer"]),
            subscription: id_of(&v["parent"]["subscription_details"]["subscription"])
                .or_else(|| id_of(&v["subscription"])),
            hosted_url: text(&v["hosted_invoice_url"]),
            billing_reason: text(&v["billing_reason"]),
            status: text(&v["status"]),
            number: text(&v["number"]),
            amount_due: v["amount_due"].as_i64().unwrap_or(0),
            amount_paid: v["amount_paid"].as_i64().unwrap_or(0),
            amount_remaining: v["amount_remaining"].as_i64().unwrap_or(0),
            currency: text(&v["currency"]).unwrap_or_default(),
            period_start: v["period_start"].as_i64(),
            period_end: v["period_end"].as_i64(),
            pdf_url: text(&v["invoice_pdf"]),
            created: v["created"].as_i64(),
        })
    }

    /// Paid or closed: nothing left to ask the customer for.
    pub fn settled(&self) -> bool {
        matches!(self.status.as_deref(), Some("paid" | "void" | "uncollectible"))
    }
}

/// The lookup keys of a list of active entitlements (an entitlement
/// summary's `entitlements`, or the list Stripe answers), sorted.
pub fn lookup_keys(list: &Value) -> Vec<String> {
    let mut keys: Vec<String> = list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| text(&e["lookup_key"]).or_else(|| text(&e["feature"]["lookup_key"])))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The customer an event concerns, read at intake: the object's `customer`,
/// or the object itself for `customer.*` events about the customer.
pub fn customer_of(kind: Option<&str>, object: &Value) -> Option<String> {
    if object.get("object").and_then(Value::as_str) == Some("customer")
        || kind.is_some_and(|k| k.starts_with("customer.") && !k.starts_with("customer.subscription."))
    {
        return id_of(&object["id"]);
    }
    id_of(&object["customer"])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_subscription_reads_in_the_old_and_the_new_shape() {
        let new = json!({ "object": "subscription", "id": "sub_1", "customer": { "id": "cus_1" }, "status": "active",
            "items": { "data": [ { "price": { "id": "price_a" }, "current_period_end": 20 } ] } });
        let old = json!({ "object": "subscription", "id": "sub_1", "customer": "cus_1", "status": "active",
            "current_period_end": 10, "items": { "data": [ { "plan": { "id": "price_a" } } ] } });
        let (new, old) = (Subscription::read(&new), Subscription::read(&old));
        assert_eq!(new.as_ref().map(|s| s.period_end_of(Some("price_a"))), Ok(Some(20)));
        assert_eq!(old.as_ref().map(|s| s.period_end_of(Some("price_a"))), Ok(Some(10)));
        assert_eq!(old.map(|s| (s.customer, s.items[0].price.clone())), Ok(("cus_1".into(), "price_a".into())));
        assert!(Subscription::read(&json!({ "object": "invoice", "id": "in_1" })).is_err());
    }

    #[test]
    fn an_invoice_names_its_subscription_in_either_place() {
        let new = json!({ "object": "invoice", "id": "in_1",
            "parent": { "subscription_details": { "subscription": "sub_new" } } });
        let old = json!({ "object": "invoice", "id": "in_1", "subscription": "sub_old" });
        assert_eq!(Invoice::read(&new).map(|i| i.subscription), Ok(Some("sub_new".into())));
        assert_eq!(Invoice::read(&old).map(|i| i.subscription), Ok(Some("sub_old".into())));
    }
}
