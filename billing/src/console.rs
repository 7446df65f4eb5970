//! Billing's side of the operator console (admin's [`ConsoleBilling`]): a
//! tenant's subscriptions and invoices, the Stripe inbox by state, and a
//! replay of one stored event.

use std::sync::Arc;

use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl;
use futures_util::future::BoxFuture;
use plinth_admin::console::{BillingPanel, ConsoleBilling, Inbox, InboxEvent, InvoiceLine, SubscriptionLine};
use plinth_http::ApiError;
use plinth_tenants::{Db, TenantId};

use crate::process::{Outcome, Processor};
use crate::schema::{invoices, stripe_events, subscriptions};

/// Registered by the app as `web::Data<dyn ConsoleBilling>`.
pub struct Console {
    pub processor: Arc<Processor>,
}

impl ConsoleBilling for Console {
    fn tenant<'a>(&'a self, db: &'a Db, tenant: TenantId) -> BoxFuture<'a, Result<BillingPanel, ApiError>> {
        Box::pin(async move {
            db.platform(async |c| {
                type Sub = (
                    String,
                    String,
                    Option<String>,
                    Option<chrono::DateTime<chrono::Utc>>,
                    Option<chrono::DateTime<chrono::Utc>>,
                    bool,
                    Option<chrono::DateTime<chrono::Utc>>,
                );
                let subs: Vec<Sub> = subscriptions::table
                    .filter(subscriptions::tenant_id.eq(tenant.0))
                    .filter(subscriptions::deleted.eq(false))
                    .order(subscriptions::last_event_at.desc())
                    .limit(20)
                    .select((
                        subscriptions::id,
                        subscriptions::status,
                        subscriptions::plan,
                        subscriptions::current_period_end,
                        subscriptions::trial_end,
                        subscriptions::cancel_at_period_end,
                        subscriptions::cancel_at,
                    ))
                    .load(c)
                    .await?;
                type Inv = (
                    String,
                    Option<String>,
                    Option<String>,
                    i64,
                    String,
                    chrono::DateTime<chrono::Utc>,
                    Option<String>,
                );
                let invs: Vec<Inv> = invoices::table
                    .filter(invoices::tenant_id.eq(tenant.0))
                    .order((invoices::created_at.desc(), invoices::local_id.desc()))
                    .limit(20)
                    .select((
                        invoices::id,
                        invoices::number,
                        invoices::status,
                        invoices::amount_due,
                        invoices::currency,
                        invoices::created_at,
                        invoices::hosted_url,
                    ))
                    .load(c)
                    .await?;
                Ok::<_, ApiError>(BillingPanel {
                    subscriptions: subs
                        .into_iter()
                        .map(|(id, status, plan, period_end, trial_end, at_period_end, cancel_at)| SubscriptionLine {
                            id,
                            status,
                            plan,
                            current_period_end: period_end,
                            trial_end,
                            cancels_at: cancel_at.or(at_period_end.then_some(period_end).flatten()),
                        })
                        .collect(),
                    invoices: invs
                        .into_iter()
                        .map(|(id, number, status, amount, currency, created_at, hosted_url)| InvoiceLine {
                            id,
                            number,
                            status,
                            amount: money(amount, &currency),
                            created_at,
                            hosted_url,
                        })
                        .collect(),
                })
            })
            .await
        })
    }

    fn inbox<'a>(&'a self, db: &'a Db, status: Option<&'a str>, limit: i64) -> BoxFuture<'a, Result<Inbox, ApiError>> {
        Box::pin(async move {
            db.platform(async |c| {
                let counts: Vec<(String, i64)> = stripe_events::table
                    .group_by(stripe_events::status)
                    .select((stripe_events::status, diesel::dsl::count_star()))
                    .order(stripe_events::status.asc())
                    .load(c)
                    .await?;
                let mut query = stripe_events::table
                    .order(stripe_events::received_at.desc())
                    .limit(limit)
                    .select((
                        stripe_events::id,
                        stripe_events::kind,
                        stripe_events::status,
                        stripe_events::received_at,
                        stripe_events::parked_reason,
                    ))
                    .into_boxed();
                if let Some(status) = status {
                    query = query.filter(stripe_events::status.eq(status));
                }
                type Event = (String, Option<String>, String, chrono::DateTime<chrono::Utc>, Option<String>);
                let rows: Vec<Event> = query.load(c).await?;
                let events = rows
                    .into_iter()
                    .map(|(id, kind, status, received_at, reason)| InboxEvent { id, kind, status, received_at, reason })
                    .collect();
                Ok::<_, ApiError>(Inbox { counts, events })
            })
            .await
        })
    }

    fn replay<'a>(&'a self, event: &'a str) -> BoxFuture<'a, Result<String, ApiError>> {
        Box::pin(async move {
            let outcome = self.processor.replay(event).await?;
            tracing::info!(stripe.event = event, outcome = ?outcome, "Stripe event replayed from the console");
            Ok(match outcome {
                Outcome::Applied => "applied".to_owned(),
                Outcome::Stale => "stale: older than what was applied".to_owned(),
                Outcome::Ignored => "ignored: nothing to act on".to_owned(),
                Outcome::AlreadyProcessed => "processed before".to_owned(),
                Outcome::Parked(why) => format!("parked again: {why}"),
                Outcome::Refused(why) => format!("refused: {why}"),
            })
        })
    }
}

/// An amount in the currency's smallest unit, as `12.00 USD` (two decimals:
/// the console's reading aid, not an invoice).
fn money(minor: i64, currency: &str) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let minor = minor.unsigned_abs();
    format!("{sign}{}.{:02} {}", minor / 100, minor % 100, currency.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    #[test]
    fn amounts_read_as_money() {
        assert_eq!(super::money(1200, "usd"), "12.00 USD");
        assert_eq!(super::money(5, "eur"), "0.05 EUR");
        assert_eq!(super::money(-250, "usd"), "-2.50 USD");
    }
}
