//! Verified email domains: an organization proves it owns `example.com`,
//! either by a DNS TXT record (`_plinth-challenge.example.com` holding
//! `plinth-domain-verification=<token>`, looked up through the resolver
//! `PLINTH_DNS_RESOLVER` names, or the system's) or by following a link
//! mailed to an administrative address at the domain (`admin@`,
//! `administrator@`, `hostmaster@`, `postmaster@`, `webmaster@`, as
//! certificate authorities accept). A domain is verified by one
//! organization at most (a unique index).
//!
//! A verified domain with `auto_join` on makes each new user of that domain
//! a member (with `auto_join_role`) once their address is verified
//! ([`auto_join`]). Admins manage domains on plans with `sso`.

use std::net::SocketAddr;

use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{Access, Allowed, Role, requirements};
use plinth_http::openapi::{ErrorEnvelope, NotFound, RateLimited, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_mail::{self as mail, EmailAddress};
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::{TenantId, registry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::config::{IdentityConfig, config};
use crate::limits::{RateLimits, count};
use crate::schema::{memberships, tenant_email_domains as domains};

requirements! {
    /// Verified domains: admins, on plans with `sso`.
    pub ManageDomains = "domains", Manage, feature: "sso";
}

/// The name the TXT record goes under, before the domain.
pub const CHALLENGE_LABEL: &str = "_plinth-challenge";
/// What the TXT record holds, before the token.
const TXT_PREFIX: &str = "plinth-domain-verification=";
/// The addresses at a domain a proof may be mailed to.
const ADMIN_MAILBOXES: &[&str] = &["admin", "administrator", "hostmaster", "postmaster", "webmaster"];
/// How long a mailed proof works.
const EMAIL_PROOF_HOURS: i64 = 48;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list)
        .service(add)
        .service(confirm_email_proof)
        .service(verify_dns)
        .service(send_email_proof)
        .service(update)
        .service(remove);
}

/// A domain as its organization's admins see it.
#[derive(Serialize, ToSchema, Queryable)]
struct DomainView {
    /// Lower-case, without a trailing dot.
    domain: String,
    /// The token the TXT record must hold.
    #[serde(skip)]
    token: String,
    verified_at: Option<DateTime<Utc>>,
    /// `dns` or `email`, once verified.
    verified_by: Option<String>,
    /// New users with an address at this domain join by themselves once
    /// their address is verified.
    auto_join: bool,
    #[schema(value_type = String, example = "member")]
    auto_join_role: String,
    created_at: DateTime<Utc>,
}

/// The TXT record that proves a domain.
#[derive(Serialize, ToSchema)]
struct DnsRecord {
    /// Always `TXT`.
    r#type: &'static str,
    /// `_plinth-challenge.<domain>`.
    name: String,
    value: String,
}

#[derive(Serialize, ToSchema)]
struct Domain {
    #[serde(flatten)]
    domain: DomainView,
    /// The record to publish for a proof by DNS.
    dns_record: DnsRecord,
}

impl From<DomainView> for Domain {
    fn from(domain: DomainView) -> Self {
        let dns_record = DnsRecord {
            r#type: "TXT",
            name: format!("{CHALLENGE_LABEL}.{}", domain.domain),
            value: format!("{TXT_PREFIX}{}", domain.token),
        };
        Self { domain, dns_record }
    }
}

#[derive(Serialize, ToSchema)]
struct DomainList {
    data: Vec<Domain>,
}

type Columns = (
    domains::domain,
    domains::token,
    domains::verified_at,
    domains::verified_by,
    domains::auto_join,
    domains::auto_join_role,
    domains::created_at,
);

const COLUMNS: Columns = (
    domains::domain,
    domains::token,
    domains::verified_at,
    domains::verified_by,
    domains::auto_join,
    domains::auto_join_role,
    domains::created_at,
);

