//! `plinth billing sync` (and the periodic job): every customer of every
//! tenant read again from Stripe, all its subscriptions recorded, and the
//! tenant's plan settled from them.

use std::collections::BTreeMap;

use chrono::Utc;
use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl;
use plinth_tenants::registry::PlanStatus;
use plinth_tenants::{TenantId, registry};
use serde_json::json;

use super::{Mode, Processor, lock_customer};
use crate::error::BillingError;
use crate::schema::billing_customers;

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    pub customers: usize,
    pub changed: Vec<(TenantId, String)>,
    pub failed: Vec<(TenantId, String)>,
}

impl Processor {
    /// Re-reads the subscriptions of every customer each tenant has had,
    /// records them, and settles each tenant's plan: a plan billing set
    /// follows them (free when none is live); an operator's plan stays.
    pub async fn sync(&self) -> Result<Synced, BillingError> {
        let api = self.api.as_ref().ok_or(BillingError::NotConfigured)?;
        let links: BTreeMap<uuid::Uuid, Vec<String>> = self
            .db
            .platform(async |c| {
                let customers: Vec<(uuid::Uuid, String)> = billing_customers::table
                    .order((billing_customers::tenant_id.asc(), billing_customers::customer_id.asc()))
                    .select((billing_customers::tenant_id, billing_customers::customer_id))
                    .load(c)
                    .await?;
                // Tenants being deleted are left alone.
                let live: std::collections::HashSet<uuid::Uuid> = registry::plan_status(c, None)
                    .await?
                    .into_iter()
                    .filter(|p: &PlanStatus| p.status != "deleting")
                    .map(|p| p.id)
                    .collect();
                let mut links: BTreeMap<uuid::Uuid, Vec<String>> = BTreeMap::new();
                for (tenant, customer) in customers.into_iter().filter(|(t, _)| live.contains(t)) {
                    links.entry(tenant).or_default().push(customer);
                }
                Ok::<_, BillingError>(links)
            })
            .await?;
        let mut synced = Synced { customers: links.values().map(Vec::len).sum(), ..Synced::default() };
        for (tenant, customers) in links {
            let tenant = TenantId(tenant);
            let result = async {
                // Stripe is read before the transaction; each state is
                // stamped with the time it was read, so it is not applied
                // over an event applied (from a later read) meanwhile.
                let mut read = Vec::new();
                for customer in &customers {
                    let at = Utc::now();
                    read.push((customer, at, api.subscriptions_of(customer).await?, api.invoices_of(customer).await?));
                }
                self.db
                    .platform(async |c| {
                        let park = |p: super::Park| BillingError::Unappliable(p.reason);
                        // In one order (by customer id): no deadlock with
                        // a sync of the same tenant elsewhere.
                        for customer in &customers {
                            lock_customer(c, customer).await.map_err(park)?;
                        }
                        let event = format!("sync:{}", Utc::now().timestamp());
                        // A per-seat quantity that drifted from the members
                        // (a change whose job failed for good, an edit in the
                        // Dashboard) is set again by the seats job.
                        let seats = super::billable(c, tenant).await?;
                        if read.iter().any(|(_, _, subs, _)| subs.iter().any(|s| !self.seat_drift(s, seats).is_empty())) {
                            tracing::warn!(tenant.id = %tenant, seats, "a per-seat quantity drifted; queueing its update");
                            plinth_jobs::enqueue(c, super::seats_job(tenant, std::time::Duration::ZERO)).await?;
                        }
                        for (customer, at, subs, invoices) in &read {
                            for invoice in invoices {
                                crate::invoices::record(c, tenant, customer, invoice).await?;
                            }
                            for sub in subs {
                                let kind = sub.as_event();
                                let applied = self
                                    .apply_subscription(c, &event, kind, *at, tenant, customer, sub, Mode::Sync)
                                    .await;
                                match applied {
                                    Ok(_) => {}
                                    // One unknown price does not stop the others.
                                    Err(p) => tracing::warn!(tenant.id = %tenant, reason = p.reason, "sync skipped a subscription"),
                                }
                            }
                        }
                        let details = json!({ "by": "stripe sync" });
                        let changed = self.settle(c, tenant, None, Mode::Sync, details).await.map_err(park)?;
                        Ok::<_, BillingError>(changed.map(|(_, to)| to))
                    })
                    .await
            }
            .await;
            match result {
                Ok(Some(plan)) => synced.changed.push((tenant, plan)),
                Ok(None) => {}
                Err(err) => synced.failed.push((tenant, format!("{:#}", anyhow::Error::new(err)))),
            }
        }
        Ok(synced)
    }
}
