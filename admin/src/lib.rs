//! Administration: a tenant's own view of itself and platform admins
//! managing tenants. People, sessions and keys are identity's
//! (`plinth-identity`); this crate calls it.
//!
//! - [`tenant`]: `GET /v1/tenant`.
//! - [`audit_log`]: `GET /v1/audit-log`, a tenant's audit log.
//! - [`platform`]: platform admins (list, show, suspend, reactivate, plan
//!   override, delete, impersonate).
//! - [`operator_log`]: what platform admins did, platform-wide.

pub mod audit_log;
pub mod console;
pub mod operator_log;
pub mod platform;
pub mod tenant;
