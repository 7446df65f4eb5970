//! The access policy of Plinth: one casbin engine answers, in one check, whether a
//! subject's role allows an action on a resource and whether the tenant's
//! plan includes the feature the route needs (`config/access/model.conf`).
//!
//! - **Where policy lives.** Role templates and role inheritance are in
//!   `config/access/policy.csv`, plans and features in the plan catalog
//!   ([`catalog`]). Links are PostgreSQL rows: memberships and API keys give
//!   subjects their roles, `tenants.plan` and `tenants.status` give tenants
//!   their plan, `platform_admins` the platform grant.
//! - **Kept current.** Triggers NOTIFY every change; the listener hands the
//!   changed ids to one writer task, which re-reads those rows and applies
//!   them. On every (re)connect it reloads everything, so a missed
//!   notification cannot leave an instance stale. A subject or tenant the
//!   engine does not know yet (created a moment ago) is read on first use,
//!   and the request waits for that one read.
//! - **Checks never wait behind a write.** There are two copies of the
//!   engine. Checks read the current one; the writer changes the other, swaps
//!   the two (a pointer swap), waits until no check still holds the old one,
//!   and applies the same change to it. No lock is held across I/O, and a
//!   check never waits for a change to be applied.
//! - **The gate** ([`gate`]) is the only way a route gets a tenant context,
//!   and each route names what it needs there.
//! - **Quotas** ([`quota`]) are counted in SQL in the transaction that writes.
//! - **Authentication** is a question this crate asks ([`authn`]) and
//!   identity answers.
//! - **Tenant resolution** ([`resolve`]): the tenant of a request from its
//!   host, a custom domain or `X-Tenant`.
//!
//! Modules: [`authn`], [`catalog`], [`context`], [`engine`], [`error`], [`gate`],
//! [`grants`], [`model`], [`plans`], [`quota`], [`resolve`], [`roles`]; `links` (casbin's role manager
//! replacement) and `snapshot` (the facts the engine holds) are private.

pub mod authn;
pub mod catalog;
pub mod context;
pub mod engine;
pub mod error;
pub mod gate;
pub mod grants;
mod links;
pub mod model;
pub mod plans;
pub mod quota;
pub mod resolve;
pub mod roles;
mod snapshot;

pub use catalog::{Catalog, Meter, Plan, Quota};
pub use context::{Principal, TenantContext};
pub use engine::{
    API_KEYS_CHANNEL, Access, Asked, Change, MEMBERSHIPS_CHANNEL, MODEL, PLATFORM_ADMINS_CHANNEL, POLICY,
    TENANT_POLICY_CHANNEL,
};
pub use error::AccessError;
pub use gate::{Allowed, PlatformAllowed, ScimAllowed};
pub use model::{Action, Decision, Need, Subject};
pub use plans::change_plan;
pub use roles::{AllRoles, Role, RoleSource};
pub use snapshot::TenantPolicy;
