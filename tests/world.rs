//! A running Plinth with a real SMTP listener and a mail worker, for tests
//! whose flows send mail (identity, invitations).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{AppOptions, TempDir, TestApp, TestDb, TestResult, eventually};
use crate::mail_and_jobs::{Running, fast, settings};
use crate::smtp::SmtpServer;

pub const PASSWORD: &str = "correct horse battery staple";

pub struct World {
    pub app: TestApp,
    pub smtp: SmtpServer,
    pub worker: Running,
    _dir: TempDir,
}

pub async fn world() -> TestResult<World> {
    world_with(AppOptions::default()).await
}

pub async fn world_with(options: AppOptions) -> TestResult<World> {
    let testdb = TestDb::migrated().await?;
    let mut app = TestApp::spawn_on(&testdb, options).await?;
    app.testdb = Some(testdb);
    let smtp = SmtpServer::start().await?;
    let dir = TempDir::new("world")?;
    let worker =
        Running::mail(app.testdb.as_ref().ok_or("no test db")?, &settings(Some(smtp.url()), &dir.path)?, fast())?;
    Ok(World { app, smtp, worker, _dir: dir })
}

impl World {
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Result<reqwest::Response> {
        self.app.http.post(self.app.url(path)).json(&body).send().await
    }

    pub async fn signup(&self, email: &str, slug: &str) -> TestResult<Value> {
        let res = self
            .post(
                "/v1/signup",
                json!({ "email": email, "password": PASSWORD, "organization": format!("{slug} Inc."), "slug": slug }),
            )
            .await?;
        assert_eq!(res.status(), 201, "signup {email} {slug}");
        Ok(res.json().await?)
    }

    /// Moves the organization `slug` to `plan`, and waits until `token` (a
    /// member's session) sees it.
    pub async fn set_plan(&self, slug: &str, plan: &str, token: &str) -> TestResult {
        use plinth_tenants::registry;
        let db = &self.app.db;
        let tenant = db
            .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, slug).await?))
            .await?
            .ok_or("no tenant")?;
        let source = registry::PlanSource::Operator;
        db.platform(async |c| Ok::<_, plinth_http::ApiError>(registry::set_plan(c, tenant.id, plan, source).await?))
            .await?;
        eventually(Duration::from_secs(2), || async {
            let body: Value = self.as_user(token, Method::GET, slug, "/v1/tenant").send().await?.json().await?;
            Ok(body["plan"] == plan)
        })
        .await?;
        Ok(())
    }

    pub async fn me(&self, token: &str) -> reqwest::Result<reqwest::Response> {
        self.app.http.get(self.app.url("/v1/me")).bearer_auth(token).send().await
    }

    /// The token in the first message received for `to` with a link to `path`.
    pub async fn mailed_token(&self, to: &str, path: &str) -> TestResult<String> {
        let find = || {
            self.smtp.accepted().into_iter().find_map(|raw| {
                let message = mail_parser::MessageParser::default().parse(raw.as_bytes())?;
                let recipient = message.to()?.first()?.address()?.to_owned();
                let text = message.body_text(0)?.into_owned();
                let start = text.find(&format!("{path}?token="))? + path.len() + "?token=".len();
                let token: String = text[start..].chars().take_while(|c| !c.is_whitespace()).collect();
                (recipient == to).then_some(token)
            })
        };
        eventually(Duration::from_secs(10), || async { Ok(find().is_some()) }).await?;
        Ok(find().ok_or("no mail")?)
    }

    pub fn as_user(&self, token: &str, method: Method, tenant: &str, path: &str) -> reqwest::RequestBuilder {
        self.app.http.request(method, self.app.url(path)).header("x-tenant", tenant).bearer_auth(token)
    }

    pub async fn invite(&self, tenant: &str, email: &str, role: &str) -> TestResult<reqwest::Response> {
        Ok(self
            .app
            .req(Method::POST, tenant, "/v1/invitations")
            .json(&json!({ "email": email, "role": role }))
            .send()
            .await?)
    }

    /// Tokens of every invitation received for `to`, in order.
    pub fn invitation_tokens(&self, to: &str) -> Vec<String> {
        self.smtp
            .accepted()
            .iter()
            .filter_map(|raw| {
                let m = mail_parser::MessageParser::default().parse(raw.as_bytes())?;
                if m.to()?.first()?.address()? != to {
                    return None;
                }
                let text = m.body_text(0)?.into_owned();
                let start = text.find("/invitations/accept?token=")? + "/invitations/accept?token=".len();
                Some(text[start..].chars().take_while(|c| !c.is_whitespace()).collect())
            })
            .collect()
    }

    pub async fn wait_for_invitations(&self, to: &str, n: usize) -> TestResult<Vec<String>> {
        eventually(Duration::from_secs(10), || async { Ok(self.invitation_tokens(to).len() >= n) }).await?;
        Ok(self.invitation_tokens(to))
    }

    pub async fn accept(&self, body: Value, bearer: Option<&str>) -> reqwest::Result<reqwest::Response> {
        let req = self.app.http.post(self.app.url("/v1/invitations/accept")).json(&body);
        match bearer {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
        .send()
        .await
    }
}
