//! OpenID Connect single sign-on against a real provider: oidc-provider from
//! the npm registry (`tests/oidc/provider.mjs`), walked through as a browser
//! does (its sign-in and consent pages), with the faults Plinth must refuse
//! (a wrong audience, an expired token, a foreign issuer, a replayed state).

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

use crate::dns::{DnsServer, verify_domain};
use crate::harness::{AppOptions, TestApp, TestDb, TestResult, assert_error, http_client};

const PASSWORD: &str = "correct horse battery staple";

/// oidc-provider, listening on loopback.
struct Provider {
    issuer: String,
    _process: tokio::process::Child,
}

impl Provider {
    /// Starts the provider with Plinth's callback as its client's redirect URI.
    async fn start(redirect: &str) -> TestResult<Self> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc");
        let mut process = tokio::process::Command::new("node")
            .arg("provider.mjs")
            .current_dir(dir)
            .env("REDIRECT", redirect)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting node (scripts/test.sh installs oidc-provider): {e}"))?;
        let stdout = process.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| "the provider did not start within a minute")??
            .ok_or("the provider exited")?;
        let issuer = serde_json::from_str::<Value>(&line)?["issuer"].as_str().ok_or("no issuer")?.to_owned();
        // Whatever else it prints is read and dropped, so its writes never
        // meet a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { issuer, _process: process })
    }

    /// Makes the ID tokens it issues carry `fault` (or none).
    async fn fault(&self, fault: &str) -> TestResult {
        let res =
            http_client().build()?.post(format!("{}/test/mode", self.issuer)).body(fault.to_owned()).send().await?;
        assert_eq!(res.status(), 204);
        Ok(())
    }
}

/// A browser: follows nothing by itself, keeps cookies.
struct Browser {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

impl Browser {
    fn new() -> TestResult<Self> {
        Ok(Self { http: http_client().redirect(reqwest::redirect::Policy::none()).build()?, cookies: HashMap::new() })
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> TestResult<reqwest::Response> {
        let cookie: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let res = req.header("cookie", cookie.join("; ")).send().await?;
        for set in res.headers().get_all("set-cookie") {
            let pair = set.to_str()?.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies.insert(name.trim().to_owned(), value.to_owned());
            }
        }
        Ok(res)
    }

    /// Where a redirect points, made absolute against `from`.
    fn location(res: &reqwest::Response, from: &str) -> TestResult<String> {
        let location = res.headers().get("location").ok_or("no location")?.to_str()?;
        Ok(reqwest::Url::parse(from)?.join(location)?.to_string())
    }

    /// Starts single sign-on with `tenant` and signs in at the provider as
    /// `login`: the callback URL the provider sends the browser back to
    /// (not followed).
    async fn through_provider(&mut self, app: &TestApp, tenant: &str, login: &str) -> TestResult<String> {
        let callback = app.url("/v1/auth/sso/callback");
        let mut url = app.url(&format!("/v1/auth/sso/start?tenant={tenant}"));
        for _ in 0..12 {
            if url.starts_with(&callback) {
                return Ok(url);
            }
            let res = self.send(self.http.get(&url)).await?;
            if res.status().is_redirection() {
                url = Self::location(&res, &url)?;
                continue;
            }
            assert_eq!(res.status(), 200, "{url}");
            let page = res.text().await?;
            let form: &[(&str, &str)] = if page.contains(r#"value="login""#) {
                &[("prompt", "login"), ("login", login), ("password", "any")]
            } else if page.contains(r#"value="consent""#) {
                &[("prompt", "consent")]
            } else {
                return Err(format!("an unexpected page at {url}: {page}").into());
            };
            let res = self.send(self.http.post(&url).form(form)).await?;
            url = Self::location(&res, &url)?;
        }
        Err("the provider never sent the browser back".into())
    }

