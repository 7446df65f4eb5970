//! The tenancy kernel of Plinth.
//!
//! - [`db`]: the pool and the two transaction kinds (platform, tenant-scoped).
//! - [`registry`]: the tenant registry in the public schema and provisioning.
//! - [`migrate`]: platform migrations and the tenant migration orchestrator.
//! - [`resolve`]: finding the tenant of a request, with a cache kept fresh
//!   across instances by [`notify`].
//! - [`access`]: the policy engine (roles and plans), the route gate and quotas.
//! - [`context`]: the request context every tenant route works with.
//! - [`http`]: request ids, request spans, the JSON body extractor.
//! - [`error`]: the one error type of the HTTP surface.

pub mod access;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod context;
pub mod db;
pub mod error;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod mail;
pub mod migrate;
pub mod notify;
pub mod ratelimit;
pub mod registry;
pub mod resolve;
pub mod schema;

pub use access::gate::{Allowed, PlatformAllowed};
pub use auth::Role;
pub use context::{Principal, TenantContext};
pub use db::{Db, DbConfig, PgConn, TenantConn};
pub use error::{ApiError, FieldError};
pub use ids::{SchemaName, Slug, TenantId, UserId};
pub use registry::{Tenant, TenantStatus};
