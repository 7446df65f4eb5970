//! Impersonation: a platform admin acting as a member, in that member's one
//! tenant, for fifteen minutes, with a trail in the tenant's audit log and
//! the operator log, and a setting that lets the tenant's owners forbid it.

use std::time::Duration;

use plinth_access::Role;
use plinth_tenants::Tenant;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, add_member, assert_error, eventually, member, platform_admin};

async fn user_id(app: &TestApp, token: &str) -> TestResult<String> {
    let me: Value = app.http.get(app.url("/v1/me")).bearer_auth(token).send().await?.json().await?;
    Ok(me["user"]["id"].as_str().ok_or("no user id")?.to_owned())
}

async fn impersonate(
    app: &TestApp,
    admin: &str,
    tenant: &Tenant,
    user: &str,
    reason: &str,
) -> TestResult<reqwest::Response> {
    Ok(app
        .http
        .post(app.url(&format!("/v1/admin/tenants/{}/impersonate", tenant.id)))
        .bearer_auth(admin)
        .json(&json!({ "user_id": user, "reason": reason }))
        .send()
        .await?)
}

/// The tenant's audit log as its owner reads it, newest first.
async fn audit(app: &TestApp, tenant: &str) -> TestResult<Vec<Value>> {
    let res = app.req(Method::GET, tenant, "/v1/audit-log?limit=100").send().await?;
    assert_eq!(res.status(), 200, "reading the audit log");
    let body: Value = res.json().await?;
    Ok(body["data"].as_array().ok_or("no data")?.clone())
}

fn with_action<'a>(entries: &'a [Value], action: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["action"] == action).collect()
}

fn flagged(res: &reqwest::Response) -> bool {
    res.headers().get("plinth-impersonation").is_some_and(|v| v == "true")
}