/// A domain name as given, checked: lower-case ASCII letters, digits, dots
/// and hyphens, with a dot, as an email address's domain would be.
fn parse_domain(field: &str, given: &str) -> Result<String, ApiError> {
    let domain = given.trim().trim_end_matches('.').to_ascii_lowercase();
    let chars_ok = domain.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let labels_ok =
        domain.split('.').all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'));
    if chars_ok && labels_ok && EmailAddress::parse(&format!("admin@{domain}")).is_ok() {
        Ok(domain)
    } else {
        Err(ApiError::invalid_fields(vec![FieldError::new(field, "invalid", "is not a domain name (example.com)")]))
    }
}

/// `GET /v1/domains`.
#[utoipa::path(
    tag = "domains",
    summary = "The organization's email domains, verified or waiting (admins, on plans with `sso`)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = DomainList)),
)]
#[get("/v1/domains")]
async fn list(ctx: Allowed<ManageDomains>) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id.0;
    let rows: Vec<DomainView> = ctx
        .rows(async |rows| {
            Ok::<_, ApiError>(
                domains::table
                    .filter(domains::tenant_id.eq(tenant))
                    .order(domains::domain.asc())
                    .select(COLUMNS)
                    .load(rows.conn())
                    .await?,
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(DomainList { data: rows.into_iter().map(Domain::from).collect() }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewDomain {
    /// The domain, e.g. `example.com`.
    domain: String,
}

/// `POST /v1/domains`: a domain waiting for its proof.
#[utoipa::path(
    tag = "domains",
    summary = "Adds an email domain to prove (admins, on plans with `sso`); the answer holds the TXT record",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = NewDomain,
    responses(
        (status = 201, body = Domain),
        (status = 409, description = "Error: conflict (the organization has it, or another organization verified it).", body = ErrorEnvelope),
    ),
)]
#[post("/v1/domains")]
async fn add(ctx: Allowed<ManageDomains>, body: Json<NewDomain>) -> Result<HttpResponse, ApiError> {
    let domain = parse_domain("domain", &body.0.domain)?;
    let token =
        plinth_tenants::backup::hex(&crate::sessions::random_bytes::<16>().map_err(crate::error::IdentityError::from)?);
    let entry = ctx.audit_entry("domain.added").target("email_domain", &domain);
    let view: DomainView = ctx
        .rows(async |rows| {
            let tenant = rows.tenant_id().0;
            if verified_elsewhere(rows.conn(), tenant, &domain).await? {
                return Err(ApiError::Conflict("another organization has verified this domain".into()));
            }
            let inserted: Option<DomainView> = diesel::insert_into(domains::table)
                .values((domains::tenant_id.eq(tenant), domains::domain.eq(&domain), domains::token.eq(&token)))
                .on_conflict_do_nothing()
                .returning(COLUMNS)
                .get_result(rows.conn())
                .await
                .optional()?;
            let view = inserted.ok_or_else(|| ApiError::Conflict("the organization has this domain".into()))?;
            audit::record(rows, entry).await?;
            Ok(view)
        })
        .await?;
    Ok(HttpResponse::Created().json(Domain::from(view)))
}

async fn verified_elsewhere(
    conn: &mut AsyncPgConnection,
    tenant: uuid::Uuid,
    domain: &str,
) -> diesel::QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        domains::table
            .filter(domains::domain.eq(domain))
            .filter(domains::tenant_id.ne(tenant))
            .filter(domains::verified_at.is_not_null()),
    ))
    .get_result(conn)
    .await
}

