//! Usage-based billing on Stripe Meters: `record` in the transaction that
//! does the work, `GET /v1/usage`, and the sender that reports the units to
//! Stripe's meter events API in batches.
//!
//! A plan may meter a usage (`meters` in the catalog; Plinth meters tasks
//! created). Each unit is a row of `public.usage_events`, written with the
//! work: a task that rolls back records nothing. A hard limit refuses the
//! work past it (402 `quota_exceeded`) for the rest of the month; a soft
//! limit is shown beside the use (Stripe's price bills what is over it).
//!
//! The sender (job `billing.meters`, every `PLINTH_BILLING_METER_SECS`)
//! gathers the unsent units of each tenant and meter into a batch, commits
//! the batch's id on its rows, and then sends one meter event per batch
//! (`POST /v1/billing/meter_events`: the meter's `event_name`, the
//! customer, the batch's total, `identifier` = the batch id). A batch whose
//! send failed keeps its id and is sent again with it, so Stripe counts it
//! once however often it is sent: across a Stripe outage, a crash, or two
//! instances sending the same batch.
//!
//! The period `GET /v1/usage` shows and hard limits count is the calendar
//! month (UTC); Stripe bills each meter event in the subscription period
//! its timestamp falls in.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, get, web};
use chrono::{DateTime, Datelike as _, TimeZone as _, Utc};
use diesel::sql_types::{Integer, Text};
use diesel::{ExpressionMethods as _, NullableExpressionMethods as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{Allowed, Plan, requirements};
use plinth_http::ApiError;
use plinth_http::openapi::TenantHeader;
use plinth_tenants::{Db, TenantId};
use serde::Serialize;
use utoipa::ToSchema;

use crate::customers;
use crate::error::BillingError;
use crate::schema::usage_events;
use crate::stripe::Stripe;

requirements! {
    /// Any member may see the organization's usage.
    ReadUsage = "tenant", Read, feature: none;
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(show);
}

/// The advisory lock class of a meter's hard limit (quotas use 1 to 3).
const LOCK_CLASS: i32 = 16;

/// The calendar month (UTC) `at` falls in: [start, end).
pub fn month(at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0).single().unwrap_or(at);
    let (y, m) = if at.month() == 12 { (at.year() + 1, 1) } else { (at.year(), at.month() + 1) };
    let end = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or(at);
    (start, end)
}

/// The total of `quantity` (diesel's `sum` of a bigint is a numeric).
fn total() -> diesel::expression::SqlLiteral<diesel::sql_types::BigInt> {
    diesel::dsl::sql::<diesel::sql_types::BigInt>("COALESCE(sum(quantity), 0)::bigint")
}

/// The units of `meter` the tenant used in the month so far.
async fn used(mut c: &AsyncPgConnection, tenant: TenantId, meter: &str) -> diesel::QueryResult<i64> {
    let (start, _) = month(Utc::now());
    usage_events::table
        .filter(usage_events::tenant_id.eq(tenant.0))
        .filter(usage_events::meter.eq(meter))
        .filter(usage_events::occurred_at.ge(start))
        .select(total())
        .first(&mut c)
        .await
}

/// Records `quantity` units of `meter` for the tenant, in the caller's
/// transaction (the one doing the work), when its `plan` meters it. At a
/// hard limit: 402 `quota_exceeded` (checked under a lock per tenant and
/// meter, so concurrent work cannot pass it together).
pub async fn record(
    conn: &AsyncPgConnection,
    tenant: TenantId,
    plan: &Plan,
    meter: &'static str,
    quantity: i64,
) -> Result<(), ApiError> {
    let Some(metered) = plan.meters.get(meter) else { return Ok(()) };
    let mut c = conn;
    if let Some(limit) = metered.hard_limit {
        // Raw SQL: a function call diesel's DSL has no declaration for.
        diesel::sql_query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind::<Integer, _>(LOCK_CLASS)
            .bind::<Text, _>(format!("{}:{meter}", tenant.0))
            .execute(&mut c)
            .await?;
        let used = used(conn, tenant, meter).await?;
        if used + quantity > i64::from(limit) {
            return Err(ApiError::QuotaExceeded { quota: meter, limit, used });
        }
    }
    diesel::insert_into(usage_events::table)
        .values((
            usage_events::id.eq(uuid::Uuid::now_v7()),
            usage_events::tenant_id.eq(tenant.0),
            usage_events::meter.eq(meter),
            usage_events::quantity.eq(quantity),
        ))
        .execute(&mut c)
        .await?;
    Ok(())
}

/// One meter's use this month.
#[derive(Serialize, ToSchema)]
struct MeterUse {
    meter: String,
    used: i64,
    /// Use beyond it is billed.
    soft_limit: Option<u32>,
    /// Use stops at it (402 `quota_exceeded`).
    hard_limit: Option<u32>,
    /// Units reported to Stripe so far (the rest go within
    /// `PLINTH_BILLING_METER_SECS`).
    reported: i64,
}

/// The organization's metered usage this month.
#[derive(Serialize, ToSchema)]
struct MeteredUsage {
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    /// Each usage the plan meters.
    meters: Vec<MeterUse>,
}

