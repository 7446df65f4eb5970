//! Administration: tenant admins managing their users (invitations, roles,
//! removal, API keys, audit log) and platform admins managing tenants
//! (suspend, delete, plan override, impersonation).
//!
//! Nothing is implemented yet; until then operators manage tenants with the
//! `plinth tenants` commands, which call `plinth_tenants::registry`.
