//! The local mirror of each tenant's Stripe invoices (`public.invoices`),
//! kept by the `invoice.*` webhooks and the periodic sync, and
//! `GET /v1/billing/invoices` (owners), which reads only the mirror.

use actix_web::{HttpResponse, get, web};
use chrono::{DateTime, Utc};
use diesel::upsert::excluded;
use diesel::{
    BoolExpressionMethods as _, ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable,
    SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::Allowed;
use plinth_http::ApiError;
use plinth_http::openapi::{PageQuery, TenantHeader};
use plinth_http::request::{Page, PageParams};
use plinth_tenants::{Db, TenantId};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::ManageBilling;
use crate::object::Invoice;
use crate::schema::invoices;

/// Records the invoice as Stripe last gave it. A paid, void or
/// uncollectible invoice is not moved back to draft or open by an older
/// event that arrives late.
pub async fn record(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    customer: &str,
    invoice: &Invoice,
) -> diesel::QueryResult<()> {
    const SETTLED: [&str; 3] = ["paid", "void", "uncollectible"];
    let known: Option<Option<String>> =
        invoices::table.find(&invoice.id).select(invoices::status).for_update().first(c).await.optional()?;
    if let Some(Some(status)) = &known
        && SETTLED.contains(&status.as_str())
        && !invoice.status.as_deref().is_some_and(|s| SETTLED.contains(&s))
    {
        return Ok(());
    }
    let at = |t: Option<i64>| t.and_then(|t| DateTime::from_timestamp(t, 0));
    let created = at(invoice.created).unwrap_or_else(Utc::now);
    diesel::insert_into(invoices::table)
        .values((
            invoices::id.eq(&invoice.id),
            invoices::local_id.eq(uuid::Uuid::now_v7()),
            invoices::tenant_id.eq(tenant.0),
            invoices::customer_id.eq(customer),
            invoices::subscription_id.eq(invoice.subscription.as_deref()),
            invoices::number.eq(invoice.number.as_deref()),
            invoices::status.eq(invoice.status.as_deref()),
            invoices::amount_due.eq(invoice.amount_due),
            invoices::amount_paid.eq(invoice.amount_paid),
            invoices::amount_remaining.eq(invoice.amount_remaining),
            invoices::currency.eq(&invoice.currency),
            invoices::period_start.eq(at(invoice.period_start)),
            invoices::period_end.eq(at(invoice.period_end)),
            invoices::hosted_url.eq(invoice.hosted_url.as_deref()),
            invoices::pdf_url.eq(invoice.pdf_url.as_deref()),
            invoices::created_at.eq(created),
        ))
        .on_conflict(invoices::id)
        .do_update()
        .set((
            invoices::subscription_id.eq(excluded(invoices::subscription_id)),
            invoices::number.eq(excluded(invoices::number)),
            invoices::status.eq(excluded(invoices::status)),
            invoices::amount_due.eq(excluded(invoices::amount_due)),
            invoices::amount_paid.eq(excluded(invoices::amount_paid)),
            invoices::amount_remaining.eq(excluded(invoices::amount_remaining)),
            invoices::currency.eq(excluded(invoices::currency)),
            invoices::period_start.eq(excluded(invoices::period_start)),
            invoices::period_end.eq(excluded(invoices::period_end)),
            invoices::hosted_url.eq(excluded(invoices::hosted_url)),
            invoices::pdf_url.eq(excluded(invoices::pdf_url)),
        ))
        .execute(c)
        .await?;
    Ok(())
}

/// One invoice as the owners see it.
#[derive(Queryable, Selectable, Serialize, ToSchema)]
#[diesel(table_name = invoices)]
pub struct InvoiceView {
    /// Stripe's invoice id.
    id: String,
    /// The list's cursor.
    #[serde(skip)]
    local_id: uuid::Uuid,
    /// The invoice number shown to the customer (null for a draft).
    number: Option<String>,
    /// `draft`, `open`, `paid`, `uncollectible` or `void`.
    status: Option<String>,
    /// In the currency's smallest unit (cents).
    amount_due: i64,
    amount_paid: i64,
    amount_remaining: i64,
    /// ISO 4217, lowercase (`usd`).
    currency: String,
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
    /// Stripe's page for the invoice, where it can be paid.
    hosted_url: Option<String>,
    /// The invoice as a PDF.
    pdf_url: Option<String>,
    /// When Stripe created it.
    created_at: DateTime<Utc>,
}

/// `GET /v1/billing/invoices`: the tenant's invoices, newest first, from
/// the mirror.
#[utoipa::path(
    operation_id = "billing_invoices",
    tag = "billing",
    summary = "The organization's invoices, newest first (owners)",
    params(TenantHeader, PageQuery),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Page<InvoiceView>)),
)]
#[get("/v1/billing/invoices")]
pub(crate) async fn list(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    query: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let page = query.validate()?;
    let tenant = ctx.tenant.id;
    let rows: Vec<InvoiceView> = db
        .platform(async |c| {
            let mut query = invoices::table
                .filter(invoices::tenant_id.eq(tenant.0))
                .order((invoices::created_at.desc(), invoices::local_id.desc()))
                .limit(page.limit + 1)
                .select(InvoiceView::as_select())
                .into_boxed();
            if let Some(after) = page.after {
                // Keyset: after the cursor's own row, of this tenant only.
                let last: Option<(DateTime<Utc>, uuid::Uuid)> = invoices::table
                    .filter(invoices::tenant_id.eq(tenant.0))
                    .filter(invoices::local_id.eq(after))
                    .select((invoices::created_at, invoices::local_id))
                    .first(c)
                    .await
                    .optional()?;
                let Some((created, id)) = last else {
                    return Err(ApiError::invalid_fields(vec![plinth_http::FieldError::new(
                        "cursor",
                        "invalid",
                        "is not a cursor returned by this list",
                    )]));
                };
                query = query.filter(
                    invoices::created_at
                        .lt(created)
                        .or(invoices::created_at.eq(created).and(invoices::local_id.lt(id))),
                );
            }
            Ok(query.load(c).await?)
        })
        .await?;
    Ok(HttpResponse::Ok().json(Page::from_rows(rows, page, |i| i.local_id)))
}
