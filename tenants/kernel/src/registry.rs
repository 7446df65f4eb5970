//! The tenant registry (`public.tenants`, `public.tenant_domains`) and
//! provisioning: a tenant row, its schema and every tenant migration, in one
//! transaction.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DbError};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use crate::db::{Db, PgConn, PoolError, TenantRows, TenantScope};
use crate::ids::{SchemaName, ShardName, Slug, TenantId};
use crate::migrate::{self, TENANT_MIGRATIONS};
use crate::schema::{tenant_domains, tenants};

/// Whether a tenant is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TenantStatus {
    Active,
    /// Refused with 403 `tenant_suspended`; data kept.
    Suspended,
    /// Being deleted: no longer served (404), schema about to be dropped.
    Deleting,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "deleting" => Some(Self::Deleting),
            _ => None,
        }
    }
}

/// A tenant as the registry knows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Tenant {
    pub id: TenantId,
    /// The tenant's URL name (see [`Slug`]).
    #[schema(pattern = r"^[a-z][a-z0-9-]*$", min_length = 3, max_length = 40)]
    pub slug: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(skip)]
    #[schema(ignore)]
    pub schema: SchemaName,
    /// The server its schema lives on (`crate::shards`).
    #[serde(skip)]
    #[schema(ignore)]
    pub shard: ShardName,
    /// Being moved to another shard (`crate::moves`).
    #[serde(skip)]
    #[schema(ignore)]
    pub moving: bool,
    pub status: TenantStatus,
    pub plan: String,
    pub created_at: DateTime<Utc>,
}

impl Tenant {
    /// What a tenant-scoped transaction needs.
    pub fn scope(&self) -> TenantScope<'_> {
        TenantScope { id: self.id, schema: &self.schema, shard: &self.shard, moving: self.moving, consistency: None }
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = tenants)]
struct TenantRow {
    id: uuid::Uuid,
    slug: String,
    name: String,
    schema_name: String,
    status: String,
    plan: String,
    created_at: DateTime<Utc>,
    shard: String,
    moving_to: Option<String>,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = DbError;

    fn try_from(row: TenantRow) -> Result<Self, DbError> {
        let corrupt = |what: String| DbError::DeserializationError(what.into());
        Ok(Tenant {
            id: TenantId(row.id),
            schema: SchemaName::from_stored(row.schema_name)
                .map_err(|s| corrupt(format!("tenant {} has a malformed schema name {s:?}", row.id)))?,
            status: TenantStatus::parse(&row.status)
                .ok_or_else(|| corrupt(format!("tenant {} has unknown status {:?}", row.id, row.status)))?,
            shard: ShardName::parse(&row.shard)
                .map_err(|_| corrupt(format!("tenant {} has a malformed shard name {:?}", row.id, row.shard)))?,
            moving: row.moving_to.is_some(),
            slug: row.slug,
            name: row.name,
            plan: row.plan,
            created_at: row.created_at,
        })
    }
}

/// A row that may be missing, as a checked [`Tenant`].
fn into_tenant(row: Option<TenantRow>) -> Result<Option<Tenant>, DbError> {
    row.map(Tenant::try_from).transpose()
}

/// Why a tenant could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("the slug is already taken")]
    SlugTaken,
    #[error("the name {0}")]
    InvalidName(&'static str),
    #[error("no shard takes new tenants (every one is draining or closed)")]
    NoOpenShard,
    #[error("there is no open shard named {0}")]
    ShardNotOpen(ShardName),
    #[error("the tenant is being moved to another shard: try again when the move is done")]
    Moving,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// Checks an organization name: at most 200 characters as given, not blank,
/// no control or invisible characters. Returns the trimmed name.
pub fn validate_name(name: &str) -> Result<&str, &'static str> {
    if name.chars().count() > 200 {
        return Err("must be at most 200 characters");
    }
    let name = name.trim();
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    if name.chars().any(crate::text::is_invisible) {
        return Err("must not contain invisible or direction-changing characters");
    }
    Ok(name)
}

/// Creates a tenant in its own transaction. See [`provision`].
#[tracing::instrument(skip_all, fields(tenant.slug = %slug))]
pub async fn create(db: &Db, slug: &Slug, name: &str) -> Result<Tenant, CreateError> {
    create_on(db, slug, name, None).await
}

/// Creates a tenant in its own transaction, on `shard` if given (it must be
/// open), else where [`crate::shards::place`] puts it.
pub async fn create_on(db: &Db, slug: &Slug, name: &str, shard: Option<&ShardName>) -> Result<Tenant, CreateError> {
    db.provisioning(async |conn| provision_on(conn, db, slug, name, shard).await).await
}

