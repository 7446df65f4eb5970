//! Tenant API keys: `POST|GET /v1/api-keys`, `DELETE /v1/api-keys/{id}`
//! (admins). A key is shown once at creation; only a hash is stored. A key
//! acts in its one tenant with its role (admin, member or viewer), never
//! more than its creator's *current* role: removing the creator from the
//! tenant, or lowering their role below the key's, revokes the key (a
//! trigger on memberships, so every path keeps the rule). A key minted by
//! another key belongs to the same creator and is revoked with the key that
//! minted it. A revoked key stops working everywhere within a second.

use crate::error::IdentityError;
use crate::sessions;
use actix_web::{HttpResponse, delete, get, post, web};
use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Bytea, Nullable, Text, Uuid as SqlUuid};
use diesel::{ExpressionMethods as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _};
use diesel_async::AsyncPgConnection;
use diesel_async::RunQueryDsl;
use futures_util::future::BoxFuture;
use plinth_access::Quota;
use plinth_access::quota::Counter;
use plinth_tenants::{Db, TenantId};

use crate::schema::api_keys;
use actix_web::http::StatusCode;
use plinth_access::Role;
use plinth_access::{Allowed, Principal, TenantContext, requirements};
use plinth_http::idempotency::{self, IdempotencyKey};
use plinth_http::openapi::{IdempotencyKeyHeader, KeyReuse, NotFound, PlanLimits, TenantHeader, text};
use plinth_http::request::{Json, Validator};
use plinth_http::{ApiError, FieldError};
use plinth_tenants::TenantRows;
use plinth_tenants::audit::{self, Entry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Type};

requirements! {
    /// Creating, listing and revoking keys: admins, on plans with `api_keys`.
    ManageApiKeys = "api_keys", Manage, feature: "api_keys";
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list).service(create).service(revoke);
}

const NAME_MAX: usize = 100;

fn key_name() -> ObjectBuilder {
    text(1, NAME_MAX, false)
}

/// A key's role: never owner.
fn key_role() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["admin", "member", "viewer"]))
}

#[derive(Serialize, QueryableByName, Queryable, Selectable, ToSchema)]
#[diesel(table_name = api_keys)]
#[schema(as = ApiKey)]
struct KeyRow {
    id: uuid::Uuid,
    #[schema(schema_with = key_name)]
    name: String,
    #[schema(schema_with = key_role)]
    role: String,
    /// The key's first characters, to tell keys apart.
    prefix: String,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[schema(schema_with = key_name)]
    name: String,
    /// At most the creator's own role.
    #[schema(schema_with = key_role)]
    role: String,
}

#[derive(Serialize, ToSchema)]
struct CreatedKey {
    api_key: KeyRow,
    /// The key itself, shown this once: `Authorization: Bearer <key>`.
    key: String,
}

#[derive(Serialize, ToSchema)]
struct ApiKeys {
    /// The live keys, oldest first.
    data: Vec<KeyRow>,
}

#[utoipa::path(
    operation_id = "create_api_key",
    tag = "api keys",
    summary = "Creates an API key for this organization (admins, on plans with `api_keys`)",
    params(TenantHeader, IdempotencyKeyHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = NewKey,
    responses((status = 201, body = CreatedKey), PlanLimits, KeyReuse),
)]
#[post("/v1/api-keys")]
async fn create(
    ctx: Allowed<ManageApiKeys>,
    db: web::Data<Db>,
    body: Json<NewKey>,
    idempotency_key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let digest = body.digest();
    Validator::default().text("name", &body.0.name, 1, NAME_MAX, false).finish()?;
    let role = match Role::parse(&body.0.role) {
        Some(role) if role != Role::Owner => role,
        _ => {
            return Err(ApiError::invalid_fields(vec![FieldError::new(
                "role",
                "invalid",
                "must be admin, member or viewer",
            )]));
        }
    };
    if role > ctx.role {
        return Err(ApiError::Forbidden);
    }
    let keyed = idempotency_key.keyed(ctx.principal.idempotency_caller(), digest)?;
    let keyed = keyed.as_ref();
    // A replayed answer shows the same key again: it is stored sealed.
    idempotency::once(&db, keyed, async || {
        let (key, hash) = sessions::new_api_key().map_err(IdentityError::from)?;
        let prefix: String = key.chars().take(12).collect();
        let (creator, name) = (ctx.principal.user_id().map(|u| u.0), body.0.name.trim().to_owned());
        let minted_by = match &ctx.principal {
            Principal::ApiKey { key_id } => Some(*key_id),
            Principal::User { .. } | Principal::Scim { .. } => None,
        };
        let entry = ctx.audit_entry("api_key.created");
        let new = NewKeyRow { name, role, prefix, hash, creator, minted_by };
        let json = ctx
            .rows(async |rows| {
                idempotency::claim(rows.conn(), keyed).await?;
                let row = create_key(rows, &ctx, new, entry).await?;
                tracing::info!(api_key.id = %row.id, role = role.as_str(), "API key created");
                idempotency::record(rows.conn(), keyed, StatusCode::CREATED, &CreatedKey { api_key: row, key }).await
            })
            .await?;
        Ok(idempotency::answer(StatusCode::CREATED, json))
    })
    .await
}

/// A key to store: its name, role, the visible prefix and hash of its secret,
/// the user it acts for and the key that minted it (if any).
struct NewKeyRow {
    name: String,
    role: Role,
    prefix: String,
    hash: [u8; 32],
    creator: Option<uuid::Uuid>,
    minted_by: Option<uuid::Uuid>,
}

