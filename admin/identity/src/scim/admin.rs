//! A tenant admin's side of SCIM (admins, on plans with `sso`):
//!
//! - `POST /v1/scim/tokens` makes the token the directory uses, shown once
//!   (only a hash is kept); `GET /v1/scim/tokens` lists the live ones and
//!   `DELETE /v1/scim/tokens/{id}` revokes one, refused from its next
//!   request on.
//! - `GET /v1/scim/groups` lists the groups the directory made and
//!   `PATCH /v1/scim/groups/{id}` maps one to a role (or to none): the
//!   roles of its provisioned members follow at once.

use actix_web::{HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods as _, QueryDsl as _, Queryable};
use diesel_async::RunQueryDsl;
use plinth_access::{Allowed, Role, requirements};
use plinth_http::openapi::{NotFound, PlanLimits, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_tenants::{TenantRows, audit};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Type};

use crate::error::IdentityError;
use crate::schema::{scim_group_members, scim_groups, scim_tokens};
use crate::sessions;

requirements! {
    /// SCIM tokens and the roles of directory groups: admins, on plans with `sso`.
    pub ManageScim = "scim", Manage, feature: "sso";
}

pub(super) fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(create_token).service(list_tokens).service(revoke_token).service(list_groups).service(map_group);
}

#[derive(Serialize, Queryable, ToSchema)]
#[schema(as = ScimToken)]
struct TokenRow {
    id: uuid::Uuid,
    /// The token's first characters, to tell tokens apart.
    prefix: String,
    created_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = CreatedScimToken)]
struct CreatedToken {
    scim_token: TokenRow,
    /// The token itself, shown this once: the directory sends
    /// `Authorization: Bearer <token>` to `/scim/v2/`.
    token: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = ScimTokens)]
struct Tokens {
    /// The live tokens, oldest first.
    data: Vec<TokenRow>,
}

#[utoipa::path(
    operation_id = "create_scim_token",
    tag = "scim",
    summary = "Creates a SCIM token for this organization's directory, shown once (admins, on plans with `sso`)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 201, body = CreatedToken), PlanLimits),
)]
#[post("/v1/scim/tokens")]
async fn create_token(ctx: Allowed<ManageScim>) -> Result<HttpResponse, ApiError> {
    let (token, hash) = sessions::new_scim_token().map_err(IdentityError::from)?;
    let prefix: String = token.chars().take(12).collect();
    let creator = ctx.principal.user_id().map(|u| u.0);
    let entry = ctx.audit_entry("scim.token_created");
    let row = ctx
        .rows(async |rows| {
            let row: TokenRow = diesel::insert_into(scim_tokens::table)
                .values((
                    scim_tokens::id.eq(uuid::Uuid::now_v7()),
                    scim_tokens::tenant_id.eq(rows.tenant_id().0),
                    scim_tokens::prefix.eq(&prefix),
                    scim_tokens::token_hash.eq(&hash[..]),
                    scim_tokens::created_by.eq(creator),
                ))
                .returning((scim_tokens::id, scim_tokens::prefix, scim_tokens::created_at))
                .get_result(rows.conn())
                .await?;
            let entry = entry.target("scim_token", row.id).details(json!({ "prefix": row.prefix }));
            audit::record(rows, entry).await?;
            Ok::<_, ApiError>(row)
        })
        .await?;
    tracing::info!(scim_token.id = %row.id, "SCIM token created");
    Ok(HttpResponse::Created().json(CreatedToken { scim_token: row, token }))
}

#[utoipa::path(
    operation_id = "list_scim_tokens",
    tag = "scim",
    summary = "The organization's live SCIM tokens (admins, on plans with `sso`)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Tokens), PlanLimits),
)]
#[get("/v1/scim/tokens")]
async fn list_tokens(ctx: Allowed<ManageScim>) -> Result<HttpResponse, ApiError> {
    let data = ctx
        .rows(async |rows| {
            let tenant = rows.tenant_id().0;
            scim_tokens::table
                .filter(scim_tokens::tenant_id.eq(tenant))
                .filter(scim_tokens::revoked_at.is_null())
                .order(scim_tokens::created_at.asc())
                .select((scim_tokens::id, scim_tokens::prefix, scim_tokens::created_at))
                .load::<TokenRow>(rows.conn())
                .await
                .map_err(ApiError::from)
        })
        .await?;
    Ok(HttpResponse::Ok().json(Tokens { data }))
}

