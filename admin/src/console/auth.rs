//! Signing in to the console and proving, on every request, that it comes
//! from a signed-in platform admin and (for a form) from the console's own
//! page.
//!
//! - **Sign-in** goes through identity's [`sign_in`] with
//!   [`Audience::PlatformAdmins`]: the same failed-login limits and second
//!   factor as the API, and an account without the grant is refused like a
//!   wrong password. The session is an identity session whose token lives
//!   only in the cookie `plinth_console` (`HttpOnly`, `SameSite=Strict`,
//!   `Path=/console`, `Secure` when `PLINTH_PUBLIC_URL` is https).
//! - **CSRF**: every form carries `csrf`, derived from the session's token
//!   (SHA-256 of a fixed label and the token, so it names that session and
//!   nothing can be learnt of the token from it), and [`Posted`] compares it
//!   in constant time before the handler runs. The sign-in form, before any
//!   session, carries a random value that must match a cookie of its own
//!   (`plinth_console_login`).
//! - **Hidden**: a request without a platform admin's console session gets
//!   the 404 any unknown URL gets, on every console URL but the sign-in page
//!   and the console's two static files.

use std::sync::Arc;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError as _, web};
use base64::Engine as _;
use plinth_access::Access;
use plinth_access::authn::Client;
use plinth_http::ApiError;
use plinth_http::request::Hsts;
use plinth_identity::login::{Audience, SecondFactor, sign_in};
use plinth_identity::sessions::Sessions;
use plinth_tenants::{Db, UserId};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

use super::{ConsoleError, page, render, see_other};
use crate::operator_log;
use crate::platform::Operator;

const COOKIE: &str = "plinth_console";
const LOGIN_COOKIE: &str = "plinth_console_login";
/// The largest form the console takes.
const FORM_LIMIT: usize = 16 * 1024;

/// A signed-in platform admin on a console page.
#[derive(Debug, Clone)]
pub struct ConsoleUser {
    pub user: UserId,
    pub email: String,
    pub session_id: uuid::Uuid,
    /// The token every form of this session carries.
    pub csrf: String,
    /// For the operator log: address and request.
    pub operator: Operator,
}

/// The CSRF token of the session whose token is `token`.
fn csrf_of(token: &str) -> String {
    let digest = sha2::Sha256::new().chain_update(b"plinth-console-csrf\0").chain_update(token.as_bytes()).finalize();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn data<T: ?Sized + 'static>(req: &HttpRequest) -> Result<web::Data<T>, ConsoleError> {
    req.app_data::<web::Data<T>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("{} is not registered", std::any::type_name::<T>())).into())
}

impl ConsoleUser {
    async fn of(req: HttpRequest) -> Result<Self, ConsoleError> {
        let Some(token) = req.cookie(COOKIE).map(|c| c.value().to_owned()) else { return Err(ConsoleError::Hidden) };
        let sessions = data::<Arc<Sessions>>(&req)?;
        let Some(session) = sessions.verify(&token, &Client::of(&req)).await.map_err(ApiError::from)? else {
            return Err(ConsoleError::Hidden);
        };
        // Only a platform admin's own session (an impersonation is nobody here).
        if session.impersonation.is_some() {
            return Err(ConsoleError::Hidden);
        }
        let access = data::<Arc<Access>>(&req)?;
        if !access.is_platform_admin(session.user_id).await.map_err(ApiError::from)? {
            return Err(ConsoleError::Hidden);
        }
        let db = data::<Db>(&req)?;
        let user = session.user_id;
        let email = db
            .platform(async |c| Ok::<_, ApiError>(plinth_identity::users::emails(c, &[user.0]).await?))
            .await?
            .remove(&user.0)
            .ok_or(ConsoleError::Hidden)?;
        tracing::Span::current().record("user.id", user.to_string());
        Ok(Self {
            user,
            email,
            session_id: session.session_id,
            csrf: csrf_of(&token),
            operator: Operator::of(user, &req, "console"),
        })
    }
}

impl FromRequest for ConsoleUser {
    type Error = ConsoleError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self, ConsoleError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        Box::pin(Self::of(req.clone()))
    }
}

/// A form posted from a console page by a signed-in platform admin: the
/// session is checked, then the form's `csrf` against it, then the form is
/// read as `T`. Every console action takes one, so none can skip the check.
pub struct Posted<T> {
    pub who: ConsoleUser,
    pub form: T,
}

impl<T: DeserializeOwned + 'static> FromRequest for Posted<T> {
    type Error = ConsoleError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self, ConsoleError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let body = web::Bytes::from_request(&req, payload);
        Box::pin(async move {
            let who = ConsoleUser::of(req).await?;
            let body = body.await.map_err(|_| ApiError::invalid("the form could not be read"))?;
            if body.len() > FORM_LIMIT {
                return Err(ApiError::PayloadTooLarge { limit: FORM_LIMIT }.into());
            }
            let fields: Vec<(String, String)> =
                serde_urlencoded::from_bytes(&body).map_err(|_| ApiError::invalid("the form is malformed"))?;
            let sent = fields.iter().find(|(name, _)| name == "csrf").map(|(_, v)| v.as_str()).unwrap_or("");
            if !same(sent, &who.csrf) {
                tracing::info!("console form refused: CSRF token missing or wrong");
                return Err(ConsoleError::Csrf);
            }
            let form = serde_urlencoded::from_bytes(&body)
                .map_err(|e| ApiError::invalid(format!("the form is incomplete: {e}")))?;
            Ok(Self { who, form })
        })
    }
}

