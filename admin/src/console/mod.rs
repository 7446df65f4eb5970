//! The operator console: web pages under `/console/` for platform admins,
//! served by Plinth itself (server-rendered templates, one small script of
//! our own, no CDN; `docs/console.md`).
//!
//! - [`auth`]: signing in (address, password and second factor), the
//!   console's own session cookie, CSRF tokens on every form, and the
//!   extractors every page takes. Anyone who is not a signed-in platform
//!   admin gets 404 on every console URL but the sign-in page.
//! - [`tenants`]: the tenant list and a tenant's page, with its actions
//!   (suspend, reactivate, change plan, add a domain, delete, impersonate).
//! - [`operations`]: the Stripe inbox, the job queue, mail, migrations.
//! - [`people`]: platform admins and the operator log.
//!
//! Every action goes through the same functions as the platform admin
//! routes (`crate::platform`), so it lands in the tenant's audit log and the
//! operator log alike. Billing's side (subscriptions, invoices, the Stripe
//! inbox) is asked through [`ConsoleBilling`], which billing implements:
//! this crate knows nothing of Stripe.

pub mod auth;
pub mod operations;
pub mod people;
pub mod tenants;

use std::sync::OnceLock;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError, web};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use minijinja::Environment;
use plinth_http::ApiError;
use plinth_tenants::{Db, TenantId};
use serde::Serialize;

/// The console's content security policy: scripts and styles from the
/// console's own files only, no inline script, no framing, forms posted
/// only here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Mounts the console under `/console`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use web::{get, post};
    cfg.service(
        web::scope("/console")
            .route("", get().to(tenants::list))
            .route("/", get().to(tenants::list))
            .route("/login", get().to(auth::login_page))
            .route("/login", post().to(auth::login))
            .route("/logout", post().to(auth::logout))
            .route("/assets/console.css", get().to(assets::css))
            .route("/assets/console.js", get().to(assets::js))
            .route("/tenants/{id}", get().to(tenants::show_page))
            .route("/tenants/{id}/suspend", post().to(tenants::suspend))
            .route("/tenants/{id}/reactivate", post().to(tenants::reactivate))
            .route("/tenants/{id}/plan", post().to(tenants::change_plan))
            .route("/tenants/{id}/domains", post().to(tenants::add_domain))
            .route("/tenants/{id}/delete", post().to(tenants::delete))
            .route("/tenants/{id}/impersonate", post().to(tenants::impersonate))
            .route("/stripe", get().to(operations::stripe))
            .route("/stripe/{event}/replay", post().to(operations::replay))
            .route("/jobs", get().to(operations::jobs))
            .route("/jobs/{id}/retry", post().to(operations::retry))
            .route("/mail", get().to(operations::mail))
            .route("/migrations", get().to(operations::migrations))
            .route("/migrations/progress", get().to(operations::progress))
            .route("/migrations/run", post().to(operations::run_migrations))
            .route("/admins", get().to(people::admins))
            .route("/admins/grant", post().to(people::grant))
            .route("/admins/{user}/revoke", post().to(people::revoke))
            .route("/log", get().to(people::log))
            .default_service(web::to(auth::hidden))
            .wrap(actix_web::middleware::from_fn(auth::no_other_methods)),
    );
}

/// Why a console request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Not a signed-in platform admin, or no such page: the same 404 as any
    /// unknown URL, so the console shows nothing of itself.
    #[error("not found")]
    Hidden,
    /// A form without its CSRF token, or with another session's.
    #[error("the form is stale or was not sent from the console; reload the page and try again")]
    Csrf,
    /// What the action answered (the page shows its message; a 500 shows
    /// none of its cause).
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("rendering a console page")]
    Render(#[from] minijinja::Error),
}

impl From<diesel::result::Error> for ConsoleError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Api(err.into())
    }
}

impl From<plinth_tenants::db::PoolError> for ConsoleError {
    fn from(err: plinth_tenants::db::PoolError) -> Self {
        Self::Api(err.into())
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Hidden => StatusCode::NOT_FOUND,
            Self::Csrf => StatusCode::FORBIDDEN,
            Self::Api(err) => err.status_code(),
            Self::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let message = match self {
            // Exactly what an unknown URL answers.
            Self::Hidden => return ApiError::NotFound("route").error_response(),
            Self::Api(ApiError::Internal(err)) => {
                tracing::error!(error = format!("{err:#}"), "a console page failed");
                "Something went wrong on the server; the log has the details.".to_owned()
            }
            Self::Api(ApiError::InvalidRequest { message, details }) if !details.is_empty() => {
                let fields: Vec<String> = details.iter().map(|d| format!("{}: {}", d.field, d.message)).collect();
                format!("{message}: {}.", fields.join("; "))
            }
            Self::Render(err) => {
                tracing::error!(error = format!("{err:#}"), "a console page failed to render");
                "Something went wrong on the server; the log has the details.".to_owned()
            }
            other => other.to_string(),
        };
        let body = render("error.html", minijinja::context! { message, status => self.status_code().as_u16() })
            .unwrap_or_else(|_| "<!doctype html><title>Error</title><p>Something went wrong.".to_owned());
        page(self.status_code(), body)
    }
}

/// An HTML answer with the console's headers.
fn page(status: StatusCode, body: String) -> HttpResponse {
    let mut res = HttpResponse::build(status).content_type("text/html; charset=utf-8").body(body);
    res.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    res
}

