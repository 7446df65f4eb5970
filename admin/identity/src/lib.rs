//! Identity: who people are and how they prove it. Owns the users,
//! sessions, API keys, memberships, invitations, single-use mail tokens,
//! login failures and second-factor tables.
//!
//! - [`accounts`]: signup, new organizations, logout, `/v1/me`, email
//!   verification and password reset.
//! - [`config`]: the identity routes' settings ([`config::IdentityConfig`]).
//! - [`domains`]: email domains an organization proves it owns (DNS or
//!   mail), and joining by domain.
//! - [`error`]: [`error::IdentityError`], what the domain functions return;
//!   routes turn it into `ApiError`.
//! - [`impersonation`]: platform admins acting as a member, and the
//!   tenant setting that allows it.
//! - [`login`]: `POST /v1/auth/login` and its failed-login budget.
//! - [`sso`]: OpenID Connect single sign-on per organization.
//! - [`sessions`]: bearer tokens for sessions and API keys, their cached
//!   checks, and [`sessions::Authenticator`], the answer to the access
//!   gate's authentication question.
//! - [`me`]: what a user controls about their own account: sessions,
//!   password, address.
//! - [`personal_data`]: a user's export and erasure, and the pseudonyms of
//!   erased users in audit logs.
//! - [`passkeys`]: WebAuthn passkeys: registering, signing in with one
//!   alone, and as the second factor beside TOTP.
//! - [`password`]: the password policy and bounded argon2id hashing.
//! - [`totp`]: second factor enrolment, confirmation and recovery codes.
//! - [`members`]: memberships and invitations (invite, accept, roles,
//!   removal).
//! - [`api_keys`]: a tenant's API keys.
//! - [`scim`]: SCIM 2.0 provisioning from an organization's directory
//!   (`/scim/v2/`), its tokens, and directory groups mapped to roles.
//! - [`tokens`]: single-use tokens sent by mail.
//! - [`limits`]: the rate limits of these routes and of invitations.
//! - [`links`]: [`links::MembershipRoles`], identity's answer to the access
//!   engine's question about roles.
//! - [`mail`]: the identity mail templates.
//! - [`users`]: the users table (the user as shown, creating an account,
//!   finders for other crates and the CLI).
//! - [`schema`]: diesel's `table!` declarations of identity's tables.

pub mod accounts;
pub mod api_keys;
pub mod config;
pub mod domains;
pub mod error;
pub mod impersonation;
pub mod invitations;
pub mod limits;
pub mod links;
pub mod login;
pub mod mail;
pub mod me;
pub mod members;
pub mod openapi;
pub mod passkeys;
pub mod password;
pub mod personal_data;
pub mod schema;
pub mod scim;
pub mod sessions;
pub mod sso;
pub mod tokens;
pub mod totp;
pub mod users;