/// Stores a new key for the tenant within its quota, and records it.
async fn create_key(
    rows: &mut TenantRows<'_>,
    ctx: &TenantContext,
    new: NewKeyRow,
    entry: Entry,
) -> Result<KeyRow, IdentityError> {
    let NewKeyRow { name, role, prefix, hash, creator, minted_by } = new;
    if let Some(parent) = minted_by {
        // Locks the minting key, so revoking it waits for this key to
        // exist and then revokes it too.
        let tenant = rows.tenant_id().0;
        let live: Vec<uuid::Uuid> = api_keys::table
            .filter(api_keys::id.eq(parent))
            .filter(api_keys::tenant_id.eq(tenant))
            .filter(api_keys::revoked_at.is_null())
            .select(api_keys::id)
            .for_update()
            .load(rows.conn())
            .await?;
        if live.is_empty() {
            return Err(IdentityError::Unauthenticated);
        }
    }
    ctx.reserve(rows.conn(), Quota::ApiKeys).await?;
    // Raw SQL: the creator of a key minted by a key is read in the same
    // statement (a subquery in VALUES).
    let row: KeyRow = diesel::sql_query(
        "INSERT INTO public.api_keys (id, tenant_id, name, role, prefix, token_hash, created_by, created_by_key) \
         VALUES ($1, $2, $3, $4, $5, $6, \
                 coalesce($7, (SELECT created_by FROM public.api_keys WHERE id = $8)), $8) \
         RETURNING id, name, role, prefix, created_at, last_used_at",
    )
    .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
    .bind::<SqlUuid, _>(rows.tenant_id().0)
    .bind::<Text, _>(&name)
    .bind::<Text, _>(role.as_str())
    .bind::<Text, _>(&prefix)
    .bind::<Bytea, _>(&hash[..])
    .bind::<Nullable<SqlUuid>, _>(creator)
    .bind::<Nullable<SqlUuid>, _>(minted_by)
    .get_result(rows.conn())
    .await?;
    let details = json!({ "name": row.name, "role": row.role, "prefix": row.prefix });
    audit::record(rows, entry.target("api_key", row.id).details(details)).await?;
    Ok(row)
}

#[utoipa::path(
    operation_id = "list_api_keys",
    tag = "api keys",
    summary = "The organization's live API keys (admins, on plans with `api_keys`)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = ApiKeys), PlanLimits),
)]
#[get("/v1/api-keys")]
async fn list(ctx: Allowed<ManageApiKeys>) -> Result<HttpResponse, ApiError> {
    let keys = ctx.rows(async |rows| Ok::<_, ApiError>(live_keys(rows).await?)).await?;
    Ok(HttpResponse::Ok().json(ApiKeys { data: keys }))
}

/// The tenant's live (unrevoked) API keys, oldest first.
async fn live_keys(rows: &mut TenantRows<'_>) -> diesel::QueryResult<Vec<KeyRow>> {
    let tenant = rows.tenant_id().0;
    api_keys::table
        .filter(api_keys::tenant_id.eq(tenant))
        .filter(api_keys::revoked_at.is_null())
        .order(api_keys::created_at.asc())
        .select(KeyRow::as_select())
        .load(rows.conn())
        .await
}

/// Revokes the tenant's key `id`; false if the tenant has no such live key.
async fn revoke_key(rows: &mut TenantRows<'_>, id: uuid::Uuid) -> diesel::QueryResult<bool> {
    let tenant = rows.tenant_id().0;
    let revoked = diesel::update(
        api_keys::table
            .filter(api_keys::id.eq(id))
            .filter(api_keys::tenant_id.eq(tenant))
            .filter(api_keys::revoked_at.is_null()),
    )
    .set(api_keys::revoked_at.eq(diesel::dsl::now))
    .execute(rows.conn())
    .await?;
    Ok(revoked == 1)
}

#[utoipa::path(
    operation_id = "revoke_api_key",
    tag = "api keys",
    summary = "Revokes an API key; it stops working everywhere within a second",
    params(TenantHeader, ("id" = uuid::Uuid, Path, description = "The key.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 204, description = "Revoked."), NotFound, PlanLimits),
)]
#[delete("/v1/api-keys/{id}")]
async fn revoke(ctx: Allowed<ManageApiKeys>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::parse_str(&path).map_err(|_| ApiError::NotFound("API key"))?;
    let entry = ctx.audit_entry("api_key.revoked").target("api_key", id);
    ctx.rows(async |rows| {
        if !revoke_key(rows, id).await? {
            return Err(ApiError::NotFound("API key"));
        }
        audit::record(rows, entry).await?;
        Ok(())
    })
    .await?;
    tracing::info!(api_key.id = %id, "API key revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// Counts the API keys quota: the tenant's live keys.
pub struct LiveKeys;

impl Counter for LiveKeys {
    fn count<'a>(&'a self, conn: &'a AsyncPgConnection, tenant: TenantId) -> BoxFuture<'a, diesel::QueryResult<i64>> {
        Box::pin(async move {
            let mut conn = conn;
            api_keys::table
                .filter(api_keys::tenant_id.eq(tenant.0))
                .filter(api_keys::revoked_at.is_null())
                .count()
                .get_result(&mut conn)
                .await
        })
    }
}