/// 303 to `to` (after a form).
fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther().insert_header((header::LOCATION, to)).finish()
}

/// The templates, compiled once.
fn templates() -> Result<&'static Environment<'static>, ConsoleError> {
    static ENV: OnceLock<Result<Environment<'static>, minijinja::Error>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source)?;
        }
        env.add_filter("when", when);
        Ok(env)
    })
    .as_ref()
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("the console's templates do not compile: {e:#}")).into())
}

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../../templates/console/base.html")),
    ("error.html", include_str!("../../templates/console/error.html")),
    ("login.html", include_str!("../../templates/console/login.html")),
    ("tenants.html", include_str!("../../templates/console/tenants.html")),
    ("tenant.html", include_str!("../../templates/console/tenant.html")),
    ("impersonation.html", include_str!("../../templates/console/impersonation.html")),
    ("stripe.html", include_str!("../../templates/console/stripe.html")),
    ("jobs.html", include_str!("../../templates/console/jobs.html")),
    ("mail.html", include_str!("../../templates/console/mail.html")),
    ("migrations.html", include_str!("../../templates/console/migrations.html")),
    ("progress.html", include_str!("../../templates/console/progress.html")),
    ("admins.html", include_str!("../../templates/console/admins.html")),
    ("log.html", include_str!("../../templates/console/log.html")),
];

/// A time as the console shows it: `2026-12-03 04:22 UTC`.
fn when(value: String) -> String {
    match DateTime::parse_from_rfc3339(&value) {
        Ok(at) => at.with_timezone(&Utc).format("%Y-%m-%d %H:%M UTC").to_string(),
        Err(_) => value,
    }
}

fn render(name: &str, context: minijinja::Value) -> Result<String, ConsoleError> {
    Ok(templates()?.get_template(name)?.render(context)?)
}

/// A console page: `name` rendered with `context` and what every page has
/// (the signed-in admin, the CSRF token, the section of the menu).
fn show(
    who: &auth::ConsoleUser,
    section: &str,
    name: &str,
    context: minijinja::Value,
) -> Result<HttpResponse, ConsoleError> {
    let common = minijinja::context! { who => who.email.as_str(), csrf => who.csrf.as_str(), section };
    let body = render(name, minijinja::context! { ..common, ..context })?;
    Ok(page(StatusCode::OK, body))
}

/// What a notice code in `?notice=` says after an action (fixed texts, so a
/// link cannot make the console say anything else).
fn notice(code: Option<&str>) -> Option<&'static str> {
    Some(match code? {
        "suspended" => "The tenant is suspended.",
        "reactivated" => "The tenant is served again.",
        "plan" => "The plan is changed.",
        "domain" => "The domain is added.",
        "deleted" => "The tenant is deleted.",
        "replayed" => "The event was processed again; its state is below.",
        "retried" => "The job is queued again.",
        "migrating" => "Migrate-all is queued; progress shows below.",
        "granted" => "The platform admin role is granted.",
        "revoked" => "The platform admin role is revoked.",
        _ => return None,
    })
}

/// Billing's side of the console, registered by the app as
/// `web::Data<dyn ConsoleBilling>` (billing implements it).
pub trait ConsoleBilling: Send + Sync {
    /// A tenant's subscriptions and newest invoices.
    fn tenant<'a>(&'a self, db: &'a Db, tenant: TenantId) -> BoxFuture<'a, Result<BillingPanel, ApiError>>;
    /// Stored Stripe events by state, and the newest `limit` of them (in
    /// `status` only, if given).
    fn inbox<'a>(&'a self, db: &'a Db, status: Option<&'a str>, limit: i64) -> BoxFuture<'a, Result<Inbox, ApiError>>;
    /// Processes a stored event again; what came of it, in words.
    fn replay<'a>(&'a self, event: &'a str) -> BoxFuture<'a, Result<String, ApiError>>;
}

/// A tenant's billing as the console shows it.
#[derive(Debug, Default, Serialize)]
pub struct BillingPanel {
    pub subscriptions: Vec<SubscriptionLine>,
    pub invoices: Vec<InvoiceLine>,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionLine {
    pub id: String,
    pub status: String,
    pub plan: Option<String>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub trial_end: Option<DateTime<Utc>>,
    pub cancels_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct InvoiceLine {
    pub id: String,
    pub number: Option<String>,
    pub status: Option<String>,
    /// `12.00 USD`.
    pub amount: String,
    pub created_at: DateTime<Utc>,
    pub hosted_url: Option<String>,
}

/// The Stripe inbox.
#[derive(Debug, Default, Serialize)]
pub struct Inbox {
    /// Events by state.
    pub counts: Vec<(String, i64)>,
    pub events: Vec<InboxEvent>,
}

#[derive(Debug, Serialize)]
pub struct InboxEvent {
    pub id: String,
    pub kind: Option<String>,
    pub status: String,
    pub received_at: DateTime<Utc>,
    /// Why it waits (parked events).
    pub reason: Option<String>,
}

/// The console's own files.
mod assets {
    use actix_web::HttpResponse;

    pub(super) async fn css() -> HttpResponse {
        HttpResponse::Ok().content_type("text/css; charset=utf-8").body(include_str!("../../assets/console.css"))
    }

    pub(super) async fn js() -> HttpResponse {
        HttpResponse::Ok().content_type("text/javascript; charset=utf-8").body(include_str!("../../assets/console.js"))
    }
}
