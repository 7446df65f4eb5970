//! Tenants' Stripe customers (`public.billing_customers`).
//!
//! A tenant has at most one current customer: the one checkout and the
//! portal use. Every customer a tenant ever had stays linked to it, so a
//! late event about an old customer still finds its tenant. A customer is
//! detached (no longer current) when Stripe deletes it or a newer checkout
//! brings another one.

use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_tenants::TenantId;

use crate::schema::{billing_closures, billing_customers};

/// The tenant's current customer.
pub async fn current(c: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<Option<String>> {
    billing_customers::table
        .filter(billing_customers::tenant_id.eq(tenant.0))
        .filter(billing_customers::detached_at.is_null())
        .select(billing_customers::customer_id)
        .first(c)
        .await
        .optional()
}

/// Every customer the tenant has had, current or not.
pub async fn all(c: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<Vec<String>> {
    billing_customers::table
        .filter(billing_customers::tenant_id.eq(tenant.0))
        .order(billing_customers::created_at.asc())
        .select(billing_customers::customer_id)
        .load(c)
        .await
}

/// Whether `customer` was detached from its tenant (deleted or replaced).
pub async fn detached(c: &mut AsyncPgConnection, customer: &str) -> diesel::QueryResult<bool> {
    let row: Option<Option<chrono::DateTime<chrono::Utc>>> =
        billing_customers::table.find(customer).select(billing_customers::detached_at).first(c).await.optional()?;
    Ok(matches!(row, Some(Some(_))))
}

/// The tenant a customer is (or was) linked to.
pub async fn tenant_of(c: &mut AsyncPgConnection, customer: &str) -> diesel::QueryResult<Option<TenantId>> {
    let found: Option<uuid::Uuid> =
        billing_customers::table.find(customer).select(billing_customers::tenant_id).first(c).await.optional()?;
    Ok(found.map(TenantId))
}

/// Makes `customer` the tenant's current customer, detaching the one it
/// replaces (`why`). `Err(other)` when the customer belongs to another
/// tenant: nothing changes.
pub async fn link(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    customer: &str,
    why: &str,
) -> diesel::QueryResult<Result<(), TenantId>> {
    if let Some(other) = tenant_of(c, customer).await?
        && other != tenant
    {
        return Ok(Err(other));
    }
    // Detach first: at most one current customer per tenant (a unique index).
    diesel::update(
        billing_customers::table
            .filter(billing_customers::tenant_id.eq(tenant.0))
            .filter(billing_customers::customer_id.ne(customer))
            .filter(billing_customers::detached_at.is_null()),
    )
    .set((billing_customers::detached_at.eq(diesel::dsl::now), billing_customers::detached_reason.eq(why)))
    .execute(c)
    .await?;
    diesel::insert_into(billing_customers::table)
        .values((billing_customers::tenant_id.eq(tenant.0), billing_customers::customer_id.eq(customer)))
        .on_conflict(billing_customers::customer_id)
        .do_update()
        .set((
            billing_customers::detached_at.eq(None::<chrono::DateTime<chrono::Utc>>),
            billing_customers::detached_reason.eq(None::<String>),
        ))
        .execute(c)
        .await?;
    Ok(Ok(()))
}

/// Detaches `customer` (deleted in Stripe, or unusable); the tenant gets a
/// new customer on its next checkout. True when it was current.
pub async fn detach(c: &mut AsyncPgConnection, customer: &str, why: &str) -> diesel::QueryResult<bool> {
    let n = diesel::update(billing_customers::table.find(customer).filter(billing_customers::detached_at.is_null()))
        .set((billing_customers::detached_at.eq(diesel::dsl::now), billing_customers::detached_reason.eq(why)))
        .execute(c)
        .await?;
    Ok(n == 1)
}

/// How many customers the tenant has had: the next one's idempotency key
/// must differ from a deleted one's, or Stripe would hand it back.
pub async fn count(c: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<i64> {
    billing_customers::table.filter(billing_customers::tenant_id.eq(tenant.0)).count().get_result(c).await
}

/// What deleting its tenant did to a customer in Stripe, if its tenant was
/// deleted.
pub async fn closure(c: &mut AsyncPgConnection, customer: &str) -> diesel::QueryResult<Option<serde_json::Value>> {
    billing_closures::table.find(customer).select(billing_closures::result).first(c).await.optional()
}

/// Records what deleting the tenant did to its customer in Stripe.
pub async fn record_closure(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    customer: &str,
    result: &serde_json::Value,
) -> diesel::QueryResult<()> {
    diesel::insert_into(billing_closures::table)
        .values((
            billing_closures::customer_id.eq(customer),
            billing_closures::tenant_id.eq(tenant.0),
            billing_closures::result.eq(result),
        ))
        .on_conflict(billing_closures::customer_id)
        .do_update()
        .set((billing_closures::result.eq(result), billing_closures::closed_at.eq(diesel::dsl::now)))
        .execute(c)
        .await?;
    Ok(())
}

/// The tenant's links to Stripe (its customer and subscriptions), for its
/// archive (`plinth_tenants::backup`).
pub async fn archive(conn: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<serde_json::Value> {
    use plinth_tenants::backup::rows_of;
    Ok(serde_json::json!({
        "customers": rows_of(conn, "billing_customers", tenant).await?,
        "subscriptions": rows_of(conn, "subscriptions", tenant).await?,
    }))
}

/// Restores an archive's links to Stripe for `tenant` (restored as itself:
/// a copy has no subscription of its own), in the caller's transaction.
/// Stripe stays the source of truth: the next sync (`plinth billing sync`)
/// brings each subscription up to date. A subscription row another tenant
/// holds now is left to it. Returns how many subscriptions were restored.
pub async fn restore_archive(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    part: &serde_json::Value,
) -> diesel::QueryResult<usize> {
    use plinth_tenants::backup::restore_rows;
    let rows_at = |key: &str| part.get(key).and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    restore_rows(
        conn,
        "billing_customers",
        &rows_at("customers"),
        tenant,
        Some("NOT EXISTS (SELECT 1 FROM public.billing_customers c WHERE c.customer_id = r.customer_id)"),
    )
    .await?;
    restore_rows(
        conn,
        "subscriptions",
        &rows_at("subscriptions"),
        tenant,
        Some("NOT EXISTS (SELECT 1 FROM public.subscriptions s WHERE s.id = r.id)"),
    )
    .await
}