/// A form with nothing but its CSRF token.
#[derive(Deserialize)]
pub struct Empty {}

/// Anything under `/console` that is no page: 404 like any unknown URL.
pub(super) async fn hidden() -> Result<HttpResponse, ConsoleError> {
    Err(ConsoleError::Hidden)
}

/// Middleware on the console's scope: a console path asked with a method it
/// does not take answers the same 404 as everything else, not a 405 that
/// would tell the path exists.
pub(super) async fn no_other_methods(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let res = next.call(req).await?;
    if res.status() == actix_web::http::StatusCode::METHOD_NOT_ALLOWED {
        let (req, _) = res.into_parts();
        return Ok(actix_web::dev::ServiceResponse::new(req, ConsoleError::Hidden.error_response()));
    }
    Ok(res.map_into_boxed_body())
}

fn secure(req: &HttpRequest) -> bool {
    req.app_data::<Hsts>().is_some_and(|h| h.0) || req.app_data::<web::Data<Hsts>>().is_some_and(|h| h.0)
}

fn cookie<'c>(req: &HttpRequest, name: &'c str, value: String, path: &'c str) -> Cookie<'c> {
    Cookie::build(name, value).path(path).http_only(true).same_site(SameSite::Strict).secure(secure(req)).finish()
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    totp_code: String,
    #[serde(default)]
    csrf: String,
}

/// The sign-in page, with a fresh value for the sign-in form's CSRF check.
fn login_form(
    req: &HttpRequest,
    status: u16,
    email: &str,
    message: Option<&str>,
    code: bool,
) -> Result<HttpResponse, ConsoleError> {
    let nonce = plinth_identity::sessions::random_bytes::<24>().map_err(|e| ApiError::Internal(e.into()))?;
    let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(nonce);
    let body = render("login.html", minijinja::context! { csrf => nonce.as_str(), email, message, code })?;
    let status = actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK);
    let mut res = page(status, body);
    let mut login = cookie(req, LOGIN_COOKIE, nonce, "/console/login");
    login.set_max_age(actix_web::cookie::time::Duration::hours(1));
    res.add_cookie(&login).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(res)
}

/// `GET /console/login`.
pub(super) async fn login_page(req: HttpRequest) -> Result<HttpResponse, ConsoleError> {
    if ConsoleUser::of(req.clone()).await.is_ok() {
        return Ok(see_other("/console/"));
    }
    login_form(&req, 200, "", None, false)
}

/// `POST /console/login`.
pub(super) async fn login(req: HttpRequest, form: web::Form<LoginForm>) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    let expected = req.cookie(LOGIN_COOKIE).map(|c| c.value().to_owned()).unwrap_or_default();
    if expected.is_empty() || !same(&form.csrf, &expected) {
        tracing::info!("console sign-in refused: CSRF value missing or wrong");
        return Err(ConsoleError::Csrf);
    }
    let code = Some(form.totp_code.trim()).filter(|c| !c.is_empty());
    let (token, session, user) =
        match sign_in(&req, &form.email, &form.password, SecondFactor::code(code), Audience::PlatformAdmins).await {
            Ok(signed_in) => signed_in,
            Err(ApiError::TotpRequired { .. }) => {
                return login_form(&req, 401, &form.email, Some("Enter the code from your authenticator app."), true);
            }
            Err(ApiError::InvalidCredentials) => {
                let message = "The address, password or code is wrong, or the account is not a platform admin.";
                return login_form(&req, 401, &form.email, Some(message), code.is_some());
            }
            Err(err) => return Err(err.into()),
        };
    let operator = Operator::of(UserId(user.id), &req, "console");
    let db = data::<Db>(&req)?;
    let entry = operator.log("console.signed_in");
    db.platform(async |c| Ok::<_, ApiError>(operator_log::record(c, entry).await?)).await?;
    let mut res = see_other("/console/");
    let mut session_cookie = cookie(&req, COOKIE, token, "/console");
    let lasts = (session.expires_at - chrono::Utc::now()).num_seconds().max(0);
    session_cookie.set_max_age(actix_web::cookie::time::Duration::seconds(lasts));
    res.add_cookie(&session_cookie).map_err(|e| ApiError::Internal(e.into()))?;
    let mut spent = cookie(&req, LOGIN_COOKIE, String::new(), "/console/login");
    spent.make_removal();
    res.add_cookie(&spent).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(res)
}

/// `POST /console/logout`: ends the session everywhere.
pub(super) async fn logout(req: HttpRequest, posted: Posted<Empty>) -> Result<HttpResponse, ConsoleError> {
    let db = data::<Db>(&req)?;
    let who = posted.who;
    let entry = who.operator.log("console.signed_out");
    db.platform(async |c| {
        plinth_identity::sessions::revoke_session(c, who.session_id).await?;
        operator_log::record(c, entry).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    let mut res = see_other("/console/login");
    let mut gone = cookie(&req, COOKIE, String::new(), "/console");
    gone.make_removal();
    res.add_cookie(&gone).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(res)
}