#[utoipa::path(
    operation_id = "revoke_scim_token",
    tag = "scim",
    summary = "Revokes a SCIM token; the directory's next request with it is refused",
    params(TenantHeader, ("id" = uuid::Uuid, Path, description = "The token.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 204, description = "Revoked."), NotFound, PlanLimits),
)]
#[delete("/v1/scim/tokens/{id}")]
async fn revoke_token(ctx: Allowed<ManageScim>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::parse_str(&path).map_err(|_| ApiError::NotFound("SCIM token"))?;
    let entry = ctx.audit_entry("scim.token_revoked").target("scim_token", id);
    ctx.rows(async |rows| {
        let tenant = rows.tenant_id().0;
        let revoked = diesel::update(
            scim_tokens::table
                .filter(scim_tokens::id.eq(id))
                .filter(scim_tokens::tenant_id.eq(tenant))
                .filter(scim_tokens::revoked_at.is_null()),
        )
        .set(scim_tokens::revoked_at.eq(diesel::dsl::now))
        .execute(rows.conn())
        .await?;
        if revoked == 0 {
            return Err(ApiError::NotFound("SCIM token"));
        }
        audit::record(rows, entry).await?;
        Ok(())
    })
    .await?;
    tracing::info!(scim_token.id = %id, "SCIM token revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// A group's role: admin, member, viewer, or none.
fn group_role() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some([Some("admin"), Some("member"), Some("viewer"), None]))
}

#[derive(Serialize, ToSchema)]
#[schema(as = DirectoryGroup)]
struct GroupView {
    id: uuid::Uuid,
    display_name: String,
    /// The role it gives its members; none: it gives none.
    #[schema(schema_with = group_role)]
    role: Option<String>,
    /// How many of the directory's users are in it.
    members: i64,
}

#[derive(Serialize, ToSchema)]
#[schema(as = DirectoryGroups)]
struct Groups {
    /// By name.
    data: Vec<GroupView>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DirectoryGroupRole)]
struct RoleBody {
    /// `admin`, `member`, `viewer`, or null for none (never `owner`).
    #[schema(schema_with = group_role)]
    role: Option<String>,
}

/// The organization's groups with their roles and sizes, `only` one if given.
async fn groups(rows: &mut TenantRows<'_>, only: Option<uuid::Uuid>) -> diesel::QueryResult<Vec<GroupView>> {
    let tenant = rows.tenant_id().0;
    let mut query = scim_groups::table.filter(scim_groups::tenant_id.eq(tenant)).into_boxed();
    if let Some(id) = only {
        query = query.filter(scim_groups::id.eq(id));
    }
    let found: Vec<(uuid::Uuid, String, Option<String>)> = query
        .order(scim_groups::display_name.asc())
        .select((scim_groups::id, scim_groups::display_name, scim_groups::role))
        .load(rows.conn())
        .await?;
    let ids: Vec<uuid::Uuid> = found.iter().map(|g| g.0).collect();
    let sizes: Vec<(uuid::Uuid, i64)> = scim_group_members::table
        .filter(scim_group_members::group_id.eq_any(&ids))
        .group_by(scim_group_members::group_id)
        .select((scim_group_members::group_id, diesel::dsl::count_star()))
        .load(rows.conn())
        .await?;
    Ok(found
        .into_iter()
        .map(|(id, display_name, role)| {
            let members = sizes.iter().find(|(g, _)| *g == id).map_or(0, |(_, n)| *n);
            GroupView { id, display_name, role, members }
        })
        .collect())
}

#[utoipa::path(
    operation_id = "list_directory_groups",
    tag = "scim",
    summary = "The groups the organization's directory made, with the role each gives (admins, on plans with `sso`)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Groups), PlanLimits),
)]
#[get("/v1/scim/groups")]
async fn list_groups(ctx: Allowed<ManageScim>) -> Result<HttpResponse, ApiError> {
    let data = ctx.rows(async |rows| Ok::<_, ApiError>(groups(rows, None).await?)).await?;
    Ok(HttpResponse::Ok().json(Groups { data }))
}

