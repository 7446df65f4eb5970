//! Tenant administration: members and roles (invitations are in
//! [`crate::invitations`]).
//!
//! Admins and owners list members, change roles and remove members;
//! only owners grant the owner role or touch an owner; the last owner can be
//! neither demoted nor removed (409). Membership changes reach every
//! instance's cache within a second (NOTIFY from a trigger), so a removed
//! member's session stops opening the tenant at once.

use actix_web::{HttpResponse, delete, get, patch, web};
use chrono::{DateTime, Utc};
use diesel::{BoolExpressionMethods as _, ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::BoxFuture;
use plinth_access::Role;
use plinth_access::quota::Counter;

use crate::schema::{invitations, memberships, users};
use plinth_access::{Allowed, TenantContext, requirements};
use plinth_http::openapi::{ErrorEnvelope, NotFound, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_tenants::audit;
use plinth_tenants::{TenantId, TenantRows, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

requirements! {
    /// Listing members, changing roles, inviting, removing someone else.
    pub ManageMembers = "members", Manage, feature: none;
    /// Leaving: any member may remove themselves.
    Leave = "members", Read, feature: none;
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list).service(change_role).service(remove).service(end_sessions);
}

/// Told, inside the transaction that makes the change, that a tenant's
/// members changed (someone joined or was removed). The app registers one
/// as `web::Data<dyn MembersChanged>`: billing's queues the update of a
/// per-seat subscription's quantity, so identity knows nothing of Stripe.
pub trait MembersChanged: Send + Sync {
    fn changed<'a>(&'a self, conn: &'a AsyncPgConnection, tenant: TenantId) -> BoxFuture<'a, diesel::QueryResult<()>>;
}

/// An owner of a tenant, for mail about the organization.
#[derive(Debug, Clone, Queryable)]
pub struct Owner {
    pub user_id: uuid::Uuid,
    pub email: String,
}

/// The owners of `tenant`.
pub async fn owners(conn: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<Vec<Owner>> {
    memberships::table
        .inner_join(users::table)
        .filter(memberships::tenant_id.eq(tenant.0))
        .filter(memberships::role.eq(Role::Owner.as_str()))
        .select((users::id, users::email))
        .load(conn)
        .await
}

/// `user`'s memberships: tenant and role.
pub async fn of_user(conn: &mut AsyncPgConnection, user: UserId) -> diesel::QueryResult<Vec<(TenantId, String)>> {
    let rows: Vec<(uuid::Uuid, String)> = memberships::table
        .filter(memberships::user_id.eq(user.0))
        .select((memberships::tenant_id, memberships::role))
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|(t, r)| (TenantId(t), r)).collect())
}

/// How many members each of `tenants` has (tenants without any are absent).
pub async fn counts(
    conn: &mut AsyncPgConnection,
    tenants: &[TenantId],
) -> diesel::QueryResult<std::collections::HashMap<TenantId, i64>> {
    let ids: Vec<uuid::Uuid> = tenants.iter().map(|t| t.0).collect();
    let rows: Vec<(uuid::Uuid, i64)> = memberships::table
        .filter(memberships::tenant_id.eq_any(ids))
        .group_by(memberships::tenant_id)
        .select((memberships::tenant_id, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|(t, n)| (TenantId(t), n)).collect())
}

pub(crate) fn caller(ctx: &TenantContext) -> Option<UserId> {
    ctx.principal.user_id()
}

pub(crate) fn parse_role(field: &str, role: &str) -> Result<Role, ApiError> {
    Role::parse(role).ok_or_else(|| {
        ApiError::invalid_fields(vec![FieldError::new(field, "invalid", "must be owner, admin, member or viewer")])
    })
}

#[derive(Serialize, Queryable, ToSchema)]
#[schema(as = Member)]
pub struct MemberRow {
    pub user_id: uuid::Uuid,
    #[schema(schema_with = crate::openapi::email)]
    pub email: String,
    #[schema(value_type = Role)]
    pub role: String,
    pub joined_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
struct Members {
    /// Every member, in the order they joined.
    data: Vec<MemberRow>,
}

/// `GET /v1/members` (admins).
#[utoipa::path(
    operation_id = "list_members",
    tag = "members",
    summary = "The organization's members (admins and owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Members)),
)]
#[get("/v1/members")]
async fn list(ctx: Allowed<ManageMembers>) -> Result<HttpResponse, ApiError> {
    let members = ctx.rows(async |rows| Ok::<_, ApiError>(members_of(rows).await?)).await?;
    Ok(HttpResponse::Ok().json(Members { data: members }))
}

