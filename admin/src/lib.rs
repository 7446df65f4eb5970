//! Administration: tenant admins managing their users (invitations, roles,
//! removal, API keys, audit log) and platform admins managing tenants
//! (suspend, delete, plan override, impersonation).
//!
//! Implemented so far: [`mail`], the identity mail templates. Until the rest
//! lands, operators manage tenants with the
//! `plinth tenants` commands, which call `plinth_tenants::registry`.

pub mod mail;