/// Inserts the tenant row, creates its schema, applies every tenant migration
/// and records them in the ledger, inside the caller's transaction on the
/// platform database, on the shard [`crate::shards::place`] chooses.
///
/// On the primary, all in that one transaction: if anything fails, nothing
/// is left behind (PostgreSQL DDL is transactional). With a spare schema in
/// the warm pool ([`crate::spares`]), takes it instead of running the
/// migrations. With a template tenant ([`crate::template`]), copies its
/// rows in.
///
/// On another shard, the schema, its migrations (in that server's ledger)
/// and the template's rows are made in a transaction there that commits
/// first; the tenant row is visible only when the caller's transaction
/// commits, after it. If the caller's transaction rolls back, the schema
/// stays on the shard, unserved, with no tenant row naming it (a random
/// `t_<id>` no one can reach). Spares are made on the primary only.
pub async fn provision(conn: &mut PgConn, db: &Db, slug: &Slug, name: &str) -> Result<Tenant, CreateError> {
    provision_on(conn, db, slug, name, None).await
}

/// [`provision`] on `shard` if given (it must be open).
pub async fn provision_on(
    conn: &mut PgConn,
    db: &Db,
    slug: &Slug,
    name: &str,
    shard: Option<&ShardName>,
) -> Result<Tenant, CreateError> {
    let name = validate_name(name).map_err(CreateError::InvalidName)?;
    let shard = match shard {
        Some(named) => {
            crate::shards::open(conn, named).await?.ok_or_else(|| CreateError::ShardNotOpen(named.clone()))?
        }
        None => crate::shards::place(conn).await?.ok_or(CreateError::NoOpenShard)?,
    };
    let id = TenantId::new();
    let schema = SchemaName::for_tenant(id);
    let row = TenantRow {
        id: id.0,
        slug: slug.as_str().to_owned(),
        name: name.to_owned(),
        schema_name: schema.as_str().to_owned(),
        status: TenantStatus::Active.as_str().to_owned(),
        plan: "free".to_owned(),
        created_at: Utc::now(),
        shard: shard.as_str().to_owned(),
        moving_to: None,
    };
    let inserted: TenantRow = diesel::insert_into(tenants::table)
        .values(&row)
        .returning(TenantRow::as_returning())
        .get_result(conn)
        .await
        .map_err(|e| match e {
            DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
                if info.constraint_name() == Some("tenants_slug_key") =>
            {
                CreateError::SlugTaken
            }
            other => CreateError::from(other),
        })?;
    let tenant = Tenant::try_from(inserted)?;
    if !shard.is_primary() {
        let copied = crate::template::rows_to_copy(conn, TENANT_MIGRATIONS).await?;
        db.provisioning_on(&shard, async |c| {
            crate::db::batch(c, &format!("CREATE SCHEMA {}", tenant.schema.quoted())).await?;
            migrate::apply_to_schema(c, tenant.id, &tenant.schema, TENANT_MIGRATIONS).await?;
            if let Some(copied) = &copied {
                crate::template::insert_rows(c, &tenant.schema, copied).await?;
            }
            Ok::<_, CreateError>(())
        })
        .await?;
        migrate::record(conn, tenant.id, TENANT_MIGRATIONS).await?;
        return Ok(tenant);
    }
    // A spare from the warm pool, if one waits; else the DDL now.
    if !crate::spares::take(conn, tenant.id, &tenant.schema, TENANT_MIGRATIONS).await? {
        let ddl = format!("CREATE SCHEMA {}", tenant.schema.quoted());
        crate::db::batch(conn, &ddl).await?;
        migrate::apply_to_schema(conn, tenant.id, &tenant.schema, TENANT_MIGRATIONS).await?;
    }
    crate::template::copy_rows(conn, &tenant.schema, TENANT_MIGRATIONS).await?;
    Ok(tenant)
}

pub async fn find_by_slug(conn: &mut PgConn, slug: &str) -> Result<Option<Tenant>, DbError> {
    tenants::table
        .filter(tenants::slug.eq(slug))
        .select(TenantRow::as_select())
        .first(conn)
        .await
        .optional()
        .and_then(into_tenant)
}

pub async fn find_by_id(conn: &mut PgConn, id: TenantId) -> Result<Option<Tenant>, DbError> {
    tenants::table.find(id.0).select(TenantRow::as_select()).first(conn).await.optional().and_then(into_tenant)
}

