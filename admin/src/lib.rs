//! Administration: tenant admins managing their users (invitations, roles,
//! removal, API keys, audit log) and platform admins managing tenants
//! (suspend, delete, plan override, impersonation).
//!
//! - [`identity`]: signup, login, logout, `/v1/me`, email verification,
//!   password reset; [`password`] (policy and bounded hashing); [`totp`];
//!   [`limits`] (the rate limits of these routes and of invitations);
//!   [`tokens`] (single-use mail tokens).
//! - [`members`], [`api_keys`], [`audit_log`], [`tenant`] (`GET /v1/tenant`):
//!   tenant administration.
//! - [`platform`]: platform admins (list, show, suspend, reactivate, plan
//!   override, delete). Impersonation is not built.
//! - [`mail`]: the identity mail templates.

pub mod api_keys;
pub mod audit_log;
pub mod identity;
pub mod limits;
pub mod mail;
pub mod members;
pub mod password;
pub mod platform;
pub mod tenant;
pub mod tokens;
pub mod totp;