#[tokio::test]
async fn an_operator_acts_as_a_member_in_one_tenant_only_within_limits_and_every_step_is_recorded() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    let globex = app.create_tenant_on("globex", "pro").await?;
    let lobby = app.create_tenant("lobby").await?;
    let operator = platform_admin(&app, &lobby).await?;
    let operator_id = user_id(&app, &operator).await?;
    // An owner: whatever impersonation refuses, the role alone would allow.
    let member_token = member(&app.db, &acme, Role::Owner).await?;
    let member_id = user_id(&app, &member_token).await?;
    // The member belongs to another organization too.
    add_member(&app.db, &globex, &member_token).await?;
    let stranger = member(&app.db, &globex, Role::Member).await?;
    let stranger_id = user_id(&app, &stranger).await?;

    // Only platform admins; a reason; a member of that tenant; not yourself.
    assert_error(impersonate(&app, &member_token, &acme, &member_id, "support ticket 12").await?, 403, "forbidden")
        .await?;
    let res =
        assert_error(impersonate(&app, &operator, &acme, &member_id, "  ").await?, 400, "invalid_request").await?;
    assert_eq!(res["error"]["details"][0]["field"], "reason");
    let res = app
        .http
        .post(app.url(&format!("/v1/admin/tenants/{}/impersonate", acme.id)))
        .bearer_auth(&operator)
        .json(&json!({ "user_id": member_id }))
        .send()
        .await?;
    assert_error(res, 400, "invalid_request").await?;
    assert_error(impersonate(&app, &operator, &acme, &stranger_id, "support ticket 12").await?, 404, "not_found")
        .await?;
    assert_error(impersonate(&app, &operator, &acme, &operator_id, "support ticket 12").await?, 400, "invalid_request")
        .await?;

    let before = chrono::Utc::now();
    let res = impersonate(&app, &operator, &acme, &member_id, "support ticket 12").await?;
    let after = chrono::Utc::now();
    assert_eq!(res.status(), 200);
    let started: Value = res.json().await?;
    let token = started["token"].as_str().ok_or("no token")?.to_owned();
    let expires_at: chrono::DateTime<chrono::Utc> = started["expires_at"].as_str().ok_or("no expiry")?.parse()?;
    let fifteen = chrono::Duration::minutes(15);
    assert!(expires_at >= before + fifteen && expires_at <= after + fifteen, "{expires_at}");

    // GET /v1/me says who is acting and why; only the one organization shows.
    let res = app.http.get(app.url("/v1/me")).bearer_auth(&token).send().await?;
    assert!(flagged(&res), "the answer carries plinth-impersonation");
    let me: Value = res.json().await?;
    assert_eq!(me["user"]["id"], member_id.as_str());
    assert!(me["impersonation"]["operator_email"].as_str().is_some_and(|e| e.contains("@lobby.")), "{me}");
    assert_eq!(me["impersonation"]["reason"], "support ticket 12");
    assert_eq!(
        me["impersonation"]["expires_at"].as_str().map(str::parse::<chrono::DateTime<chrono::Utc>>).transpose()?,
        Some(expires_at)
    );
    let slugs: Vec<&str> = me["memberships"]
        .as_array()
        .ok_or("memberships")?
        .iter()
        .filter_map(|m| m["tenant"]["slug"].as_str())
        .collect();
    assert_eq!(slugs, ["acme"]);
    // The member's own session shows no impersonation and no header.
    let own = app.http.get(app.url("/v1/me")).bearer_auth(&member_token).send().await?;
    assert!(!flagged(&own));
    assert!(own.json::<Value>().await?.get("impersonation").is_none());

    // Reads and writes in acme, as the member, each answer flagged.
    let as_member = |method: Method, tenant: &str, path: &str| {
        app.http.request(method, app.url(path)).bearer_auth(&token).header("x-tenant", tenant)
    };
    let res =
        as_member(Method::POST, "acme", "/v1/projects").json(&json!({ "name": "Seen by support" })).send().await?;
    assert_eq!(res.status(), 201);
    assert!(flagged(&res));
    let project: Value = res.json().await?;
    let res = as_member(Method::GET, "acme", "/v1/projects").send().await?;
    assert_eq!(res.status(), 200);
    assert!(flagged(&res));

    // Nowhere else: not the member's other organization, not platform routes.
    let res = as_member(Method::GET, "globex", "/v1/projects").send().await?;
    assert!(flagged(&res));
    assert_error(res, 404, "not_found").await?;
    let res = app.http.get(app.url("/v1/admin/tenants")).bearer_auth(&token).send().await?;
    assert_error(res, 401, "unauthenticated").await?;

    // Never billing, API keys, settings, members' roles, the second factor
    // or a new organization; refused answers are flagged too.
    let owner = member(&app.db, &acme, Role::Owner).await?;
    let owner_id = user_id(&app, &owner).await?;
    for (method, path, body) in [
        (Method::GET, "/v1/billing/subscription".to_owned(), None),
        (Method::POST, "/v1/billing/portal".to_owned(), None),
        (Method::GET, "/v1/api-keys".to_owned(), None),
        (Method::POST, "/v1/api-keys".to_owned(), Some(json!({ "name": "k", "role": "member" }))),
        (Method::PATCH, "/v1/tenant/settings".to_owned(), Some(json!({ "impersonation_allowed": true }))),
        (Method::PATCH, format!("/v1/members/{owner_id}"), Some(json!({ "role": "viewer" }))),
        (Method::POST, "/v1/invitations".to_owned(), Some(json!({ "email": "new@example.com", "role": "member" }))),
        (Method::DELETE, format!("/v1/members/{member_id}"), None),
        (Method::POST, "/v1/auth/totp/enroll".to_owned(), Some(json!({}))),
        (Method::POST, "/v1/tenants".to_owned(), Some(json!({ "organization": "Side", "slug": "side-org" }))),
    ] {
        let mut req = as_member(method.clone(), "acme", &path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await?;
        assert!(flagged(&res), "{method} {path}");
        let body = assert_error(res, 403, "forbidden").await?;
        assert!(
            body["error"]["message"].as_str().is_some_and(|m| m.contains("impersonating")),
            "{method} {path}: {body}"
        );
    }
    // The member's role is what it was.
    let members: Value = app.req(Method::GET, "acme", "/v1/members").send().await?.json().await?;
    let owner_row =
        members["data"].as_array().ok_or("members")?.iter().find(|m| m["user_id"] == owner_id.as_str()).cloned();
    assert_eq!(owner_row.ok_or("owner listed")?["role"], "owner");

    // The trail: started, then each write the gate let through, naming the
    // member and the operator.
    let entries = audit(&app, "acme").await?;
    let started_entry = with_action(&entries, "impersonation.started");
    assert_eq!(started_entry.len(), 1);
    assert_eq!(started_entry[0]["actor_id"], member_id.as_str());
    assert_eq!(started_entry[0]["details"]["impersonated_by"], operator_id.as_str());
    assert_eq!(started_entry[0]["details"]["reason"], "support ticket 12");
    let writes = with_action(&entries, "impersonation.write");
    assert!(
        writes.iter().any(|w| w["details"]["path"] == "/v1/projects" && w["details"]["method"] == "POST"),
        "{writes:?}"
    );
    assert!(
        writes
            .iter()
            .all(|w| w["actor_id"] == member_id.as_str() && w["details"]["impersonated_by"] == operator_id.as_str())
    );
    let project_id = project["id"].as_str().ok_or("project id")?;
    let project_read = as_member(Method::GET, "acme", &format!("/v1/projects/{project_id}")).send().await?;
    assert_eq!(project_read.status(), 200, "the write landed in acme");
    // The other organization's log holds nothing of it.
    let elsewhere = audit(&app, "globex").await?;
    assert!(
        elsewhere.iter().all(|e| !e["action"].as_str().unwrap_or("").starts_with("impersonation")),
        "{elsewhere:?}"
    );

    // Signing out ends it, recorded once; the member's own session lives on.
    let res = as_member(Method::POST, "acme", "/v1/auth/logout").send().await?;
    assert_eq!(res.status(), 204);
    eventually(Duration::from_secs(5), || async {
        Ok(as_member(Method::GET, "acme", "/v1/projects").send().await?.status() == 401)
    })
    .await?;
    let entries = audit(&app, "acme").await?;
    let ended = with_action(&entries, "impersonation.ended");
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0]["details"]["why"], "signed_out");
    let own =
        app.http.get(app.url("/v1/projects")).bearer_auth(&member_token).header("x-tenant", "acme").send().await?;
    assert_eq!(own.status(), 200);

    // The operator log has it, with the operator and the reason.
    let logged: Vec<(String, Option<uuid::Uuid>, String)> = app
        .db
        .platform(async |c| {
            Ok::<_, plinth_http::ApiError>(
                plinth_admin::operator_log::recent(c, Some(acme.id), None, 10)
                    .await?
                    .into_iter()
                    .map(|r| (r.action, r.tenant_id, r.details["reason"].as_str().unwrap_or("").to_owned()))
                    .collect(),
            )
        })
        .await?;
    assert_eq!(logged, [("impersonation.started".to_owned(), Some(acme.id.0), "support ticket 12".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn owners_forbid_impersonation_which_ends_one_under_way_and_expiry_is_recorded() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    let lobby = app.create_tenant("lobby").await?;
    let operator = platform_admin(&app, &lobby).await?;
    let member_token = member(&app.db, &acme, Role::Member).await?;
    let member_id = user_id(&app, &member_token).await?;
    let admin = member(&app.db, &acme, Role::Admin).await?;

    let settings: Value = app.req(Method::GET, "acme", "/v1/tenant/settings").send().await?.json().await?;
    assert_eq!(settings["impersonation_allowed"], true);
    let res = impersonate(&app, &operator, &acme, &member_id, "checking a report").await?;
    assert_eq!(res.status(), 200);
    let token = res.json::<Value>().await?["token"].as_str().ok_or("token")?.to_owned();
    let with_token = || app.http.get(app.url("/v1/projects")).bearer_auth(&token).header("x-tenant", "acme");
    assert_eq!(with_token().send().await?.status(), 200);

    // An admin is not an owner.
    let res = app
        .http
        .patch(app.url("/v1/tenant/settings"))
        .bearer_auth(&admin)
        .header("x-tenant", "acme")
        .json(&json!({ "impersonation_allowed": false }))
        .send()
        .await?;
    assert_error(res, 403, "forbidden").await?;
    let res = app
        .req(Method::PATCH, "acme", "/v1/tenant/settings")
        .json(&json!({ "impersonation_allowed": false }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["impersonation_allowed"], false);
    // The session under way ends at once; no new one starts.
    eventually(Duration::from_secs(5), || async { Ok(with_token().send().await?.status() == 401) }).await?;
    let res = impersonate(&app, &operator, &acme, &member_id, "checking a report").await?;
    let body = assert_error(res, 403, "forbidden").await?;
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("do not allow")), "{body}");
    let entries = audit(&app, "acme").await?;
    let ended = with_action(&entries, "impersonation.ended");
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0]["details"]["why"], "forbidden_by_owners");
    assert_eq!(with_action(&entries, "settings.changed").len(), 1);

    // Allowed again; this one runs out, and its end is recorded by the job
    // queued for its expiry.
    let res = app
        .req(Method::PATCH, "acme", "/v1/tenant/settings")
        .json(&json!({ "impersonation_allowed": true }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let res = impersonate(&app, &operator, &acme, &member_id, "second look").await?;
    assert_eq!(res.status(), 200);
    let token = res.json::<Value>().await?["token"].as_str().ok_or("token")?.to_owned();
    // Fifteen minutes pass: the session's end and its job come due now.
    let hash = plinth_identity::sessions::hash_token(&token);
    app.db
        .platform(async |c| {
            use diesel::sql_types::Bytea;
            use diesel_async::RunQueryDsl;
            diesel::sql_query(
                "WITH s AS (UPDATE public.sessions SET expires_at = now() WHERE token_hash = $1 RETURNING id) \
                 UPDATE public.jobs SET run_at = now() WHERE kind = 'identity.impersonation_expired' \
                   AND dedup_key = (SELECT id::text FROM s)",
            )
            .bind::<Bytea, _>(&hash[..])
            .execute(c)
            .await?;
            Ok::<_, plinth_http::ApiError>(())
        })
        .await?;
    let testdb = app.testdb.as_ref().ok_or("test database")?;
    let settings = plinth::config::Settings::from_values(&std::collections::HashMap::new())?;
    let worker = crate::mail_and_jobs::Running::mail(testdb, &settings, plinth_jobs::WorkerConfig::default())?;
    eventually(Duration::from_secs(20), || async {
        let entries = audit(&app, "acme").await?;
        Ok(with_action(&entries, "impersonation.ended").iter().any(|e| e["details"]["why"] == "expired"))
    })
    .await?;
    worker.stop().await?;
    let res = app.http.get(app.url("/v1/projects")).bearer_auth(&token).header("x-tenant", "acme").send().await?;
    assert_error(res, 401, "unauthenticated").await?;
    Ok(())
}