/// The tenants among `ids` that exist and are not being deleted, by slug.
pub async fn find_live_by_ids(conn: &mut PgConn, ids: &[TenantId]) -> Result<Vec<Tenant>, DbError> {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|t| t.0).collect();
    tenants::table
        .filter(tenants::id.eq_any(ids))
        .filter(tenants::status.ne(TenantStatus::Deleting.as_str()))
        .order(tenants::slug.asc())
        .select(TenantRow::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(Tenant::try_from)
        .collect()
}

/// The tenant served on a verified custom domain.
pub async fn find_by_domain(conn: &mut PgConn, domain: &str) -> Result<Option<Tenant>, DbError> {
    tenant_domains::table
        .inner_join(tenants::table)
        .filter(tenant_domains::domain.eq(domain))
        .filter(tenant_domains::verified_at.is_not_null())
        .select(TenantRow::as_select())
        .first(conn)
        .await
        .optional()
        .and_then(into_tenant)
}

pub async fn list(conn: &mut PgConn) -> Result<Vec<Tenant>, DbError> {
    tenants::table
        .order(tenants::created_at.asc())
        .select(TenantRow::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(Tenant::try_from)
        .collect()
}

/// Up to `limit` tenants with ids after `after`, in id order (cursor pages).
pub async fn page(conn: &mut PgConn, after: Option<uuid::Uuid>, limit: i64) -> Result<Vec<Tenant>, DbError> {
    let query = tenants::table.order(tenants::id.asc()).limit(limit).select(TenantRow::as_select()).into_boxed();
    let query = match after {
        Some(after) => query.filter(tenants::id.gt(after)),
        None => query,
    };
    query.load(conn).await?.into_iter().map(Tenant::try_from).collect()
}

/// A tenant's plan and status as stored, for the access policy.
#[derive(Debug, Clone, diesel::Queryable)]
pub struct PlanStatus {
    pub id: uuid::Uuid,
    pub plan: String,
    pub status: String,
    /// Since when its writes wait for a payment (see [`set_restricted`]).
    pub restricted_at: Option<chrono::DateTime<Utc>>,
    /// The features it has instead of its plan's (see [`set_features`]).
    pub features: Option<Vec<String>>,
}

/// The plan and status of every tenant (`None`), or of one.
pub async fn plan_status(conn: &mut PgConn, only: Option<TenantId>) -> Result<Vec<PlanStatus>, DbError> {
    let query = tenants::table
        .select((tenants::id, tenants::plan, tenants::status, tenants::restricted_at, tenants::features))
        .into_boxed();
    let query = match only {
        Some(id) => query.filter(tenants::id.eq(id.0)),
        None => query,
    };
    query.load(conn).await
}

/// Moves a tenant between `active` and `suspended`. A tenant being deleted
/// stays deleted. Returns the updated tenant, or `None` if there is none.
pub async fn set_status(conn: &mut PgConn, id: TenantId, status: TenantStatus) -> Result<Option<Tenant>, DbError> {
    diesel::update(tenants::table.find(id.0).filter(tenants::status.ne(TenantStatus::Deleting.as_str())))
        .set((tenants::status.eq(status.as_str()), tenants::updated_at.eq(Utc::now())))
        .returning(TenantRow::as_returning())
        .get_result(conn)
        .await
        .optional()
        .and_then(into_tenant)
}

/// Where a tenant's plan came from: billing (a new tenant's free plan, or
/// its Stripe subscriptions) or an operator (a platform admin, the CLI).
/// Billing's periodic repair changes only billing's plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanSource {
    Operator,
    Billing,
}

impl PlanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Billing => "billing",
        }
    }
}

/// Moves a tenant to `plan` (a plan of the catalog; the caller checks),
/// recording where it came from. Returns the updated tenant, or `None` if
/// there is none (or it is being deleted), and the plan it was on.
pub async fn set_plan(
    conn: &mut PgConn,
    id: TenantId,
    plan: &str,
    source: PlanSource,
) -> Result<Option<(Tenant, String)>, DbError> {
    let before: Option<String> = tenants::table
        .find(id.0)
        .filter(tenants::status.ne(TenantStatus::Deleting.as_str()))
        .select(tenants::plan)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let Some(before) = before else { return Ok(None) };
    let updated = diesel::update(tenants::table.find(id.0))
        .set((tenants::plan.eq(plan), tenants::plan_source.eq(source.as_str()), tenants::updated_at.eq(Utc::now())))
        .returning(TenantRow::as_returning())
        .get_result(conn)
        .await
        .optional()
        .and_then(into_tenant)?;
    // An operator's plan is not waiting for a payment.
    if source == PlanSource::Operator {
        set_restricted(conn, id, false).await?;
    }
    Ok(updated.map(|t| (t, before)))
}

