//! Features from Stripe's entitlements (`PLINTH_BILLING_FEATURES=stripe`):
//! each active entitlement's lookup key names a Plinth feature (one of the
//! catalog's; other keys are ignored), and the tenant has exactly those
//! features instead of its plan's. Its plan still sets its limits.

use chrono::{DateTime, Utc};
use diesel::upsert::excluded;
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_tenants::{TenantId, registry};

use super::{Outcome, Park, Processor};
use crate::schema::billing_entitlements;

impl Processor {
    /// Records the customer's active entitlements as Stripe reported them
    /// at `at` (unless a later report was recorded) and gives the tenant
    /// the features they name. Every instance's policy follows within a
    /// second.
    pub(super) async fn entitlements(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
        customer: &str,
        keys: Vec<String>,
        at: DateTime<Utc>,
    ) -> Result<Outcome, Park> {
        let stored: Option<DateTime<Utc>> = billing_entitlements::table
            .find(customer)
            .select(billing_entitlements::reported_at)
            .first(c)
            .await
            .optional()?;
        if stored.is_some_and(|stored| stored >= at) {
            return Ok(Outcome::Stale);
        }
        diesel::insert_into(billing_entitlements::table)
            .values((
                billing_entitlements::customer_id.eq(customer),
                billing_entitlements::tenant_id.eq(tenant.0),
                billing_entitlements::lookup_keys.eq(&keys),
                billing_entitlements::reported_at.eq(at),
            ))
            .on_conflict(billing_entitlements::customer_id)
            .do_update()
            .set((
                billing_entitlements::lookup_keys.eq(excluded(billing_entitlements::lookup_keys)),
                billing_entitlements::reported_at.eq(excluded(billing_entitlements::reported_at)),
            ))
            .execute(c)
            .await?;
        let known: Vec<&String> = self.catalog.plans().iter().flat_map(|p| &p.features).collect();
        let (features, unknown): (Vec<String>, Vec<String>) = keys.into_iter().partition(|k| known.contains(&k));
        if !unknown.is_empty() {
            tracing::warn!(tenant.id = %tenant, ?unknown, "entitlements that name no Plinth feature are ignored");
        }
        if registry::set_features(c, tenant, Some(&features)).await? {
            tracing::info!(tenant.id = %tenant, ?features, "features set from Stripe's entitlements");
        }
        Ok(Outcome::Applied)
    }
}
