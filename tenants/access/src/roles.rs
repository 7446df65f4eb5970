//! The roles a member or an API key holds in a tenant, and the question the
//! engine asks to learn them ([`RoleSource`]).

use futures_util::future::BoxFuture;
use plinth_tenants::db::PgConn;
use plinth_tenants::ids::{TenantId, UserId};

/// A member's role in a tenant. Each includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }
}

/// Where subjects' roles come from: memberships and API keys, which identity
/// owns. Errors are the database's, so a lost connection answers 503 like
/// any other query (a stored role Plinth does not know is a
/// deserialization error). The engine asks this on a full load, for one changed link, and for
/// a subject it does not know yet; identity answers with its own queries.
pub trait RoleSource: Send + Sync + 'static {
    /// Every membership and every live API key.
    fn all<'a>(&'a self, conn: &'a mut PgConn) -> BoxFuture<'a, diesel::QueryResult<AllRoles>>;
    /// `user`'s role in `tenant`, if a member.
    fn member<'a>(
        &'a self,
        conn: &'a mut PgConn,
        tenant: TenantId,
        user: UserId,
    ) -> BoxFuture<'a, diesel::QueryResult<Option<Role>>>;
    /// A live key's tenant and role.
    fn key<'a>(
        &'a self,
        conn: &'a mut PgConn,
        key: uuid::Uuid,
    ) -> BoxFuture<'a, diesel::QueryResult<Option<(TenantId, Role)>>>;
}

/// Every role link, as [`RoleSource::all`] reads it.
#[derive(Debug, Default)]
pub struct AllRoles {
    /// (tenant, user, role)
    pub members: Vec<(TenantId, UserId, Role)>,
    /// (key, tenant, role)
    pub keys: Vec<(uuid::Uuid, TenantId, Role)>,
}
