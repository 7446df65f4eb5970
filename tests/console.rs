//! The operator console, as a client without a browser sees it: who gets
//! 404, how signing in works (the second factor, the cookie), CSRF on every
//! form, the headers of its pages, and the trail its actions leave. The
//! pages in a real browser are in `console_browser`.

use std::time::Duration;

use plinth_access::Role;
use plinth_tenants::Tenant;
use serde_json::{Value, json};

use crate::harness::{AppOptions, TestApp, TestDb, TestResult, http_client, member};
use crate::world::PASSWORD;

/// A platform admin with a password and two-factor sign-in: address,
/// authenticator secret, and a session token for the API.
pub struct Operator {
    pub email: String,
    pub secret: String,
    pub token: String,
}

/// Signs up `email` (with an organization `slug`), turns on two-factor
/// sign-in, and grants the platform admin role.
pub async fn operator(app: &TestApp, email: &str, slug: &str) -> TestResult<Operator> {
    let signed_up = sign_up(app, email, slug).await?;
    let token = signed_up["token"].as_str().ok_or("no token")?.to_owned();
    let user: uuid::Uuid = signed_up["user"]["id"].as_str().ok_or("no user")?.parse()?;
    let call = |path: &str, body: Value| app.http.post(app.url(path)).bearer_auth(&token).json(&body).send();
    let enrolled: Value = call("/v1/auth/totp/enroll", json!({ "password": PASSWORD })).await?.json().await?;
    let secret = enrolled["secret"].as_str().ok_or("no secret")?.to_owned();
    let res = call("/v1/auth/totp/confirm", json!({ "code": code(&secret)?, "password": PASSWORD })).await?;
    assert_eq!(res.status(), 200, "confirming the second factor");
    app.db.platform(async |c| Ok::<_, plinth_http::ApiError>(plinth_access::grants::grant(c, user).await?)).await?;
    Ok(Operator { email: email.to_owned(), secret, token })
}

/// Signs up `email` with a new organization `slug`; the signup's answer.
async fn sign_up(app: &TestApp, email: &str, slug: &str) -> TestResult<Value> {
    let res = app
        .http
        .post(app.url("/v1/signup"))
        .json(&json!({ "email": email, "password": PASSWORD, "organization": "Operations", "slug": slug }))
        .send()
        .await?;
    assert_eq!(res.status(), 201, "signing up {slug}");
    Ok(res.json().await?)
}

/// The current one-time code.
pub fn code(secret: &str) -> TestResult<String> {
    let secret = totp_rs::Secret::try_from_base32(secret)?;
    Ok(totp_rs::Builder::new().with_secret(secret).build()?.generate_current().to_string())
}

/// A code not used yet: each step's code is taken once and confirming
/// took this step's, so the next step's (the server accepts one step of
/// drift).
pub fn code_after(secret: &str) -> TestResult<String> {
    let secret = totp_rs::Secret::try_from_base32(secret)?;
    let totp = totp_rs::Builder::new().with_secret(secret).build()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    Ok(totp.generate(now + 30).to_string())
}

/// A code of ten minutes from now: wrong now.
fn far_code(secret: &str) -> TestResult<String> {
    let secret = totp_rs::Secret::try_from_base32(secret)?;
    let totp = totp_rs::Builder::new().with_secret(secret).build()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    Ok(totp.generate(now + 600).to_string())
}

/// A console client: its own cookies, no redirects followed.
pub struct Console<'a> {
    app: &'a TestApp,
    http: reqwest::Client,
    cookie: Option<String>,
}

/// The value of `name="csrf"` in a page.
fn csrf_in(html: &str) -> TestResult<String> {
    let at = html.find(r#"name="csrf" value=""#).ok_or("no csrf field")? + r#"name="csrf" value=""#.len();
    Ok(html[at..].chars().take_while(|c| *c != '"').collect())
}

/// `name=value` of the Set-Cookie header for `name`, and the whole header.
fn set_cookie(res: &reqwest::Response, name: &str) -> Option<(String, String)> {
    res.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let pair = v.split(';').next()?.trim().to_owned();
        pair.starts_with(&format!("{name}=")).then(|| (pair, v.to_owned()))
    })
}

impl<'a> Console<'a> {
    pub fn new(app: &'a TestApp) -> TestResult<Self> {
        let http =
            http_client().redirect(reqwest::redirect::Policy::none()).timeout(Duration::from_secs(30)).build()?;
        Ok(Self { app, http, cookie: None })
    }