/// The tenant's members, in the order they joined.
pub async fn members_of(rows: &mut TenantRows<'_>) -> diesel::QueryResult<Vec<MemberRow>> {
    let tenant = rows.tenant_id().0;
    memberships::table
        .inner_join(users::table)
        .filter(memberships::tenant_id.eq(tenant))
        .order((memberships::created_at.asc(), users::email.asc()))
        .select((users::id, users::email, memberships::role, memberships::created_at))
        .load(rows.conn())
        .await
}

/// The tenant's memberships that matter for the owner rules, locked for the
/// rest of the transaction: the target's, and every owner's.
pub(crate) async fn lock_owners_and(
    rows: &mut TenantRows<'_>,
    target: uuid::Uuid,
) -> diesel::QueryResult<(Option<Role>, usize)> {
    let tenant = rows.tenant_id().0;
    let found: Vec<(uuid::Uuid, String)> = memberships::table
        .filter(memberships::tenant_id.eq(tenant))
        .filter(memberships::role.eq(Role::Owner.as_str()).or(memberships::user_id.eq(target)))
        .order(memberships::user_id.asc())
        .select((memberships::user_id, memberships::role))
        .for_update()
        .load(rows.conn())
        .await?;
    let target_role = found.iter().find(|(user, _)| *user == target).and_then(|(_, role)| Role::parse(role));
    let owners = found.iter().filter(|(_, role)| role == Role::Owner.as_str()).count();
    Ok((target_role, owners))
}

fn target(path: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(path).map_err(|_| ApiError::NotFound("member"))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    #[schema(value_type = Role)]
    role: String,
}

#[derive(Serialize, ToSchema)]
struct MemberRole {
    user_id: uuid::Uuid,
    role: Role,
}