/// A tenant's plan and where it came from, locked until the transaction
/// ends; `None` if there is no such tenant (or it is being deleted).
pub async fn plan_for_update(conn: &mut PgConn, id: TenantId) -> Result<Option<(String, PlanSource)>, DbError> {
    let row: Option<(String, String)> = tenants::table
        .find(id.0)
        .filter(tenants::status.ne(TenantStatus::Deleting.as_str()))
        .select((tenants::plan, tenants::plan_source))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(|(plan, source)| {
        (plan, if source == PlanSource::Billing.as_str() { PlanSource::Billing } else { PlanSource::Operator })
    }))
}

/// Restricts a tenant (its writes wait for a payment) or lifts the
/// restriction. Billing sets it when a failed payment's grace ends and
/// clears it when the payment is made or the subscription ends. Returns
/// whether it changed.
pub async fn set_restricted(conn: &mut PgConn, id: TenantId, restricted: bool) -> Result<bool, DbError> {
    let query = tenants::table.find(id.0).filter(tenants::status.ne(TenantStatus::Deleting.as_str()));
    let changed = match restricted {
        true => {
            diesel::update(query.filter(tenants::restricted_at.is_null()))
                .set((tenants::restricted_at.eq(Utc::now()), tenants::updated_at.eq(Utc::now())))
                .execute(conn)
                .await?
        }
        false => {
            diesel::update(query.filter(tenants::restricted_at.is_not_null()))
                .set((tenants::restricted_at.eq(None::<chrono::DateTime<Utc>>), tenants::updated_at.eq(Utc::now())))
                .execute(conn)
                .await?
        }
    };
    Ok(changed == 1)
}

/// Gives a tenant exactly `features` instead of its plan's (`None`: its
/// plan's again). Billing sets it from Stripe's entitlements when
/// `PLINTH_BILLING_FEATURES=stripe`. Returns whether it changed.
pub async fn set_features(conn: &mut PgConn, id: TenantId, features: Option<&[String]>) -> Result<bool, DbError> {
    let changed = diesel::update(
        tenants::table
            .find(id.0)
            .filter(tenants::status.ne(TenantStatus::Deleting.as_str()))
            .filter(tenants::features.is_distinct_from(features)),
    )
    .set((tenants::features.eq(features), tenants::updated_at.eq(Utc::now())))
    .execute(conn)
    .await?;
    Ok(changed == 1)
}

/// Gives every tenant its plan's features again (the catalog decides
/// features, `PLINTH_BILLING_FEATURES=catalog`). Returns how many changed.
pub async fn clear_features(conn: &mut PgConn) -> Result<usize, DbError> {
    diesel::update(tenants::table.filter(tenants::features.is_not_null()))
        .set((tenants::features.eq(None::<Vec<String>>), tenants::updated_at.eq(Utc::now())))
        .execute(conn)
        .await
}

/// A custom domain as typed (trimmed, lowercased, without a final dot),
/// if it is a domain name.
pub fn parse_domain(input: &str) -> Option<String> {
    let domain = input.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = (3..=253).contains(&domain.len())
        && domain.contains('.')
        && domain
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    valid.then_some(domain)
}

/// Whether `err` is the refusal of a domain some tenant has already.
pub fn domain_taken(err: &DbError) -> bool {
    matches!(err, DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) if info.table_name() == Some("tenant_domains"))
}

/// A tenant's custom domains: (domain, verified), by name.
pub async fn domains(conn: &mut PgConn, tenant: TenantId) -> Result<Vec<(String, bool)>, DbError> {
    let rows: Vec<(String, Option<DateTime<Utc>>)> = tenant_domains::table
        .filter(tenant_domains::tenant_id.eq(tenant.0))
        .order(tenant_domains::domain.asc())
        .select((tenant_domains::domain, tenant_domains::verified_at))
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|(d, v)| (d, v.is_some())).collect())
}

/// What the console's tenant list asks for: a text found in the slug or
/// the name, a status, a plan, and a page.
#[derive(Debug, Clone, Default)]
pub struct Search {
    pub text: Option<String>,
    pub status: Option<TenantStatus>,
    pub plan: Option<String>,
    pub offset: i64,
    pub limit: i64,
}