    /// Follows the callback: Plinth's answer.
    async fn back(&mut self, callback: &str) -> TestResult<reqwest::Response> {
        self.send(self.http.get(callback)).await
    }
}

/// Signs in through `tenant`'s provider as `login`: Plinth's answer.
async fn sso(app: &TestApp, tenant: &str, login: &str) -> TestResult<reqwest::Response> {
    let mut browser = Browser::new()?;
    let callback = browser.through_provider(app, tenant, login).await?;
    browser.back(&callback).await
}

async fn password_login(app: &TestApp, email: &str) -> TestResult<reqwest::Response> {
    Ok(app.http.post(app.url("/v1/auth/login")).json(&json!({ "email": email, "password": PASSWORD })).send().await?)
}

async fn projects(app: &TestApp, tenant: &str, token: &str) -> TestResult<u16> {
    let res = app.http.get(app.url("/v1/projects")).header("x-tenant", tenant).bearer_auth(token).send().await?;
    Ok(res.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_sign_in_through_their_organizations_provider_and_its_faults_are_refused() -> TestResult {
    let dns = DnsServer::start().await?;
    let resolver: &'static str = Box::leak(dns.addr.to_string().into_boxed_str());
    let testdb = TestDb::migrated().await?;
    let options = AppOptions { settings: vec![("PLINTH_DNS_RESOLVER", resolver)], ..Default::default() };
    let app = TestApp::spawn_on(&testdb, options).await?;
    app.create_tenant_on("acme", "enterprise").await?;
    app.create_tenant_on("globex", "enterprise").await?;
    app.create_tenant("freeco").await?;
    verify_domain(&app, &dns, "acme", "example.com").await?;
    let idp = Provider::start(&app.url("/v1/auth/sso/callback")).await?;
    let connection = |domains: Value| json!({ "issuer": idp.issuer, "client_id": "plinth", "client_secret": "plinth-secret", "domains": domains });
    let put = |tenant: &'static str, body: Value| app.req(Method::PUT, tenant, "/v1/sso/connection").json(&body).send();

    // An admin sets the connection: on plans with sso, for the
    // organization's own verified domains, with an https (or loopback) issuer.
    assert_error(put("freeco", connection(json!(["example.com"]))).await?, 402, "plan_required").await?;
    assert_error(put("acme", connection(json!(["unverified.test"]))).await?, 400, "invalid_request").await?;
    assert_error(put("globex", connection(json!(["example.com"]))).await?, 400, "invalid_request").await?;
    let mut remote = connection(json!(["example.com"]));
    remote["issuer"] = json!("http://idp.example.com");
    assert_error(put("acme", remote).await?, 400, "invalid_request").await?;
    let mut owner = connection(json!(["example.com"]));
    owner["default_role"] = json!("owner");
    assert_error(put("acme", owner).await?, 400, "invalid_request").await?;
    let res = put("acme", connection(json!(["Example.com"]))).await?;
    assert_eq!(res.status(), 200);
    let shown: Value = res.json().await?;
    assert_eq!(shown["domains"], json!(["example.com"]));
    assert_eq!(shown["redirect_uri"], app.url("/v1/auth/sso/callback"));
    assert_eq!((shown["default_role"].as_str(), shown["required"].as_bool()), (Some("member"), Some(false)));
    assert!(!shown.to_string().contains("plinth-secret"), "the secret is never shown");
    let stored = testdb.client().await?.query_one("SELECT client_secret FROM public.sso_connections", &[]).await?;
    let stored: Vec<u8> = stored.get(0);
    assert!(!stored.windows(13).any(|w| w == b"plinth-secret"), "the secret is stored sealed");
    assert_error(app.req(Method::GET, "globex", "/v1/sso/connection").send().await?, 404, "not_found").await?;

    // A new person signs in through the provider: an account, a member of
    // acme with the connection's role, and a session; not a member of globex.
    let res = sso(&app, "acme", "alice@example.com").await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let signed_in: Value = res.json().await?;
    assert_eq!(
        (signed_in["tenant"].as_str(), signed_in["user"]["email"].as_str()),
        (Some("acme"), Some("alice@example.com"))
    );
    assert!(signed_in["user"]["email_verified_at"].is_string());
    let alice = signed_in["token"].as_str().ok_or("no token")?.to_owned();
    assert_eq!(projects(&app, "acme", &alice).await?, 200);
    assert_eq!(projects(&app, "globex", &alice).await?, 404);
    let members: Value = app.req(Method::GET, "acme", "/v1/members").send().await?.json().await?;
    let role = members["data"].as_array().ok_or("no members")?.iter().find(|m| m["email"] == "alice@example.com");
    assert_eq!(role.map(|m| m["role"].clone()), Some(json!("member")));

    // A state works once.
    let mut browser = Browser::new()?;
    let callback = browser.through_provider(&app, "acme", "alice@example.com").await?;
    assert_eq!(browser.back(&callback).await?.status(), 200);
    assert_error(browser.back(&callback).await?, 400, "invalid_request").await?;

    // ID tokens Plinth must refuse, signed with the provider's own key.
    for fault in ["wrong_audience", "expired", "foreign_issuer"] {
        idp.fault(fault).await?;
        let res = sso(&app, "acme", "alice@example.com").await?;
        assert_eq!(res.status(), 401, "{fault}");
    }
    idp.fault("").await?;
    assert_eq!(sso(&app, "acme", "alice@example.com").await?.status(), 200, "a sound token again");

    // An address outside the connection's domains, or one the provider
    // does not vouch for, signs in nowhere.
    assert_error(sso(&app, "acme", "eve@elsewhere.test").await?, 403, "forbidden").await?;
    assert_error(sso(&app, "acme", "unverified@example.com").await?, 403, "forbidden").await?;
    // Someone the organization's directory deactivated does not come back
    // through a sign-in.
    let res = app.req(Method::POST, "acme", "/v1/scim/tokens").send().await?;
    let scim = res.json::<Value>().await?["token"].as_str().ok_or("no SCIM token")?.to_owned();
    let dave = json!({ "userName": "dave@example.com", "active": false });
    let res = app.http.post(app.url("/scim/v2/Users")).bearer_auth(&scim).json(&dave).send().await?;
    assert_eq!(res.status(), 201);
    assert_error(sso(&app, "acme", "dave@example.com").await?, 403, "forbidden").await?;
    // No connection, no sign-in: globex's slug, an unknown one.
    let start = |tenant: &str| app.http.get(app.url(&format!("/v1/auth/sso/start?tenant={tenant}"))).send();
    assert_error(start("globex").await?, 404, "not_found").await?;
    assert_error(start("nobody").await?, 404, "not_found").await?;

    // Requiring SSO: an @example.com account's password no longer signs in;
    // another domain's does; the account signs in through the provider.
    let signup = |email: &str, slug: &str| {
        let body =
            json!({ "email": email, "password": PASSWORD, "organization": format!("{slug} Inc."), "slug": slug });
        app.http.post(app.url("/v1/signup")).json(&body).send()
    };
    assert_eq!(signup("bob@example.com", "bobco").await?.status(), 201);
    assert_eq!(signup("carol@other.test", "carolco").await?.status(), 201);
    assert_eq!(password_login(&app, "bob@example.com").await?.status(), 200);
    let mut required = connection(json!(["example.com"]));
    required["required"] = json!(true);
    assert_eq!(put("acme", required).await?.status(), 200);
    let refused = assert_error(password_login(&app, "bob@example.com").await?, 403, "sso_required").await?;
    assert_eq!(refused["error"]["tenant"], "acme");
    assert_eq!(refused["error"]["sso_start"], "/v1/auth/sso/start?tenant=acme");
    // The same answer whether or not an account exists: the domain decides.
    assert_error(password_login(&app, "nobody@example.com").await?, 403, "sso_required").await?;
    assert_eq!(password_login(&app, "carol@other.test").await?.status(), 200);
    let res = sso(&app, "acme", "bob@example.com").await?;
    assert_eq!(res.status(), 200);
    let bob: Value = res.json().await?;
    assert_eq!(
        projects(&app, "bobco", bob["token"].as_str().ok_or("no token")?).await?,
        200,
        "his own organization too"
    );

    // Recorded in acme's log.
    let log: Value = app.req(Method::GET, "acme", "/v1/audit-log?limit=100").send().await?.json().await?;
    let actions: Vec<&str> =
        log["data"].as_array().ok_or("no log")?.iter().filter_map(|e| e["action"].as_str()).collect();
    for action in ["sso.connection_set", "member.sso_joined", "auth.sso_login"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }

    // Removed: passwords sign in again, and SSO starts nowhere.
    assert_eq!(app.req(Method::DELETE, "acme", "/v1/sso/connection").send().await?.status(), 204);
    assert_eq!(password_login(&app, "bob@example.com").await?.status(), 200);
    assert_error(start("acme").await?, 404, "not_found").await?;
    Ok(())
}