/// `GET /v1/usage`: this month's use of each meter of the plan.
#[utoipa::path(
    operation_id = "show_usage",
    tag = "billing",
    summary = "The organization's metered usage this month, per meter, with its limits",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = MeteredUsage)),
)]
#[get("/v1/usage")]
async fn show(ctx: Allowed<ReadUsage>, db: web::Data<Db>) -> Result<HttpResponse, ApiError> {
    let plan = ctx.plan().clone();
    let tenant = ctx.tenant.id;
    let (start, end) = month(Utc::now());
    let rows: Vec<(String, i64, i64)> = db
        .platform(async |c| {
            // Raw SQL for the aggregate filter diesel's DSL lacks.
            let reported = diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "COALESCE(sum(quantity) FILTER (WHERE sent_at IS NOT NULL), 0)::bigint",
            );
            Ok::<_, ApiError>(
                usage_events::table
                    .filter(usage_events::tenant_id.eq(tenant.0))
                    .filter(usage_events::occurred_at.ge(start))
                    .group_by(usage_events::meter)
                    .select((usage_events::meter, total(), reported))
                    .load(c)
                    .await?,
            )
        })
        .await?;
    let meters = plan
        .meters
        .iter()
        .map(|(name, meter)| {
            let (used, reported) = rows.iter().find(|r| &r.0 == name).map_or((0, 0), |r| (r.1, r.2));
            MeterUse { meter: name.clone(), used, soft_limit: meter.soft_limit, hard_limit: meter.hard_limit, reported }
        })
        .collect();
    Ok(HttpResponse::Ok().json(MeteredUsage { period_start: start, period_end: end, meters }))
}

/// What one run of the sender did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sent {
    pub batches: usize,
    pub units: i64,
    /// Batches left for a later run (Stripe failing, no customer).
    pub left: usize,
}

/// A batch to send: its id, tenant, meter, total and its latest unit's
/// time (the meter event's timestamp: the same at every resend).
type Batch = (uuid::Uuid, uuid::Uuid, String, i64, DateTime<Utc>);

/// Gathers unsent units into batches (one per tenant and meter; rows
/// claimed with `SKIP LOCKED`, so two instances never batch one unit
/// twice), commits their ids, and sends every unsent batch, new or left by
/// an earlier run, to Stripe.
pub async fn send(db: &Db, api: &Stripe, catalog: &plinth_access::Catalog, limit: i64) -> Result<Sent, BillingError> {
    db.platform(async |c| {
        let fresh: Vec<(uuid::Uuid, uuid::Uuid, String)> = usage_events::table
            .filter(usage_events::batch_id.is_null())
            .order(usage_events::id.asc())
            .select((usage_events::id, usage_events::tenant_id, usage_events::meter))
            .limit(limit)
            .for_update()
            .skip_locked()
            .load(c)
            .await?;
        let mut groups: BTreeMap<(uuid::Uuid, String), Vec<uuid::Uuid>> = BTreeMap::new();
        for (id, tenant, meter) in fresh {
            groups.entry((tenant, meter)).or_default().push(id);
        }
        for ids in groups.into_values() {
            diesel::update(usage_events::table.filter(usage_events::id.eq_any(ids)))
                .set(usage_events::batch_id.eq(uuid::Uuid::now_v7()))
                .execute(c)
                .await?;
        }
        Ok::<_, BillingError>(())
    })
    .await?;
    let batches: Vec<Batch> = db
        .platform(async |c| {
            Ok::<_, BillingError>(
                usage_events::table
                    .filter(usage_events::sent_at.is_null())
                    .filter(usage_events::batch_id.is_not_null())
                    .group_by((usage_events::batch_id, usage_events::tenant_id, usage_events::meter))
                    .select((
                        diesel::dsl::sql::<diesel::sql_types::Uuid>("batch_id"),
                        usage_events::tenant_id,
                        usage_events::meter,
                        total(),
                        diesel::dsl::max(usage_events::occurred_at).assume_not_null(),
                    ))
                    .load(c)
                    .await?,
            )
        })
        .await?;
    let mut sent = Sent::default();
    for (batch, tenant, meter, units, at) in batches {
        let found = db
            .platform(async |c| {
                let customer = customers::current(c, TenantId(tenant)).await?;
                let plan = plinth_tenants::registry::plan_status(c, Some(TenantId(tenant))).await?;
                Ok::<_, BillingError>((customer, plan.into_iter().next().map(|p| p.plan)))
            })
            .await?;
        let event = found
            .1
            .as_deref()
            .and_then(|plan| catalog.effective(plan).meters.get(&meter).map(|m| m.event_name.clone()))
            // A plan that no longer meters it: the catalog's first meter of
            // that name still names Stripe's event.
            .or_else(|| catalog.plans().iter().find_map(|p| p.meters.get(&meter).map(|m| m.event_name.clone())));
        let (Some(customer), Some(event)) = (found.0, event) else {
            tracing::warn!(tenant.id = %tenant, meter, "metered usage without a Stripe customer or meter; kept");
            sent.left += 1;
            continue;
        };
        if let Err(e) = api.meter_event(&event, &batch.to_string(), &customer, units, at.timestamp()).await {
            // Kept with its id, sent again by the next run (after an outage
            // the breaker fails the rest fast). A refusal is logged by the
            // client with Stripe's message, and stays until it is fixed.
            sent.left += 1;
            tracing::warn!(
                tenant.id = %tenant,
                meter,
                error = format!("{:#}", anyhow::Error::new(e)),
                "sending metered usage failed; kept"
            );
            continue;
        }
        db.platform(async |c| {
            diesel::update(usage_events::table.filter(usage_events::batch_id.eq(batch)))
                .set(usage_events::sent_at.eq(diesel::dsl::now))
                .execute(c)
                .await?;
            Ok::<_, BillingError>(())
        })
        .await?;
        sent.batches += 1;
        sent.units += units;
    }
    Ok(sent)
}
