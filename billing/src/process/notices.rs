//! The mail billing queues for a tenant's owners while it processes
//! events: payment failures and confirmations asked for, cancellations.

use chrono::{DateTime, Utc};
use diesel::{OptionalExtension as _, QueryDsl as _, SelectableHelper as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::catalog::FREE;
use plinth_identity::members;
use plinth_mail::{self as mail, EmailAddress, Mail};
use plinth_tenants::{TenantId, registry};

use super::{Outcome, Park, Processor, SubscriptionRow};
use crate::object::Invoice;
use crate::schema::subscriptions;

impl Processor {
    /// `invoice.payment_failed` and `invoice.payment_action_required`: the
    /// owners are told what happened and by when to act, unless the invoice
    /// was paid (or closed) since. Once per invoice: Stripe's retries of
    /// one invoice do not mail again.
    pub(super) async fn dunning(
        &self,
        c: &mut AsyncPgConnection,
        kind: &str,
        created: DateTime<Utc>,
        tenant: TenantId,
        invoice: &Invoice,
        current: Option<&Invoice>,
    ) -> Result<Outcome, Park> {
        let sub: Option<SubscriptionRow> = match &invoice.subscription {
            Some(id) => subscriptions::table.find(id).select(SubscriptionRow::as_select()).first(c).await.optional()?,
            None => None,
        };
        // The current state, not the event's: a replayed or late failure
        // must not ask for a payment that was made.
        let settled = match current {
            Some(current) => current.settled(),
            None => {
                invoice.settled()
                    || sub.as_ref().is_some_and(|s| {
                        matches!(s.status.as_str(), "active" | "trialing") && s.last_event_at > created
                    })
            }
        };
        if settled {
            return Ok(Outcome::Ignored);
        }
        let first = invoice.billing_reason.as_deref() == Some("subscription_create")
            || sub.as_ref().is_some_and(|s| s.status == "incomplete");
        let url = invoice.hosted_url.clone().unwrap_or_default();
        // The downgrade runs at past_due_since + grace: the same date in
        // every mail of one episode.
        let since = sub.as_ref().and_then(|s| s.past_due_since).unwrap_or(created);
        let grace_until = (since + self.grace()).format("%Y-%m-%d").to_string();
        // Once per invoice and kind, however often Stripe retries it.
        let once = format!("invoice:{}:{kind}", invoice.id);
        notify_owners(c, tenant, &once, |to, t, org, key| match (kind, first) {
            ("invoice.payment_action_required", _) => {
                crate::mail::payment_action_required(to, t, org, &url, (!first).then_some(grace_until.as_str()), key)
            }
            (_, true) => crate::mail::first_payment_failed(to, t, org, &url, key),
            (_, false) => crate::mail::payment_failed(to, t, org, &grace_until, &url, key),
        })
        .await?;
        Ok(Outcome::Applied)
    }
}

/// Tells the owners their `plan` subscription was cancelled, when ending
/// it `changed` the tenant's plan to free (not when another subscription
/// still pays for a plan).
pub(super) async fn cancelled_mail(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    event_id: &str,
    changed: Option<(String, String)>,
    plan: Option<String>,
) -> Result<(), Park> {
    if changed.is_none_or(|(_, to)| to != FREE) {
        return Ok(());
    }
    let plan = plan.unwrap_or_else(|| "paid".into());
    notify_owners(c, tenant, event_id, |to, t, org, key| crate::mail::subscription_cancelled(to, t, org, &plan, key))
        .await
}

/// Queues `make(to, tenant, organization, key)` to every owner of `tenant`,
/// once per `once` (an event id, or what else the mail is about) and owner.
pub(super) async fn notify_owners(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    once: &str,
    make: impl Fn(EmailAddress, TenantId, &str, String) -> Mail,
) -> Result<(), Park> {
    let t = registry::find_by_id(c, tenant).await?.ok_or_else(|| Park::refuse(format!("no tenant {tenant}")))?;
    for owner in members::owners(c, tenant).await? {
        let Ok(to) = EmailAddress::parse(&owner.email) else { continue };
        let key = format!("stripe:{once}:{}", owner.user_id);
        mail::queue(c, make(to, tenant, &t.name, key))
            .await
            .map_err(|e| Park::wait(format!("queueing mail: {:#}", anyhow::Error::new(e))))?;
    }
    Ok(())
}