    /// Signs in through the form; the answer to the form's POST.
    pub async fn sign_in(&mut self, email: &str, password: &str, code: Option<&str>) -> TestResult<reqwest::Response> {
        let page = self.http.get(self.app.url("/console/login")).send().await?;
        assert_eq!(page.status(), 200);
        let (login_cookie, _) = set_cookie(&page, "plinth_console_login").ok_or("no sign-in cookie")?;
        let csrf = csrf_in(&page.text().await?)?;
        let res = self
            .http
            .post(self.app.url("/console/login"))
            .header("cookie", login_cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("email", email),
                ("password", password),
                ("totp_code", code.unwrap_or("")),
            ])
            .send()
            .await?;
        if let Some((pair, _)) = set_cookie(&res, "plinth_console") {
            self.cookie = Some(pair);
        }
        Ok(res)
    }

    pub async fn get(&self, path: &str) -> TestResult<reqwest::Response> {
        let mut req = self.http.get(self.app.url(path));
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", cookie);
        }
        Ok(req.send().await?)
    }

    /// The page's text, asserting a 200.
    pub async fn page(&self, path: &str) -> TestResult<String> {
        let res = self.get(path).await?;
        assert_eq!(res.status(), 200, "GET {path}");
        Ok(res.text().await?)
    }

    /// Posts `fields` with `csrf` as given.
    pub async fn post_raw(&self, path: &str, fields: &[(&str, &str)]) -> TestResult<reqwest::Response> {
        let mut req = self.http.post(self.app.url(path)).form(fields);
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", cookie);
        }
        Ok(req.send().await?)
    }

    /// Posts `fields` with the CSRF token of the page at `from`.
    pub async fn post(&self, from: &str, path: &str, fields: &[(&str, &str)]) -> TestResult<reqwest::Response> {
        let csrf = csrf_in(&self.page(from).await?)?;
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_raw(path, &all).await
    }
}