/// The TXT values at `name`, through `resolver` (or the system's).
async fn txt_values(resolver: Option<SocketAddr>, name: &str) -> Result<Vec<String>, ApiError> {
    use hickory_resolver::Resolver;
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let mut builder = match resolver {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => Resolver::builder_tokio()
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("reading the system's resolver settings")))?,
    };
    // An admin waits for the answer: at most two tries of three seconds.
    builder.options_mut().timeout = std::time::Duration::from_secs(3);
    builder.options_mut().attempts = 2;
    let resolver =
        builder.build().map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("building the DNS resolver")))?;
    match resolver.txt_lookup(format!("{name}.")).await {
        Ok(found) => Ok(found
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::TXT(txt) => {
                    Some(txt.txt_data.iter().map(|part| String::from_utf8_lossy(part).into_owned()).collect::<String>())
                }
                _ => None,
            })
            .collect()),
        Err(err) if err.is_no_records_found() => Ok(Vec::new()),
        Err(err) => Err(ApiError::Unavailable(anyhow::Error::new(err).context("looking up a TXT record"))),
    }
}

#[derive(Serialize, ToSchema)]
struct Verified {
    domain: String,
    verified_at: DateTime<Utc>,
    /// `dns` or `email`.
    verified_by: String,
}

/// `POST /v1/domains/{domain}/verify`: looks the TXT record up now.
#[utoipa::path(
    tag = "domains",
    summary = "Proves a domain by its TXT record, looked up now (admins, on plans with `sso`)",
    params(TenantHeader, ("domain" = String, Path, description = "The domain.")),
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, body = Verified),
        (status = 409, description = "Error: conflict (the record is not there yet, or another organization verified the domain).", body = ErrorEnvelope),
        NotFound,
    ),
)]
#[post("/v1/domains/{domain}/verify")]
async fn verify_dns(
    ctx: Allowed<ManageDomains>,
    cfg: Option<web::Data<IdentityConfig>>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let domain = parse_domain("domain", &path).map_err(|_| ApiError::NotFound("domain"))?;
    let tenant = ctx.tenant.id.0;
    let token: String = ctx
        .rows(async |rows| {
            let found =
                domains::table.find((tenant, &domain)).select(domains::token).first(rows.conn()).await.optional()?;
            found.ok_or(ApiError::NotFound("domain"))
        })
        .await?;
    let values = txt_values(config(cfg).dns_resolver, &format!("{CHALLENGE_LABEL}.{domain}")).await?;
    let expected = format!("{TXT_PREFIX}{token}");
    if !values.iter().any(|v| v.trim() == expected) {
        return Err(ApiError::Conflict(format!(
            "no TXT record at {CHALLENGE_LABEL}.{domain} holds {expected} yet (DNS changes can take a while)"
        )));
    }
    let entry = ctx.audit_entry("domain.verified").target("email_domain", &domain).details(json!({ "by": "dns" }));
    let verified = ctx
        .rows(async |rows| {
            let verified = set_verified(rows.conn(), tenant, &domain, "dns").await?;
            audit::record(rows, entry).await?;
            Ok::<_, ApiError>(verified)
        })
        .await?;
    tracing::info!(domain.verified_by = "dns", "domain verified");
    Ok(HttpResponse::Ok().json(verified))
}

