//! `plinth billing sync` (and the periodic job): every linked customer's
//! subscriptions read again from Stripe and applied to its tenant.

use chrono::Utc;
use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl;
use plinth_access::{catalog::FREE, change_plan};
use plinth_tenants::audit::Actor;
use plinth_tenants::registry::PlanStatus;
use plinth_tenants::{TenantId, registry};
use serde_json::json;
use stripe_shared::SubscriptionStatus;

use super::{Park, Processor, lock_customer};
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
    /// Re-reads every linked customer's subscriptions from Stripe and
    /// applies the newest to its tenant (`plinth billing sync`). Tenants
    /// without a Stripe customer (plans set by an operator) are left alone.
    pub async fn sync(&self) -> Result<Synced, BillingError> {
        let api = self.api.as_ref().ok_or(BillingError::NotConfigured)?;
        struct Link {
            tenant_id: uuid::Uuid,
            customer_id: String,
            plan: String,
        }
        let links: Vec<Link> = self
            .db
            .platform(async |c| {
                let customers: Vec<(uuid::Uuid, String)> = billing_customers::table
                    .order(billing_customers::tenant_id.asc())
                    .select((billing_customers::tenant_id, billing_customers::customer_id))
                    .load(c)
                    .await?;
                // Plans from the registry; tenants being deleted are left alone.
                let plans: std::collections::HashMap<uuid::Uuid, PlanStatus> =
                    registry::plan_status(c, None).await?.into_iter().map(|p| (p.id, p)).collect();
                let links = customers
                    .into_iter()
                    .filter_map(|(tenant_id, customer_id)| {
                        let tenant = plans.get(&tenant_id).filter(|p| p.status != "deleting")?;
                        Some(Link { tenant_id, customer_id, plan: tenant.plan.clone() })
                    })
                    .collect();
                Ok::<_, BillingError>(links)
            })
            .await?;
        let mut synced = Synced { customers: links.len(), ..Synced::default() };
        for link in links {
            let tenant = TenantId(link.tenant_id);
            let result = async {
                let subs = api.subscriptions_of(&link.customer_id).await?;
                self.db
                    .platform(async |c| {
                        lock_customer(c, &link.customer_id).await.map_err(|Park(r)| BillingError::Unappliable(r))?;
                        let event = format!("sync:{}", Utc::now().timestamp());
                        match <[_]>::first(&subs) {
                            Some(sub) => {
                                let kind = if sub.status == SubscriptionStatus::Canceled {
                                    "customer.subscription.deleted"
                                } else {
                                    "customer.subscription.updated"
                                };
                                self.apply_subscription(c, &event, kind, Utc::now(), tenant, &link.customer_id, sub)
                                    .await
                                    .map_err(|Park(r)| BillingError::Unappliable(r))?;
                            }
                            None => {
                                let details = json!({ "by": "stripe sync", "reason": "no subscription" });
                                change_plan(c, &self.catalog, tenant, FREE, Actor::System, details).await?;
                            }
                        }
                        let plan = registry::plan_status(c, Some(tenant)).await?.into_iter().next();
                        Ok::<_, BillingError>(plan.map(|p| p.plan))
                    })
                    .await
            }
            .await;
            match result {
                Ok(Some(plan)) if plan != link.plan => synced.changed.push((tenant, plan)),
                Ok(_) => {}
                Err(err) => synced.failed.push((tenant, format!("{:#}", anyhow::Error::new(err)))),
            }
        }
        Ok(synced)
    }
}