async fn status_of(app: &TestApp, tenant: &Tenant) -> TestResult<String> {
    let found = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(plinth_tenants::registry::find_by_id(c, tenant.id).await?))
        .await?
        .ok_or("tenant gone")?;
    Ok(found.status.as_str().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_url_is_a_404_to_anyone_but_a_signed_in_platform_admin() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    let ops = operator(&app, "ops@example.com", "ops").await?;
    let member_token = member(&app.db, &acme, Role::Owner).await?;
    let gets = [
        "/console".to_owned(),
        "/console/".to_owned(),
        format!("/console/tenants/{}", acme.id),
        "/console/stripe".to_owned(),
        "/console/jobs".to_owned(),
        "/console/mail".to_owned(),
        "/console/migrations".to_owned(),
        "/console/migrations/progress".to_owned(),
        "/console/admins".to_owned(),
        "/console/log".to_owned(),
        "/console/no-such-page".to_owned(),
    ];
    let posts = [
        format!("/console/tenants/{}/suspend", acme.id),
        format!("/console/tenants/{}/reactivate", acme.id),
        format!("/console/tenants/{}/plan", acme.id),
        format!("/console/tenants/{}/domains", acme.id),
        format!("/console/tenants/{}/delete", acme.id),
        format!("/console/tenants/{}/impersonate", acme.id),
        "/console/stripe/evt_1/replay".to_owned(),
        format!("/console/jobs/{}/retry", uuid::Uuid::now_v7()),
        "/console/migrations/run".to_owned(),
        "/console/admins/grant".to_owned(),
        format!("/console/admins/{}/revoke", uuid::Uuid::now_v7()),
        "/console/logout".to_owned(),
    ];
    let unknown: Value = app.http.get(app.url("/no-such-route")).send().await?.json().await?;
    // Anonymous; a member's session in the console's cookie; a platform
    // admin's session, but as a bearer token rather than the cookie; an
    // impersonation session of a platform admin's making.
    let imp = {
        let user: Value = app.http.get(app.url("/v1/me")).bearer_auth(&member_token).send().await?.json().await?;
        let res = app
            .http
            .post(app.url(&format!("/v1/admin/tenants/{}/impersonate", acme.id)))
            .bearer_auth(&ops.token)
            .json(&json!({ "user_id": user["user"]["id"], "reason": "checking the console" }))
            .send()
            .await?;
        assert_eq!(res.status(), 200);
        res.json::<Value>().await?["token"].as_str().ok_or("token")?.to_owned()
    };
    let callers = [
        ("anonymous", None, None),
        ("a member's session", Some(format!("plinth_console={member_token}")), None),
        ("an operator's bearer token", None, Some(ops.token.clone())),
        ("an impersonation session", Some(format!("plinth_console={imp}")), None),
    ];
    let http = http_client().redirect(reqwest::redirect::Policy::none()).build()?;
    for (who, cookie, bearer) in &callers {
        for (method, path) in gets.iter().map(|p| ("GET", p)).chain(posts.iter().map(|p| ("POST", p))) {
            let mut req = if method == "GET" { http.get(app.url(path)) } else { http.post(app.url(path)) };
            req = req.form(&[
                ("csrf", "x"),
                ("plan", "enterprise"),
                ("confirm_slug", "acme"),
                ("email", "ops@example.com"),
            ]);
            if let Some(cookie) = cookie {
                req = req.header("cookie", cookie);
            }
            if let Some(token) = bearer {
                req = req.bearer_auth(token);
            }
            let res = req.send().await?;
            assert_eq!(res.status(), 404, "{who}: {method} {path}");
            let body: Value = res.json().await?;
            assert_eq!(body["error"]["code"], unknown["error"]["code"], "{who}: {method} {path}");
        }
    }
    // Nor does another method on a console path say that the path exists.
    for path in ["/console/", "/console/login", "/console/stripe"] {
        let res = http.put(app.url(path)).send().await?;
        assert_eq!(res.status(), 404, "PUT {path}");
    }
    assert_eq!(status_of(&app, &acme).await?, "active", "nothing was done");
    // A member who is no platform admin cannot sign in, even with the right
    // password: the same answer as a wrong one, and no session cookie.
    sign_up(&app, "ada@example.com", "ada-co").await?;
    let mut console = Console::new(&app)?;
    let res = console.sign_in("ada@example.com", PASSWORD, None).await?;
    assert_eq!(res.status(), 401);
    assert!(set_cookie(&res, "plinth_console").is_none());
    assert!(res.text().await?.contains("not a platform admin"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_takes_the_second_factor_and_every_form_its_csrf_token() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let options = AppOptions { settings: vec![("PLINTH_PUBLIC_URL", "https://app.plinth.test")], ..Default::default() };
    let mut app = TestApp::spawn_on(&testdb, options).await?;
    app.testdb = Some(testdb);
    let acme = app.create_tenant("acme").await?;
    let ops = operator(&app, "ops@example.com", "ops").await?;

    // The sign-in form's own CSRF value is required.
    let res = Console::new(&app)?
        .http
        .post(app.url("/console/login"))
        .form(&[("email", ops.email.as_str()), ("password", PASSWORD)])
        .send()
        .await?;
    assert_eq!(res.status(), 403);
    // The password alone asks for the code; a wrong code is refused.
    let mut console = Console::new(&app)?;
    let res = console.sign_in(&ops.email, PASSWORD, None).await?;
    assert_eq!(res.status(), 401);
    assert!(res.text().await?.contains("authenticator"));
    let wrong = far_code(&ops.secret)?;
    assert_eq!(console.sign_in(&ops.email, PASSWORD, Some(&wrong)).await?.status(), 401);
    assert!(console.cookie.is_none());
    // With the code: a session cookie the page's scripts cannot read, sent
    // only to the console, only over https, never from another site.
    let res = console.sign_in(&ops.email, PASSWORD, Some(&code_after(&ops.secret)?)).await?;
    assert_eq!(res.status(), 303, "signed in");
    assert_eq!(res.headers().get("location").and_then(|v| v.to_str().ok()), Some("/console/"));
    let (_, header) = set_cookie(&res, "plinth_console").ok_or("no session cookie")?;
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/console"] {
        assert!(header.split(';').any(|a| a.trim() == attribute), "{attribute} in {header}");
    }
    // A working day, not the API's two weeks.
    let max_age: i64 =
        header.split(';').find_map(|a| a.trim().strip_prefix("Max-Age=")).ok_or("no Max-Age")?.parse()?;
    assert!((12 * 3600 - 120..=12 * 3600).contains(&max_age), "{header}");

    // Pages: a CSP without inline script, and no inline script in them.
    for path in [
        "/console/",
        &format!("/console/tenants/{}", acme.id),
        "/console/stripe",
        "/console/jobs",
        "/console/mail",
        "/console/migrations",
        "/console/admins",
        "/console/log",
    ] {
        let res = console.get(path).await?;
        assert_eq!(res.status(), 200, "{path}");
        let csp = res.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert!(
            csp.contains("script-src 'self'")
                && !csp.contains("unsafe-inline")
                && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        let html = res.text().await?;
        for (i, _) in html.match_indices("<script") {
            assert!(html[i..].split('>').next().is_some_and(|tag| tag.contains("src=")), "{path}: inline script");
        }
        assert!(!html.contains(" onclick=") && !html.contains(" onsubmit=") && !html.contains("javascript:"), "{path}");
    }

    // Every form needs the session's token: none, or another session's, is
    // refused and nothing happens.
    let suspend = format!("/console/tenants/{}/suspend", acme.id);
    assert_eq!(console.post_raw(&suspend, &[]).await?.status(), 403);
    let ops2 = operator(&app, "ops2@example.com", "ops-two").await?;
    let mut other = Console::new(&app)?;
    assert_eq!(other.sign_in(&ops2.email, PASSWORD, Some(&code_after(&ops2.secret)?)).await?.status(), 303);
    let others = csrf_in(&other.page("/console/").await?)?;
    assert_eq!(console.post_raw(&suspend, &[("csrf", others.as_str())]).await?.status(), 403);
    assert_eq!(status_of(&app, &acme).await?, "active");

    // With it, the action is done and recorded in both logs.
    let page = format!("/console/tenants/{}", acme.id);
    let res = console.post(&page, &suspend, &[]).await?;
    assert_eq!(res.status(), 303);
    assert_eq!(status_of(&app, &acme).await?, "suspended");
    assert!(console.page(&format!("{page}?notice=suspended")).await?.contains("The tenant is suspended."));
    let logged = app
        .db
        .platform(async |c| {
            Ok::<_, plinth_http::ApiError>(plinth_admin::operator_log::recent(c, Some(acme.id), None, 5).await?)
        })
        .await?;
    assert_eq!(
        logged.first().map(|e| (e.action.as_str(), e.operator_email.as_deref(), e.details["via"].as_str())),
        Some(("tenant.suspended", Some("ops@example.com"), Some("console")))
    );
    let audit: Vec<(String, String)> = app
        .db
        .tenant(acme.scope(), async |c| {
            let entries =
                plinth_tenants::audit::read(c, plinth_tenants::audit::Filter { limit: 5, ..Default::default() })
                    .await?;
            Ok::<_, plinth_http::ApiError>(entries.into_iter().map(|e| (e.action, e.actor_type)).collect())
        })
        .await?;
    assert!(audit.contains(&("tenant.suspended".to_owned(), "user".to_owned())), "{audit:?}");

    // Delete needs the slug typed.
    let delete = format!("/console/tenants/{}/delete", acme.id);
    let res = console.post(&page, &delete, &[("confirm_slug", "acm")]).await?;
    assert_eq!(res.status(), 400);
    assert!(res.text().await?.contains("type the tenant"));
    assert_eq!(status_of(&app, &acme).await?, "suspended");

    // Signing out ends the session: the cookie goes, the pages are 404.
    let res = console.post("/console/", "/console/logout", &[]).await?;
    assert_eq!(res.status(), 303);
    let (_, header) = set_cookie(&res, "plinth_console").ok_or("no removal")?;
    assert!(header.contains("Max-Age=0") || header.contains("Expires="), "{header}");
    crate::harness::eventually(Duration::from_secs(5), || async {
        Ok(console.get("/console/").await?.status() == 404)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_admins_and_impersonation_through_the_console_and_one_tenants_page_shows_only_its_own() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    let globex = app.create_tenant("globex").await?;
    app.create_project("acme", "acme-project").await?;
    let globex_member = member(&app.db, &globex, Role::Member).await?;
    let globex_email: Value = app.http.get(app.url("/v1/me")).bearer_auth(&globex_member).send().await?.json().await?;
    let globex_email = globex_email["user"]["email"].as_str().ok_or("email")?.to_owned();
    let ops = operator(&app, "ops@example.com", "ops").await?;
    let mut console = Console::new(&app)?;
    assert_eq!(console.sign_in(&ops.email, PASSWORD, Some(&code_after(&ops.secret)?)).await?.status(), 303);
    let page = format!("/console/tenants/{}", acme.id);

    // An entry by Plinth itself (no user) in the log the page shows.
    app.db
        .platform(async |c| {
            let active = plinth_tenants::TenantStatus::Active;
            let system = plinth_tenants::audit::Actor::System;
            plinth_admin::platform::set_status(c, acme.id, active, system, "test").await
        })
        .await?
        .ok_or("acme is gone")?;
    // A tenant's page names its own members, not another tenant's.
    let html = console.page(&page).await?;
    assert!(html.contains("tenant.reactivated"), "the system's entry is listed");
    assert!(html.contains("@acme.example.com") && !html.contains(&globex_email), "acme's page");

    // A domain: refused when it is no domain name, served at once when it is,
    // refused for another tenant once taken.
    let domains = format!("/console/tenants/{}/domains", acme.id);
    let res = console.post(&page, &domains, &[("domain", "not a domain")]).await?;
    assert_eq!(res.status(), 400);
    assert!(res.text().await?.contains("is not a domain name"));
    assert_eq!(console.post(&page, &domains, &[("domain", "App.Acme.Example.")]).await?.status(), 303);
    let acme_token = app.token("acme").ok_or("no token")?;
    let res = app
        .http
        .get(app.url("/v1/projects"))
        .header("host", "app.acme.example")
        .bearer_auth(&acme_token)
        .send()
        .await?;
    assert_eq!(res.status(), 200, "served on the new domain");
    let globex_page = format!("/console/tenants/{}", globex.id);
    let res = console
        .post(&globex_page, &format!("/console/tenants/{}/domains", globex.id), &[("domain", "app.acme.example")])
        .await?;
    assert_eq!(res.status(), 409);
    assert!(console.page(&page).await?.contains("app.acme.example"));

    // Impersonation from the console: a reason is needed, and a member of
    // another tenant cannot be picked.
    let globex_id: Value = app.http.get(app.url("/v1/me")).bearer_auth(&globex_member).send().await?.json().await?;
    let globex_id = globex_id["user"]["id"].as_str().ok_or("id")?.to_owned();
    let impersonate = format!("/console/tenants/{}/impersonate", acme.id);
    let res = console.post(&page, &impersonate, &[("user_id", &globex_id), ("reason", "looking around")]).await?;
    assert_eq!(res.status(), 404, "globex's member is no member of acme");
    let owner: Value = app.http.get(app.url("/v1/me")).bearer_auth(&acme_token).send().await?.json().await?;
    let owner_id = owner["user"]["id"].as_str().ok_or("id")?.to_owned();
    let res = console.post(&page, &impersonate, &[("user_id", &owner_id), ("reason", "")]).await?;
    assert_eq!(res.status(), 400);
    let res = console.post(&page, &impersonate, &[("user_id", &owner_id), ("reason", "ticket 9")]).await?;
    assert_eq!(res.status(), 200);
    assert!(res.text().await?.contains("pls_"), "the token is shown once");

    // Platform admins: granted to an existing account, taken away; never
    // your own; an unknown address is refused.
    let ada: uuid::Uuid =
        sign_up(&app, "ada@example.com", "ada-co").await?["user"]["id"].as_str().ok_or("id")?.parse()?;
    let db = &app.db;
    let is_admin = |user: uuid::Uuid| async move {
        db.platform(async |c| {
            Ok::<_, plinth_http::ApiError>(plinth_access::grants::is_admin(c, plinth_tenants::UserId(user)).await?)
        })
        .await
    };
    let res = console.post("/console/admins", "/console/admins/grant", &[("email", "nobody@example.com")]).await?;
    assert_eq!(res.status(), 400);
    assert!(res.text().await?.contains("no account has this address"));
    let res = console.post("/console/admins", "/console/admins/grant", &[("email", "ada@example.com")]).await?;
    assert_eq!(res.status(), 303);
    assert!(is_admin(ada).await?);
    let admins = console.page("/console/admins").await?;
    assert!(admins.contains("ada@example.com") && admins.contains("ops@example.com"));
    let me = ops.token.clone();
    let me: Value = app.http.get(app.url("/v1/me")).bearer_auth(&me).send().await?.json().await?;
    let me = me["user"]["id"].as_str().ok_or("id")?.to_owned();
    let res = console.post("/console/admins", &format!("/console/admins/{me}/revoke"), &[]).await?;
    assert_eq!(res.status(), 409);
    let res = console.post("/console/admins", &format!("/console/admins/{ada}/revoke"), &[]).await?;
    assert_eq!(res.status(), 303);
    assert!(!is_admin(ada).await?);

    // The operator log has all of it, with the operator.
    let log = console.page("/console/log").await?;
    for action in ["console.signed_in", "domain.added", "impersonation.started", "admin.granted", "admin.revoked"] {
        assert!(log.contains(action), "{action} in the operator log");
    }
    let audit: Vec<String> = app
        .db
        .tenant(acme.scope(), async |c| {
            let entries =
                plinth_tenants::audit::read(c, plinth_tenants::audit::Filter { limit: 20, ..Default::default() })
                    .await?;
            Ok::<_, plinth_http::ApiError>(entries.into_iter().map(|e| e.action).collect())
        })
        .await?;
    assert!(
        audit.iter().any(|a| a == "domain.added") && audit.iter().any(|a| a == "impersonation.started"),
        "{audit:?}"
    );
    Ok(())
}
