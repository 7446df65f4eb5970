//! The policy's vocabulary: who asks ([`Subject`]), what a route needs
//! ([`Need`], [`Action`]) and the answer ([`Decision`]).

use std::fmt;

use plinth_tenants::ids::{TenantId, UserId};

/// Who a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A user, as a member of a tenant.
    Member(TenantId, UserId),
    /// An API key of a tenant.
    Key(TenantId, uuid::Uuid),
    /// A user on platform routes.
    User(UserId),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Member(t, u) => write!(f, "member:{}:{}", t.0, u.0),
            Self::Key(t, k) => write!(f, "key:{}:{k}", t.0),
            Self::User(u) => write!(f, "user:{}", u.0),
        }
    }
}

/// What a route is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Read,
    Write,
    Delete,
    /// Administering: members, API keys, the audit log, billing, tenants.
    Manage,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Delete => "delete",
            Self::Manage => "manage",
        }
    }
}

/// What a route needs: an action on a resource, and a plan feature or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Need {
    pub resource: &'static str,
    pub action: Action,
    pub feature: Option<&'static str>,
}

pub(crate) fn feature_node(feature: &str) -> String {
    format!("feature:{feature}")
}

/// The answer to one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `rule` is the role template that matched, as in the policy file.
    Allowed { rule: String },
    /// The role does not allow it: 403 `forbidden`.
    Forbidden,
    /// The role allows it, the plan does not include the feature: 402
    /// `plan_required`, naming the cheapest plan that does.
    PlanRequired { feature: &'static str, plan: Option<String> },
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed { .. } => "allowed",
            Self::Forbidden => "forbidden",
            Self::PlanRequired { .. } => "plan_required",
        }
    }
}
