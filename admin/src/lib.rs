//! Administration: tenant admins managing their users (invitations, roles,
//! removal, API keys, audit log) and platform admins managing tenants
//! (suspend, delete, plan override, impersonation).
//!
//! Implemented so far: [`identity`] (signup, login, logout, `/v1/me`, email
//! verification, password reset), [`password`] (policy and hashing) and
//! [`mail`] (the identity mail templates). Until tenant and platform
//! administration land, operators manage tenants with `plinth tenants`.

pub mod api_keys;
pub mod audit_log;
pub mod identity;
pub mod mail;
pub mod members;
pub mod password;
pub mod platform;
pub mod tenant;
pub mod totp;