/// Marks `domain` verified for `tenant` (kept as it was if it already is);
/// 409 when another organization has verified it (the unique index decides
/// between two at once).
async fn set_verified(
    conn: &mut AsyncPgConnection,
    tenant: uuid::Uuid,
    domain: &str,
    how: &str,
) -> Result<Verified, ApiError> {
    if verified_elsewhere(conn, tenant, domain).await? {
        return Err(ApiError::Conflict("another organization has verified this domain".into()));
    }
    let current: Option<(Option<DateTime<Utc>>, Option<String>)> = domains::table
        .find((tenant, domain))
        .select((domains::verified_at, domains::verified_by))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let (at, by) = match current.ok_or(ApiError::NotFound("domain"))? {
        (Some(at), Some(by)) => (at, by),
        _ => (Utc::now(), how.to_owned()),
    };
    diesel::update(domains::table.find((tenant, domain)))
        .set((
            domains::verified_at.eq(at),
            domains::verified_by.eq(&by),
            domains::email_token_hash.eq(None::<Vec<u8>>),
            domains::email_token_expires_at.eq(None::<DateTime<Utc>>),
        ))
        .execute(conn)
        .await?;
    Ok(Verified { domain: domain.to_owned(), verified_at: at, verified_by: by })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EmailProofBody {
    /// Where at the domain the link goes: `admin`, `administrator`,
    /// `hostmaster`, `postmaster` or `webmaster`.
    mailbox: String,
}

#[derive(Serialize, ToSchema)]
struct EmailProofSent {
    /// The address the link went to.
    to: String,
}

/// `POST /v1/domains/{domain}/verify-email`: mails a link to an
/// administrative address at the domain; following it proves the domain.
#[utoipa::path(
    tag = "domains",
    summary = "Mails a proof link to an administrative address at the domain (admins, on plans with `sso`)",
    params(TenantHeader, ("domain" = String, Path, description = "The domain.")),
    security(("session" = []), ("api_key" = [])),
    request_body = EmailProofBody,
    responses((status = 202, body = EmailProofSent), NotFound, RateLimited),
)]
#[post("/v1/domains/{domain}/verify-email")]
async fn send_email_proof(
    ctx: Allowed<ManageDomains>,
    limits: web::Data<RateLimits>,
    path: web::Path<String>,
    body: Json<EmailProofBody>,
) -> Result<HttpResponse, ApiError> {
    let domain = parse_domain("domain", &path).map_err(|_| ApiError::NotFound("domain"))?;
    let mailbox = body.0.mailbox.trim().to_ascii_lowercase();
    if !ADMIN_MAILBOXES.contains(&mailbox.as_str()) {
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "mailbox",
            "invalid",
            "must be admin, administrator, hostmaster, postmaster or webmaster",
        )]));
    }
    let to = EmailAddress::parse(&format!("{mailbox}@{domain}"))
        .map_err(|e| ApiError::invalid_fields(vec![FieldError::new("mailbox", "invalid", e.to_string())]))?;
    // The invitations' limit per address: a few mails an hour to one address.
    count(&limits.invitations_per_address, to.as_str()).await?;
    let (token, hash) = crate::sessions::new_token().map_err(crate::error::IdentityError::from)?;
    let expires = Utc::now() + chrono::Duration::hours(EMAIL_PROOF_HOURS);
    let (tenant, organization) = (ctx.tenant.id, ctx.tenant.name.clone());
    ctx.rows(async |rows| {
        let updated = diesel::update(domains::table.find((tenant.0, &domain)).filter(domains::verified_at.is_null()))
            .set((domains::email_token_hash.eq(&hash[..]), domains::email_token_expires_at.eq(expires)))
            .execute(rows.conn())
            .await?;
        if updated == 0 {
            return Err(ApiError::NotFound("domain"));
        }
        let key = format!("domain_proof:{tenant}:{domain}:{}", uuid::Uuid::now_v7());
        mail::queue(rows.conn(), crate::mail::domain_proof(to.clone(), tenant, &organization, &domain, &token, key))
            .await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(HttpResponse::Accepted().json(EmailProofSent { to: to.as_str().to_owned() }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ConfirmBody {
    /// The token from the mailed link.
    #[schema(schema_with = crate::openapi::mail_token)]
    token: String,
}

/// `POST /v1/domain-proofs/confirm`: the mailed link's token proves the domain
/// (no session: whoever reads that mailbox may not have an account).
#[utoipa::path(
    tag = "domains",
    summary = "Proves a domain with the token mailed to an address at it",
    request_body = ConfirmBody,
    responses(
        (status = 200, body = Verified),
        (status = 400, description = "Error: invalid_request (the token is unknown, used or expired).", body = ErrorEnvelope),
        (status = 409, description = "Error: conflict (another organization verified the domain).", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/domain-proofs/confirm")]
async fn confirm_email_proof(
    req: HttpRequest,
    db: web::Data<plinth_tenants::Db>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    body: Json<ConfirmBody>,
) -> Result<HttpResponse, ApiError> {
    count(&limits.verify_per_ip, &config(cfg).client_key(&req)).await?;
    let hash = crate::sessions::hash_token(&body.0.token);
    let verified = db
        .platform(async |c| {
            let found: Option<(uuid::Uuid, String)> = domains::table
                .filter(domains::email_token_hash.eq(&hash[..]))
                .filter(domains::email_token_expires_at.gt(diesel::dsl::now))
                .filter(domains::verified_at.is_null())
                .select((domains::tenant_id, domains::domain))
                .for_update()
                .first(c)
                .await
                .optional()?;
            let (tenant, domain) = found.ok_or(crate::error::IdentityError::InvalidToken)?;
            let verified = set_verified(c, tenant, &domain, "email").await?;
            if let Some(t) = registry::find_by_id(c, TenantId(tenant)).await? {
                let entry = Entry::new(Actor::System, "domain.verified")
                    .target("email_domain", &domain)
                    .details(json!({ "by": "email" }));
                audit::record_as_system(c, t.scope(), entry).await?;
            }
            Ok::<_, ApiError>(verified)
        })
        .await?;
    tracing::info!(domain.verified_by = "email", "domain verified");
    Ok(HttpResponse::Ok().json(verified))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DomainSettings {
    #[schema(nullable = false)]
    #[serde(default, deserialize_with = "plinth_http::request::not_null")]
    auto_join: Option<bool>,
    /// `admin`, `member` or `viewer`.
    #[schema(nullable = false, value_type = Option<String>)]
    #[serde(default, deserialize_with = "plinth_http::request::not_null")]
    auto_join_role: Option<String>,
}

/// `PATCH /v1/domains/{domain}`: whether new users of a verified domain
/// join by themselves, and with which role.
#[utoipa::path(
    tag = "domains",
    summary = "Turns joining by domain on or off for a verified domain (admins, on plans with `sso`)",
    params(TenantHeader, ("domain" = String, Path, description = "The domain.")),
    security(("session" = []), ("api_key" = [])),
    request_body = DomainSettings,
    responses(
        (status = 200, body = Domain),
        (status = 409, description = "Error: conflict (the domain is not verified yet).", body = ErrorEnvelope),
        NotFound,
    ),
)]
#[patch("/v1/domains/{domain}")]
async fn update(
    ctx: Allowed<ManageDomains>,
    path: web::Path<String>,
    body: Json<DomainSettings>,
) -> Result<HttpResponse, ApiError> {
    let domain = parse_domain("domain", &path).map_err(|_| ApiError::NotFound("domain"))?;
    let DomainSettings { auto_join, auto_join_role } = body.0;
    let role = match auto_join_role.as_deref().map(Role::parse) {
        None => None,
        Some(Some(role @ (Role::Admin | Role::Member | Role::Viewer))) => Some(role.as_str()),
        Some(_) => {
            return Err(ApiError::invalid_fields(vec![FieldError::new(
                "auto_join_role",
                "invalid",
                "must be admin, member or viewer",
            )]));
        }
    };
    let tenant = ctx.tenant.id.0;
    let entry = ctx
        .audit_entry("domain.updated")
        .target("email_domain", &domain)
        .details(json!({ "auto_join": auto_join, "auto_join_role": role }));
    let view: DomainView = ctx
        .rows(async |rows| {
            let current: Option<(Option<DateTime<Utc>>, bool, String)> = domains::table
                .find((tenant, &domain))
                .select((domains::verified_at, domains::auto_join, domains::auto_join_role))
                .for_update()
                .first(rows.conn())
                .await
                .optional()?;
            let (verified_at, was_on, was_role) = current.ok_or(ApiError::NotFound("domain"))?;
            let on = auto_join.unwrap_or(was_on);
            if on && verified_at.is_none() {
                return Err(ApiError::Conflict("the domain is not verified yet".into()));
            }
            let view = diesel::update(domains::table.find((tenant, &domain)))
                .set((domains::auto_join.eq(on), domains::auto_join_role.eq(role.unwrap_or(&was_role))))
                .returning(COLUMNS)
                .get_result(rows.conn())
                .await?;
            audit::record(rows, entry).await?;
            Ok::<_, ApiError>(view)
        })
        .await?;
    Ok(HttpResponse::Ok().json(Domain::from(view)))
}

/// `DELETE /v1/domains/{domain}`.
#[utoipa::path(
    tag = "domains",
    summary = "Removes a domain: it is no longer the organization's, and nobody joins by it (admins, on plans with `sso`)",
    params(TenantHeader, ("domain" = String, Path, description = "The domain.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 204, description = "Removed."), NotFound),
)]
#[delete("/v1/domains/{domain}")]
async fn remove(ctx: Allowed<ManageDomains>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let domain = parse_domain("domain", &path).map_err(|_| ApiError::NotFound("domain"))?;
    let tenant = ctx.tenant.id.0;
    let entry = ctx.audit_entry("domain.removed").target("email_domain", &domain);
    ctx.rows(async |rows| {
        let removed = diesel::delete(domains::table.find((tenant, &domain))).execute(rows.conn()).await?;
        if removed == 0 {
            return Err(ApiError::NotFound("domain"));
        }
        audit::record(rows, entry).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Makes `user`, whose address `email` has just been verified, a member of
/// the organization that verified its domain with joining by domain on, if
/// any, while that organization's plan has `sso` and a free seat. Runs in
/// the caller's platform transaction; recorded as `member.auto_joined`, and
/// per-seat billing is told.
pub async fn auto_join(
    conn: &mut AsyncPgConnection,
    access: &Access,
    changed: &dyn crate::members::MembersChanged,
    user: uuid::Uuid,
    email: &str,
) -> Result<(), ApiError> {
    let Some((_, domain)) = email.rsplit_once('@') else { return Ok(()) };
    let found: Option<(uuid::Uuid, String)> = domains::table
        .filter(domains::domain.eq(domain))
        .filter(domains::verified_at.is_not_null())
        .filter(domains::auto_join.eq(true))
        .select((domains::tenant_id, domains::auto_join_role))
        .first(conn)
        .await
        .optional()?;
    let Some((tenant, role)) = found else { return Ok(()) };
    let Some(t) = registry::find_live_by_ids(conn, &[TenantId(tenant)]).await?.into_iter().next() else {
        return Ok(());
    };
    let plan = access.catalog().effective(&t.plan);
    if !plan.features.iter().any(|f| f == "sso") {
        return Ok(());
    }
    // Holds the tenant's seat lock, as accepting an invitation does.
    let limit = plan.limit(plinth_access::Quota::Members);
    match plinth_access::quota::reserve(
        conn,
        t.id,
        plinth_access::Quota::Members,
        limit,
        &crate::members::JoinedMembers,
    )
    .await
    {
        Ok(()) => {}
        Err(plinth_access::AccessError::QuotaExceeded { .. }) => {
            tracing::info!(tenant.slug = %t.slug, "no free seat to join by domain");
            return Ok(());
        }
        Err(err) => return Err(err.into()),
    }
    let added = diesel::insert_into(memberships::table)
        .values((memberships::tenant_id.eq(tenant), memberships::user_id.eq(user), memberships::role.eq(&role)))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    if added == 1 {
        changed.changed(conn, t.id).await?;
        let entry = Entry::new(Actor::User(user), "member.auto_joined")
            .target("user", user)
            .details(json!({ "role": role, "domain": domain }));
        audit::record_as_system(conn, t.scope(), entry).await?;
        tracing::info!(tenant.slug = %t.slug, user.id = %user, "joined by verified domain");
    }
    Ok(())
}