/// `PATCH /v1/members/{user_id}` {role}.
#[utoipa::path(
    operation_id = "change_member_role",
    tag = "members",
    summary = "Changes a member's role (admins; only owners grant or take the owner role)",
    params(TenantHeader, ("user_id" = uuid::Uuid, Path, description = "The member.")),
    security(("session" = []), ("api_key" = [])),
    request_body = RoleBody,
    responses(
        (status = 200, body = MemberRole),
        NotFound,
        (status = 409, description = "Error: conflict (the last owner cannot be demoted).", body = ErrorEnvelope),
    ),
)]
#[patch("/v1/members/{user_id}")]
async fn change_role(
    ctx: Allowed<ManageMembers>,
    path: web::Path<String>,
    body: Json<RoleBody>,
) -> Result<HttpResponse, ApiError> {
    let user = target(&path)?;
    let new_role = parse_role("role", &body.0.role)?;
    let caller_role = ctx.role;
    let entry = ctx.audit_entry("member.role_changed").target("user", user);
    ctx.rows(async |rows| {
        let tenant = rows.tenant_id().0;
        let (current, owners) = lock_owners_and(rows, user).await?;
        let current = current.ok_or(ApiError::NotFound("member"))?;
        if (new_role == Role::Owner || current == Role::Owner) && caller_role != Role::Owner {
            return Err(ApiError::Forbidden);
        }
        if current == Role::Owner && new_role != Role::Owner && owners <= 1 {
            return Err(ApiError::Conflict("the last owner cannot be demoted; make someone else owner first".into()));
        }
        diesel::update(memberships::table.find((tenant, user)))
            .set(memberships::role.eq(new_role.as_str()))
            .execute(rows.conn())
            .await?;
        audit::record(rows, entry.details(json!({ "from": current, "to": new_role }))).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(member.id = %user, role = new_role.as_str(), "member role changed");
    Ok(HttpResponse::Ok().json(MemberRole { user_id: user, role: new_role }))
}

/// `DELETE /v1/members/{user_id}`: the member loses access at once.
#[utoipa::path(
    operation_id = "remove_member",
    tag = "members",
    summary = "Removes a member, who loses access at once (admins; anyone may remove themselves)",
    params(TenantHeader, ("user_id" = uuid::Uuid, Path, description = "The member.")),
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 204, description = "Removed."),
        NotFound,
        (status = 409, description = "Error: conflict (the last owner cannot be removed).", body = ErrorEnvelope),
    ),
)]
#[delete("/v1/members/{user_id}")]
async fn remove(
    ctx: Allowed<Leave>,
    path: web::Path<String>,
    changed: web::Data<dyn MembersChanged>,
) -> Result<HttpResponse, ApiError> {
    let user = target(&path)?;
    // Anyone may leave; removing someone else takes an admin.
    if caller(&ctx).map(|u| u.0) != Some(user) {
        ctx.require::<ManageMembers>().await?;
    }
    let caller_role = ctx.role;
    let action = if caller(&ctx).map(|u| u.0) == Some(user) { "member.left" } else { "member.removed" };
    let entry = ctx.audit_entry(action).target("user", user);
    ctx.rows(async |rows| {
        let tenant = rows.tenant_id().0;
        let (current, owners) = lock_owners_and(rows, user).await?;
        let current = current.ok_or(ApiError::NotFound("member"))?;
        if current == Role::Owner && caller_role != Role::Owner {
            return Err(ApiError::Forbidden);
        }
        if current == Role::Owner && owners <= 1 {
            return Err(ApiError::Conflict("the last owner cannot be removed".into()));
        }
        diesel::delete(memberships::table.find((tenant, user))).execute(rows.conn()).await?;
        changed.changed(rows.conn(), TenantId(tenant)).await?;
        audit::record(rows, entry.details(json!({ "role": current }))).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(member.id = %user, "member removed");
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Serialize, ToSchema)]
struct MemberSessionsEnded {
    /// How many of the member's sessions no longer open this organization.
    ended: usize,
}

/// `DELETE /v1/members/{user_id}/sessions`: every live session of the
/// member stops opening this organization, on every instance within a
/// second (the member signs in again to come back). Their sessions go on
/// working in their other organizations: an admin acts in their own only.
/// (An operator's impersonation session is the operator's: it ends with
/// the tenant's owners forbidding impersonation, not here.)
#[utoipa::path(
    operation_id = "end_member_sessions",
    tag = "members",
    summary = "Ends a member's sessions in this organization (admins; only owners end an owner's)",
    params(TenantHeader, ("user_id" = uuid::Uuid, Path, description = "The member.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = MemberSessionsEnded), NotFound),
)]
#[delete("/v1/members/{user_id}/sessions")]
async fn end_sessions(ctx: Allowed<ManageMembers>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let user = target(&path)?;
    let caller_role = ctx.role;
    let entry = ctx.audit_entry("member.sessions_ended").target("user", user);
    let ended = ctx
        .rows(async |rows| {
            let tenant = rows.tenant_id().0;
            let current: Option<String> = memberships::table
                .find((tenant, user))
                .select(memberships::role)
                .first(rows.conn())
                .await
                .optional()?;
            let current = current.as_deref().and_then(Role::parse).ok_or(ApiError::NotFound("member"))?;
            if current == Role::Owner && caller_role != Role::Owner {
                return Err(ApiError::Forbidden);
            }
            let ended = end_sessions_in(rows, user).await?;
            audit::record(rows, entry.details(json!({ "sessions": ended }))).await?;
            Ok::<_, ApiError>(ended)
        })
        .await?;
    tracing::info!(member.id = %user, sessions.ended = ended, "member's sessions ended in the tenant");
    Ok(HttpResponse::Ok().json(MemberSessionsEnded { ended }))
}

/// Ends every live session of `user` in the tenant `rows` is bound to
/// (not an operator's impersonation session): each is refused there, on
/// every instance within a second. How many were live.
pub(crate) async fn end_sessions_in(rows: &mut TenantRows<'_>, user: uuid::Uuid) -> diesel::QueryResult<usize> {
    let tenant = rows.tenant_id().0;
    // Raw SQL: an INSERT from a SELECT, which diesel's builder writes only
    // with a typed select of every column.
    diesel::sql_query(
        "INSERT INTO public.session_tenant_ends (session_id, tenant_id) \
         SELECT id, $2 FROM public.sessions \
         WHERE user_id = $1 AND impersonator_id IS NULL AND revoked_at IS NULL AND expires_at > now() \
         ON CONFLICT DO NOTHING",
    )
    .bind::<diesel::sql_types::Uuid, _>(user)
    .bind::<diesel::sql_types::Uuid, _>(tenant)
    .execute(rows.conn())
    .await
}

/// Counts the members quota: members and pending invitations (an
/// invitation holds a seat until it is accepted or expires).
pub struct MemberSeats;

impl Counter for MemberSeats {
    fn count<'a>(&'a self, conn: &'a AsyncPgConnection, tenant: TenantId) -> BoxFuture<'a, diesel::QueryResult<i64>> {
        Box::pin(async move {
            let (mut members, mut pending) = (conn, conn);
            // Both counts are sent before either answer arrives (pipelined).
            let (joined, invited) = futures_util::try_join!(
                memberships::table.filter(memberships::tenant_id.eq(tenant.0)).count().get_result::<i64>(&mut members),
                invitations::table
                    .filter(invitations::tenant_id.eq(tenant.0))
                    .filter(invitations::accepted_at.is_null())
                    .filter(invitations::expires_at.gt(diesel::dsl::now))
                    .count()
                    .get_result::<i64>(&mut pending),
            )?;
            Ok(joined + invited)
        })
    }
}

/// Counts members who joined, without pending invitations: what accepting
/// an invitation is checked against (the invitation already holds a seat).
pub struct JoinedMembers;

impl Counter for JoinedMembers {
    fn count<'a>(&'a self, conn: &'a AsyncPgConnection, tenant: TenantId) -> BoxFuture<'a, diesel::QueryResult<i64>> {
        Box::pin(async move {
            let mut conn = conn;
            memberships::table.filter(memberships::tenant_id.eq(tenant.0)).count().get_result(&mut conn).await
        })
    }
}

/// The tenant's memberships, identity settings, API keys (their hashes),
/// invitations, email domains, single sign-on connection (its secret
/// sealed) and SCIM directory (tokens' hashes, users, groups), for its
/// archive (`plinth_tenants::backup`).
pub async fn archive(conn: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<serde_json::Value> {
    use plinth_tenants::backup::rows_of;
    let mut part = json!({
        "memberships": rows_of(conn, "memberships", tenant).await?,
        "settings": rows_of(conn, "tenant_identity_settings", tenant).await?,
        "api_keys": rows_of(conn, "api_keys", tenant).await?,
        "invitations": rows_of(conn, "invitations", tenant).await?,
    });
    for table in OWN_ONLY {
        part[table] = serde_json::Value::Array(rows_of(conn, table, tenant).await?);
    }
    Ok(part)
}

/// Tables that come back only with the tenant restored as itself, in the
/// order their foreign keys need: a copy must not hold the original's
/// verified domains (one organization per domain), its connection's secret
/// (sealed to the original's id) or its directory (SCIM tokens are
/// secrets; group ids are the original's).
const OWN_ONLY: [&str; 6] =
    ["tenant_email_domains", "sso_connections", "scim_tokens", "scim_users", "scim_groups", "scim_group_members"];

/// What restoring an archive's identity part did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoredMembers {
    pub restored: usize,
    /// Members whose account no longer exists.
    pub skipped: usize,
    pub api_keys: usize,
    pub invitations: usize,
    /// Email domains, the single sign-on connection and the SCIM
    /// directory's rows (tokens, users, groups, group members).
    pub domains_and_directory: usize,
}

/// Restores an archive's memberships (of accounts that still exist; the
/// others are counted as skipped) and identity settings for `tenant`, in the
/// caller's transaction. Restored as itself (`copy` false), its API keys
/// and invitations come back too, with their secrets' hashes: the same
/// keys and invitation links work again. A copy gets neither: one secret
/// must not open two tenants. A key or invitation whose creator's account
/// is gone comes back without its creator.
pub async fn restore_archive(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    part: &serde_json::Value,
    copy: bool,
) -> diesel::QueryResult<RestoredMembers> {
    use plinth_tenants::backup::restore_rows;
    let rows_at = |key: &str| part.get(key).and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    let memberships = rows_at("memberships");
    let restored = restore_rows(
        conn,
        "memberships",
        &memberships,
        tenant,
        Some("EXISTS (SELECT 1 FROM public.users u WHERE u.id = r.user_id)"),
    )
    .await?;
    restore_rows(conn, "tenant_identity_settings", &rows_at("settings"), tenant, None).await?;
    let (mut api_keys, mut invitations, mut domains_and_directory) = (0, 0, 0);
    if !copy {
        let keys = without_missing_users(conn, rows_at("api_keys"), "created_by").await?;
        api_keys = restore_rows(conn, "api_keys", &keys, tenant, None).await?;
        let invited = without_missing_users(conn, rows_at("invitations"), "invited_by").await?;
        invitations = restore_rows(conn, "invitations", &invited, tenant, None).await?;
        for table in OWN_ONLY {
            let mut rows = rows_at(table);
            if table == "scim_tokens" {
                rows = without_missing_users(conn, rows, "created_by").await?;
            }
            // A domain another organization verified meanwhile stays
            // theirs. Directory users whose account is gone stay gone, and
            // so do their group memberships.
            let condition = match table {
                "tenant_email_domains" => Some(
                    "r.verified_at IS NULL OR NOT EXISTS \
                     (SELECT 1 FROM public.tenant_email_domains d WHERE d.domain = r.domain AND d.verified_at IS NOT NULL)",
                ),
                "scim_users" => Some("EXISTS (SELECT 1 FROM public.users u WHERE u.id = r.user_id)"),
                "scim_group_members" => Some(
                    "EXISTS (SELECT 1 FROM public.scim_users s WHERE s.tenant_id = r.tenant_id AND s.user_id = r.user_id)",
                ),
                _ => None,
            };
            domains_and_directory += restore_rows(conn, table, &rows, tenant, condition).await?;
        }
    }
    Ok(RestoredMembers {
        restored,
        skipped: memberships.len().saturating_sub(restored),
        api_keys,
        invitations,
        domains_and_directory,
    })
}

/// `rows` with `column` (a user id) emptied where that account no longer
/// exists, as its foreign key (`ON DELETE SET NULL`) would have done.
async fn without_missing_users(
    conn: &mut AsyncPgConnection,
    mut rows: Vec<serde_json::Value>,
    column: &str,
) -> diesel::QueryResult<Vec<serde_json::Value>> {
    let named: Vec<uuid::Uuid> = rows.iter().filter_map(|r| r.get(column)?.as_str()?.parse().ok()).collect();
    let existing: std::collections::HashSet<uuid::Uuid> =
        users::table.filter(users::id.eq_any(&named)).select(users::id).load(conn).await?.into_iter().collect();
    for row in &mut rows {
        let known = row.get(column).and_then(|v| v.as_str()?.parse().ok()).is_some_and(|id| existing.contains(&id));
        if let Some(object) = row.as_object_mut().filter(|_| !known) {
            object.insert(column.to_owned(), serde_json::Value::Null);
        }
    }
    Ok(rows)
}