/// The tenants matching `search`, newest first, and how many match in all.
pub async fn search(conn: &mut PgConn, search: &Search) -> Result<(Vec<Tenant>, i64), DbError> {
    let filtered = || {
        let mut query = tenants::table.into_boxed();
        if let Some(text) = search.text.as_deref().filter(|t| !t.is_empty()) {
            // LIKE's own wildcards in the text are taken literally.
            let escaped = text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            let pattern = format!("%{escaped}%");
            query = query.filter(tenants::slug.ilike(pattern.clone()).or(tenants::name.ilike(pattern)));
        }
        if let Some(status) = search.status {
            query = query.filter(tenants::status.eq(status.as_str()));
        }
        if let Some(plan) = &search.plan {
            query = query.filter(tenants::plan.eq(plan.clone()));
        }
        query
    };
    let total: i64 = filtered().count().get_result(conn).await?;
    let rows = filtered()
        .order((tenants::created_at.desc(), tenants::id.desc()))
        .offset(search.offset)
        .limit(search.limit)
        .select(TenantRow::as_select())
        .load(conn)
        .await?;
    Ok((rows.into_iter().map(Tenant::try_from).collect::<Result<_, _>>()?, total))
}

/// When each of `ids` was restricted for an unpaid bill (absent: not
/// restricted).
pub async fn restricted_since(
    conn: &mut PgConn,
    ids: &[TenantId],
) -> Result<std::collections::HashMap<TenantId, DateTime<Utc>>, DbError> {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|t| t.0).collect();
    let rows: Vec<(uuid::Uuid, Option<DateTime<Utc>>)> = tenants::table
        .filter(tenants::id.eq_any(ids))
        .filter(tenants::restricted_at.is_not_null())
        .select((tenants::id, tenants::restricted_at))
        .load(conn)
        .await?;
    Ok(rows.into_iter().filter_map(|(id, at)| Some((TenantId(id), at?))).collect())
}

/// Records a custom domain for a tenant. `verified` is the operator's word
/// that the domain points at Plinth; only verified domains route requests.
pub async fn add_domain(rows: &mut TenantRows<'_>, domain: &str, verified: bool) -> Result<(), DbError> {
    let now = Utc::now();
    let tenant = rows.tenant_id();
    diesel::insert_into(tenant_domains::table)
        .values((
            tenant_domains::domain.eq(domain.to_ascii_lowercase()),
            tenant_domains::tenant_id.eq(tenant.0),
            tenant_domains::verified_at.eq(verified.then_some(now)),
        ))
        .execute(rows.conn())
        .await?;
    Ok(())
}

/// Deletes a tenant in two committed steps: first it is marked `deleting`
/// (every instance stops serving it within a second), then its schema is
/// dropped and its registry rows removed. If the second step is interrupted,
/// running it again finishes the job.
#[tracing::instrument(skip_all, fields(tenant.id = %id))]
pub async fn delete(db: &Db, id: TenantId) -> Result<bool, CreateError> {
    let marked = db
        .platform(async |conn| {
            let moving: Option<Option<String>> =
                tenants::table.find(id.0).select(tenants::moving_to).for_update().first(conn).await.optional()?;
            if moving.is_some_and(|to| to.is_some()) {
                return Err(CreateError::Moving);
            }
            diesel::update(tenants::table.find(id.0))
                .set((tenants::status.eq(TenantStatus::Deleting.as_str()), tenants::updated_at.eq(Utc::now())))
                .returning(TenantRow::as_returning())
                .get_result(conn)
                .await
                .optional()
                .map_err(CreateError::from)
        })
        .await?;
    let Some(row) = marked else { return Ok(false) };
    let tenant = Tenant::try_from(row)?;
    let ddl = format!("SET LOCAL lock_timeout = '30s'; DROP SCHEMA IF EXISTS {} CASCADE", tenant.schema.quoted());
    if !tenant.shard.is_primary() {
        // Its schema and that server's ledger first; the row (and with it the
        // tenant) goes only once they are gone.
        db.on_shard(&tenant.shard, async |c| {
            crate::db::batch(c, &ddl).await?;
            migrate::forget(c, id).await?;
            Ok::<_, CreateError>(())
        })
        .await?;
    }
    db.platform(async |conn| {
        if tenant.shard.is_primary() {
            crate::db::batch(conn, &ddl).await?;
        }
        diesel::delete(tenants::table.find(id.0)).execute(conn).await?;
        Ok::<_, CreateError>(())
    })
    .await?;
    tracing::info!("tenant deleted");
    Ok(true)
}
