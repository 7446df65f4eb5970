//! What the directory's changes do to memberships, in the transaction of
//! the change:
//!
//! - an active directory user is a member, with the highest role of the
//!   groups they are in that a tenant admin mapped to a role, and `member`
//!   when none is;
//! - deactivating or deleting them ends their membership and their
//!   sessions in the organization (every instance refuses them within a
//!   second: the membership trigger and `session_tenant_ends` both NOTIFY);
//! - the directory never grants the owner role, never changes an owner's
//!   role, and cannot remove the last owner (409).
//!
//! Every change is in the organization's audit log, and per-seat billing
//! is told when someone joins or leaves.

use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::RunQueryDsl;
use plinth_access::{Quota, Role, TenantContext};
use plinth_tenants::audit;
use plinth_tenants::{TenantId, TenantRows};
use serde_json::json;

use super::ScimError;
use crate::members::{MembersChanged, end_sessions_in, lock_owners_and};
use crate::schema::{memberships, scim_group_members, scim_groups, scim_users};

/// The role the directory gives `user`: the highest of their mapped groups,
/// `member` when none is mapped.
async fn directory_role(rows: &mut TenantRows<'_>, user: uuid::Uuid) -> diesel::QueryResult<Role> {
    let tenant = rows.tenant_id().0;
    let mapped: Vec<Option<String>> = scim_group_members::table
        .inner_join(scim_groups::table)
        .filter(scim_group_members::tenant_id.eq(tenant))
        .filter(scim_group_members::user_id.eq(user))
        .filter(scim_groups::role.is_not_null())
        .select(scim_groups::role)
        .load(rows.conn())
        .await?;
    Ok(mapped.iter().flatten().filter_map(|r| Role::parse(r)).max().unwrap_or(Role::Member))
}

/// The member's role now, locked for the transaction.
async fn locked_role(rows: &mut TenantRows<'_>, user: uuid::Uuid) -> diesel::QueryResult<Option<Role>> {
    let tenant = rows.tenant_id().0;
    let role: Option<String> = memberships::table
        .find((tenant, user))
        .select(memberships::role)
        .for_update()
        .first(rows.conn())
        .await
        .optional()?;
    Ok(role.as_deref().and_then(Role::parse))
}

/// Makes the active directory user `user` a member with the directory's
/// role, within the plan's seats (402 `quota_exceeded` when none is free);
/// an existing member gets the directory's role unless they are an owner.
pub(super) async fn admit(
    rows: &mut TenantRows<'_>,
    ctx: &TenantContext,
    changed: &dyn MembersChanged,
    user: uuid::Uuid,
) -> Result<(), ScimError> {
    let Some(_) = locked_role(rows, user).await? else {
        ctx.reserve(rows.conn(), Quota::Members).await?;
        let role = directory_role(rows, user).await?;
        let tenant = rows.tenant_id().0;
        diesel::insert_into(memberships::table)
            .values((
                memberships::tenant_id.eq(tenant),
                memberships::user_id.eq(user),
                memberships::role.eq(role.as_str()),
            ))
            .execute(rows.conn())
            .await?;
        changed.changed(rows.conn(), TenantId(tenant)).await?;
        let entry = ctx.audit_entry("member.provisioned").target("user", user).details(json!({ "role": role }));
        audit::record(rows, entry).await?;
        tracing::info!(member.id = %user, role = role.as_str(), "member provisioned by the directory");
        return Ok(());
    };
    sync_role(rows, ctx, user).await
}

/// Ends `user`'s membership, if any, and their sessions in the
/// organization. 409 for the last owner, with nothing changed.
pub(super) async fn release(
    rows: &mut TenantRows<'_>,
    ctx: &TenantContext,
    changed: &dyn MembersChanged,
    user: uuid::Uuid,
) -> Result<(), ScimError> {
    let tenant = rows.tenant_id().0;
    let (current, owners) = lock_owners_and(rows, user).await?;
    if current == Some(Role::Owner) && owners <= 1 {
        return Err(ScimError::conflict(
            "this user is the organization's last owner: make someone else owner before deactivating them",
        ));
    }
    if current.is_some() {
        diesel::delete(memberships::table.find((tenant, user))).execute(rows.conn()).await?;
        changed.changed(rows.conn(), TenantId(tenant)).await?;
    }
    let sessions = end_sessions_in(rows, user).await?;
    if let Some(role) = current {
        let details = json!({ "role": role, "sessions_ended": sessions });
        audit::record(rows, ctx.audit_entry("member.deprovisioned").target("user", user).details(details)).await?;
        tracing::info!(member.id = %user, sessions.ended = sessions, "member deprovisioned by the directory");
    }
    Ok(())
}

/// Gives the active directory user `user` the directory's role, if they
/// are a member and not an owner.
pub(super) async fn sync_role(
    rows: &mut TenantRows<'_>,
    ctx: &TenantContext,
    user: uuid::Uuid,
) -> Result<(), ScimError> {
    let tenant = rows.tenant_id().0;
    let active: Option<bool> =
        scim_users::table.find((tenant, user)).select(scim_users::active).first(rows.conn()).await.optional()?;
    if active != Some(true) {
        return Ok(());
    }
    let Some(current) = locked_role(rows, user).await? else { return Ok(()) };
    let wanted = directory_role(rows, user).await?;
    if current == Role::Owner || current == wanted {
        return Ok(());
    }
    diesel::update(memberships::table.find((tenant, user)))
        .set(memberships::role.eq(wanted.as_str()))
        .execute(rows.conn())
        .await?;
    let entry = ctx.audit_entry("member.role_changed").target("user", user);
    audit::record(rows, entry.details(json!({ "from": current, "to": wanted }))).await?;
    tracing::info!(member.id = %user, role = wanted.as_str(), "member's role follows the directory");
    Ok(())
}

/// [`sync_role`] for each of `users`.
pub(super) async fn sync_roles(
    rows: &mut TenantRows<'_>,
    ctx: &TenantContext,
    users: &[uuid::Uuid],
) -> Result<(), ScimError> {
    for user in users {
        sync_role(rows, ctx, *user).await?;
    }
    Ok(())
}
