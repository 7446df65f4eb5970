//! Identity's answer to the access engine's [`RoleSource`] question: the
//! roles memberships and live API keys give, read from identity's own
//! tables.

use diesel::{BoolExpressionMethods as _, ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::RunQueryDsl as _;
use futures_util::future::BoxFuture;
use plinth_access::{AllRoles, Role, RoleSource};
use plinth_tenants::PgConn;
use plinth_tenants::ids::{TenantId, UserId};

use crate::schema::{api_keys, memberships};

/// Memberships and API keys as role links.
pub struct MembershipRoles;

fn role(stored: &str) -> diesel::QueryResult<Role> {
    Role::parse(stored)
        .ok_or_else(|| diesel::result::Error::DeserializationError(format!("unknown role {stored:?}").into()))
}

impl RoleSource for MembershipRoles {
    fn all<'a>(&'a self, conn: &'a mut PgConn) -> BoxFuture<'a, diesel::QueryResult<AllRoles>> {
        Box::pin(async move {
            let members: Vec<(uuid::Uuid, uuid::Uuid, String)> = memberships::table
                .select((memberships::tenant_id, memberships::user_id, memberships::role))
                .load(conn)
                .await?;
            let keys: Vec<(uuid::Uuid, uuid::Uuid, String)> = api_keys::table
                .filter(api_keys::revoked_at.is_null())
                .select((api_keys::id, api_keys::tenant_id, api_keys::role))
                .load(conn)
                .await?;
            Ok(AllRoles {
                members: members
                    .into_iter()
                    .map(|(t, u, r)| Ok((TenantId(t), UserId(u), role(&r)?)))
                    .collect::<diesel::QueryResult<_>>()?,
                keys: keys
                    .into_iter()
                    .map(|(k, t, r)| Ok((k, TenantId(t), role(&r)?)))
                    .collect::<diesel::QueryResult<_>>()?,
            })
        })
    }

    fn member<'a>(
        &'a self,
        conn: &'a mut PgConn,
        tenant: TenantId,
        user: UserId,
    ) -> BoxFuture<'a, diesel::QueryResult<Option<Role>>> {
        Box::pin(async move {
            let found: Option<String> = memberships::table
                .filter(memberships::tenant_id.eq(tenant.0).and(memberships::user_id.eq(user.0)))
                .select(memberships::role)
                .first(conn)
                .await
                .optional()?;
            found.as_deref().map(role).transpose()
        })
    }

    fn key<'a>(
        &'a self,
        conn: &'a mut PgConn,
        key: uuid::Uuid,
    ) -> BoxFuture<'a, diesel::QueryResult<Option<(TenantId, Role)>>> {
        Box::pin(async move {
            let found: Option<(uuid::Uuid, String)> = api_keys::table
                .filter(api_keys::id.eq(key).and(api_keys::revoked_at.is_null()))
                .select((api_keys::tenant_id, api_keys::role))
                .first(conn)
                .await
                .optional()?;
            found.map(|(t, r)| Ok((TenantId(t), role(&r)?))).transpose()
        })
    }
}