#[utoipa::path(
    operation_id = "map_directory_group",
    tag = "scim",
    summary = "Sets the role a directory group gives its members, or none; their roles follow at once",
    params(TenantHeader, ("id" = uuid::Uuid, Path, description = "The group.")),
    security(("session" = []), ("api_key" = [])),
    request_body = RoleBody,
    responses((status = 200, body = GroupView), NotFound, PlanLimits),
)]
#[patch("/v1/scim/groups/{id}")]
async fn map_group(
    ctx: Allowed<ManageScim>,
    path: web::Path<String>,
    body: Json<RoleBody>,
) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::parse_str(&path).map_err(|_| ApiError::NotFound("group"))?;
    let role = match body.0.role.as_deref().map(Role::parse) {
        None => None,
        Some(Some(role)) if role != Role::Owner => Some(role),
        Some(_) => {
            return Err(ApiError::invalid_fields(vec![FieldError::new(
                "role",
                "invalid",
                "must be admin, member, viewer or null",
            )]));
        }
    };
    // An admin maps a group to no more than their own role.
    if role.is_some_and(|r| r > ctx.role) {
        return Err(ApiError::Forbidden);
    }
    let entry = ctx.audit_entry("scim.group_mapped").target("scim_group", id).details(json!({ "role": role }));
    let view = ctx
        .rows(async |rows| {
            let tenant = rows.tenant_id().0;
            let changed = diesel::update(
                scim_groups::table.filter(scim_groups::id.eq(id)).filter(scim_groups::tenant_id.eq(tenant)),
            )
            .set((scim_groups::role.eq(role.map(Role::as_str)), scim_groups::updated_at.eq(diesel::dsl::now)))
            .execute(rows.conn())
            .await?;
            if changed == 0 {
                return Err(ApiError::NotFound("group"));
            }
            audit::record(rows, entry).await?;
            let members: Vec<uuid::Uuid> = scim_group_members::table
                .filter(scim_group_members::group_id.eq(id))
                .select(scim_group_members::user_id)
                .load(rows.conn())
                .await?;
            super::members::sync_roles(rows, &ctx, &members).await.map_err(|e| match e {
                super::ScimError::Api(api) => api,
                other => ApiError::Conflict(other.to_string()),
            })?;
            groups(rows, Some(id)).await?.pop().ok_or(ApiError::NotFound("group"))
        })
        .await?;
    Ok(HttpResponse::Ok().json(view))
}

/// What organizations' directories hold about `user` (their personal
/// export): each organization's record of them and the groups they are in.
pub async fn records_of(
    conn: &mut diesel_async::AsyncPgConnection,
    user: plinth_tenants::UserId,
) -> diesel::QueryResult<Vec<serde_json::Value>> {
    use crate::schema::scim_users;
    type Record = (uuid::Uuid, Option<String>, Option<String>, Option<String>, Option<String>, bool, DateTime<Utc>);
    let records: Vec<Record> = scim_users::table
        .filter(scim_users::user_id.eq(user.0))
        .order(scim_users::created_at.asc())
        .select((
            scim_users::tenant_id,
            scim_users::external_id,
            scim_users::given_name,
            scim_users::family_name,
            scim_users::display_name,
            scim_users::active,
            scim_users::created_at,
        ))
        .load(conn)
        .await?;
    let groups: Vec<(uuid::Uuid, String)> = scim_group_members::table
        .inner_join(scim_groups::table)
        .filter(scim_group_members::user_id.eq(user.0))
        .select((scim_group_members::tenant_id, scim_groups::display_name))
        .load(conn)
        .await?;
    Ok(records
        .into_iter()
        .map(|(tenant, external_id, given_name, family_name, display_name, active, created_at)| {
            let groups: Vec<&str> = groups.iter().filter(|(t, _)| *t == tenant).map(|(_, g)| g.as_str()).collect();
            json!({
                "tenant_id": tenant,
                "external_id": external_id,
                "given_name": given_name,
                "family_name": family_name,
                "display_name": display_name,
                "active": active,
                "created_at": created_at,
                "groups": groups,
            })
        })
        .collect())
}
