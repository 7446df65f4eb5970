//! Who signs in through a connection: the account of the address the
//! provider vouched for, its membership, and the rule that refuses
//! password sign-in where single sign-on is required.

use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, SelectableHelper as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{Access, Quota};
use plinth_http::ApiError;
use plinth_mail::EmailAddress;
use plinth_tenants::Db;
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::registry;
use serde_json::json;

use super::Connection;
use crate::members::MembersChanged;
use crate::schema::{memberships, scim_users, users};

/// The account of `email`: found, or made with a password nobody knows
/// (`hash`), its address verified by the provider of a domain the
/// organization proved it owns.
pub(super) async fn account(
    conn: &mut AsyncPgConnection,
    email: &EmailAddress,
    hash: Option<&str>,
) -> Result<crate::users::User, ApiError> {
    let id = match (crate::users::find_id_by_email(conn, email).await?, hash) {
        (Some(id), _) => id.0,
        (None, Some(hash)) => crate::users::insert_user(conn, email, hash).await?.id,
        (None, None) => return Err(ApiError::Conflict("the account changed meanwhile; sign in again".into())),
    };
    let user =
        diesel::update(users::table.find(id))
            .set(users::email_verified_at.eq(diesel::dsl::sql::<
                diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
            >("coalesce(email_verified_at, now())")))
            .returning(crate::users::User::as_returning())
            .get_result(conn)
            .await?;
    Ok(user)
}

/// What joining an organization through its connection needs.
pub(super) struct Joining<'a> {
    pub tenant: &'a registry::Tenant,
    pub connection: &'a Connection,
    pub domain: &'a str,
    pub changed: &'a dyn MembersChanged,
}

/// Makes `user` a member with the connection's role unless they are one,
/// within the plan's seats (402 when none is free); 403 for someone the
/// organization's directory deactivated.
pub(super) async fn join(
    conn: &mut AsyncPgConnection,
    access: &Access,
    joining: &Joining<'_>,
    user: uuid::Uuid,
) -> Result<(), ApiError> {
    let Joining { tenant, connection, domain, changed } = joining;
    // The organization's directory deactivated them: the directory, not a
    // sign-in, brings them back.
    let active: Option<bool> =
        scim_users::table.find((tenant.id.0, user)).select(scim_users::active).first(conn).await.optional()?;
    if active == Some(false) {
        tracing::info!(user.id = %user, "single sign-on refused: deactivated by the organization's directory");
        return Err(ApiError::Forbidden);
    }
    let member: Option<String> =
        memberships::table.find((tenant.id.0, user)).select(memberships::role).first(conn).await.optional()?;
    if member.is_some() {
        return Ok(());
    }
    let limit = access.catalog().effective(&tenant.plan).limit(Quota::Members);
    plinth_access::quota::reserve(conn, tenant.id, Quota::Members, limit, &crate::members::JoinedMembers).await?;
    diesel::insert_into(memberships::table)
        .values((
            memberships::tenant_id.eq(tenant.id.0),
            memberships::user_id.eq(user),
            memberships::role.eq(&connection.default_role),
        ))
        .execute(conn)
        .await?;
    changed.changed(conn, tenant.id).await?;
    let entry = Entry::new(Actor::User(user), "member.sso_joined")
        .target("user", user)
        .details(json!({ "role": connection.default_role, "domain": domain }));
    audit::record_as_system(conn, tenant.scope(), entry).await?;
    Ok(())
}

/// The organization whose connection requires single sign-on for
/// `email`'s domain, while its plan has `sso` (password sign-in refuses
/// such addresses), if any.
pub async fn required_for(db: &Db, access: &Access, email: &EmailAddress) -> Result<Option<String>, ApiError> {
    #[derive(diesel::QueryableByName)]
    struct Requiring {
        #[diesel(sql_type = diesel::sql_types::Text)]
        slug: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        plan: String,
    }
    let Some((_, domain)) = email.as_str().rsplit_once('@') else { return Ok(None) };
    let domain = domain.to_owned();
    let found: Vec<Requiring> = db
        .platform(async |c| {
            // Raw SQL: `= ANY` over the connection's array of domains.
            diesel::sql_query(
                "SELECT t.slug, t.plan FROM public.sso_connections c \
                 JOIN public.tenant_email_domains d \
                   ON d.tenant_id = c.tenant_id AND d.domain = $1 AND d.verified_at IS NOT NULL \
                 JOIN public.tenants t ON t.id = c.tenant_id AND t.status = 'active' \
                 WHERE c.required AND $1 = ANY (c.domains)",
            )
            .bind::<diesel::sql_types::Text, _>(&domain)
            .load(c)
            .await
            .map_err(ApiError::from)
        })
        .await?;
    Ok(found
        .into_iter()
        .find(|r| access.catalog().effective(&r.plan).features.iter().any(|f| f == "sso"))
        .map(|r| r.slug))
}
