//! SCIM 2.0 provisioning, driven by a SCIM client from PyPI (scim2-client,
//! in `tests/scim/directory.py`) with the requests Okta and Entra ID send:
//! each step runs the client, and the test checks in Plinth what it did to
//! memberships, roles and sessions, on two instances.

use std::time::Duration;

use plinth_access::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::dns::{DnsServer, verify_domain};
use crate::harness::{
    AppOptions, TestApp, TestDb, TestResult, add_member, assert_error, eventually, member, session_of, tool,
};

/// Runs one step of the directory against `app` with `token`; its answer.
async fn step(app: &TestApp, token: &str, args: &[&str]) -> TestResult<Value> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scim/directory.py");
    let (name, rest) = args.split_first().ok_or("no step")?;
    let mut command = tokio::process::Command::from(tool("python3"));
    command.arg(script).arg(name).arg(app.url("/scim/v2")).arg(token).args(rest).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .map_err(|_| format!("step {name} ran for two minutes"))?
        .map_err(|e| format!("running the SCIM client (scripts/test.sh installs scim2-client): {e}"))?;
    if !out.status.success() {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        return Err(format!("step {args:?} failed:\n{stdout}{stderr}").into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn text(value: &Value) -> TestResult<String> {
    Ok(value.as_str().ok_or_else(|| format!("not a string: {value}"))?.to_owned())
}

/// `user`'s role in `tenant`, as its owner lists the members.
async fn role_in(app: &TestApp, tenant: &str, user: &str) -> TestResult<Option<String>> {
    let list: Value = app.req(Method::GET, tenant, "/v1/members").send().await?.json().await?;
    let members = list["data"].as_array().ok_or("no members")?;
    Ok(members.iter().find(|m| m["user_id"] == user).and_then(|m| m["role"].as_str()).map(str::to_owned))
}

/// How many seat updates of per-seat billing were queued for `tenant`.
async fn seat_updates(testdb: &TestDb, tenant: &str) -> TestResult<i64> {
    let sql = "SELECT count(*) FROM public.jobs j JOIN public.tenants t ON t.id = j.tenant_id \
               WHERE j.kind = 'billing.seats' AND t.slug = $1";
    Ok(testdb.client().await?.query_one(sql, &[&tenant]).await?.get(0))
}

/// The status `token` gets reading `tenant`'s projects on `app`.
async fn projects(app: &TestApp, tenant: &str, token: &str) -> TestResult<u16> {
    let res = app.http.get(app.url("/v1/projects")).header("x-tenant", tenant).bearer_auth(token).send().await?;
    Ok(res.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_provisions_deactivates_and_groups_members_as_okta_and_entra_id_do() -> TestResult {
    let dns = DnsServer::start().await?;
    let resolver: &'static str = Box::leak(dns.addr.to_string().into_boxed_str());
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(
        &testdb,
        AppOptions { settings: vec![("PLINTH_DNS_RESOLVER", resolver)], ..Default::default() },
    )
    .await?;
    let acme = app.create_tenant_on("acme", "enterprise").await?;
    let globex = app.create_tenant_on("globex", "enterprise").await?;
    app.create_tenant("freeco").await?;
    verify_domain(&app, &dns, "acme", "example.com").await?;
    // The domain of the owner's address (the harness makes it).
    verify_domain(&app, &dns, "acme", "acme.example.com").await?;
    verify_domain(&app, &dns, "globex", "globex.example.com").await?;

    // Tokens: admins, on plans with sso; shown once.
    assert_error(app.req(Method::POST, "freeco", "/v1/scim/tokens").send().await?, 402, "plan_required").await?;
    let acme_member = member(&app.db, &acme, Role::Member).await?;
    let res =
        app.http.post(app.url("/v1/scim/tokens")).header("x-tenant", "acme").bearer_auth(&acme_member).send().await?;
    assert_error(res, 403, "forbidden").await?;
    let res = app.req(Method::POST, "acme", "/v1/scim/tokens").send().await?;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await?;
    let acme_scim = text(&created["token"])?;
    assert!(acme_scim.starts_with("plp_") && acme_scim.starts_with(&text(&created["scim_token"]["prefix"])?));
    let listed: Value = app.req(Method::GET, "acme", "/v1/scim/tokens").send().await?.json().await?;
    assert_eq!(listed["data"][0]["id"], created["scim_token"]["id"]);
    assert!(listed.to_string().find(&acme_scim).is_none(), "the token is shown once");
    let res = app.req(Method::POST, "globex", "/v1/scim/tokens").send().await?;
    let globex_scim = text(&res.json::<Value>().await?["token"])?;

    // A SCIM token opens nothing but SCIM; a session opens no SCIM route;
    // the token's tenant is the only one it speaks for.
    assert_eq!(projects(&app, "acme", &acme_scim).await?, 401);
    let owner = app.token("acme").ok_or("no owner")?;
    let res = app.http.get(app.url("/scim/v2/Users")).bearer_auth(&owner).send().await?;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["content-type"], "application/scim+json");
    let error: Value = res.json().await?;
    assert_eq!(
        (error["status"].as_str(), error["schemas"][0].as_str()),
        (Some("401"), Some("urn:ietf:params:scim:api:messages:2.0:Error"))
    );
    let res =
        app.http.get(app.url("/scim/v2/Users")).header("x-tenant", "globex").bearer_auth(&acme_scim).send().await?;
    assert_eq!(res.status(), 404);

    let discovered = step(&app, &acme_scim, &["discover"]).await?;
    assert_eq!(discovered["types"], json!(["Group", "User"]));

    // Okta provisions alice: she is a member, and billing is told.
    let seats = seat_updates(&testdb, "acme").await?;
    let alice = text(&step(&app, &acme_scim, &["okta-create", "alice@example.com", "Alice", "Liddell"]).await?["id"])?;
    assert_eq!(role_in(&app, "acme", &alice).await?.as_deref(), Some("member"));
    assert_eq!(seat_updates(&testdb, "acme").await?, seats + 1);
    // Her session opens acme and (where she is a member too) globex, on two instances.
    let session = session_of(&app.db, &alice).await?;
    add_member(&app.db, &globex, &session).await?;
    let other = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    for instance in [&app, &other] {
        assert_eq!(projects(instance, "acme", &session).await?, 200);
        assert_eq!(projects(instance, "globex", &session).await?, 200);
    }

    // Okta deactivates her: out of acme on both instances within a second,
    // her sessions there ended; globex is untouched.
    step(&app, &acme_scim, &["okta-active", &alice, "false"]).await?;
    for instance in [&app, &other] {
        eventually(Duration::from_secs(1), || async { Ok(projects(instance, "acme", &session).await? == 401) }).await?;
        assert_eq!(projects(instance, "globex", &session).await?, 200);
    }
    assert_eq!(role_in(&app, "acme", &alice).await?, None);
    assert_eq!(seat_updates(&testdb, "acme").await?, seats + 2);
    // Reactivated: a member again. The ended session stays ended there; a new one opens acme.
    step(&app, &acme_scim, &["okta-active", &alice, "true"]).await?;
    assert_eq!(role_in(&app, "acme", &alice).await?.as_deref(), Some("member"));
    assert_eq!(projects(&app, "acme", &session).await?, 401);
    let session = session_of(&app.db, &alice).await?;
    assert_eq!(projects(&app, "acme", &session).await?, 200);

    // Okta pushes a group; acme's owner maps it to admin: alice is an
    // admin; unassigned, a member again. Globex's owner can't map it.
    let admins = text(&step(&app, &acme_scim, &["okta-push-group", "Admins", &alice]).await?["id"])?;
    let groups: Value = app.req(Method::GET, "acme", "/v1/scim/groups").send().await?.json().await?;
    assert_eq!(groups["data"], json!([{ "id": admins, "display_name": "Admins", "role": null, "members": 1 }]));
    let map = |tenant: &'static str, role: Value| {
        app.req(Method::PATCH, tenant, &format!("/v1/scim/groups/{admins}")).json(&json!({ "role": role })).send()
    };
    assert_error(map("acme", json!("owner")).await?, 400, "invalid_request").await?;
    assert_error(map("globex", json!("admin")).await?, 404, "not_found").await?;
    let res = map("acme", json!("admin")).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["role"], "admin");
    assert_eq!(role_in(&app, "acme", &alice).await?.as_deref(), Some("admin"));
    step(&app, &acme_scim, &["okta-unassign", &admins, &alice]).await?;
    assert_eq!(role_in(&app, "acme", &alice).await?.as_deref(), Some("member"));

    // Entra ID provisions bob by externalId, groups him by PATCH Add and
    // Remove, and deactivates him with "False".
    let bob = text(&step(&app, &acme_scim, &["entra-create", "bob@example.com", "ext-bob"]).await?["id"])?;
    let readers = text(&step(&app, &acme_scim, &["entra-group", "Readers", &bob]).await?["id"])?;
    let res = app
        .req(Method::PATCH, "acme", &format!("/v1/scim/groups/{readers}"))
        .json(&json!({ "role": "viewer" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    assert_eq!(role_in(&app, "acme", &bob).await?.as_deref(), Some("viewer"));
    step(&app, &acme_scim, &["entra-leave", &readers, &bob]).await?;
    assert_eq!(role_in(&app, "acme", &bob).await?.as_deref(), Some("member"));
    step(&app, &acme_scim, &["entra-active", &bob, "false"]).await?;
    assert_eq!(role_in(&app, "acme", &bob).await?, None);
    step(&app, &acme_scim, &["entra-active", &bob, "true"]).await?;
    assert_eq!(role_in(&app, "acme", &bob).await?.as_deref(), Some("member"));

    // Globex's token reaches nothing of acme's directory.
    step(&app, &globex_scim, &["isolation", &alice, &admins, "alice@example.com"]).await?;
    assert_eq!(role_in(&app, "acme", &alice).await?.as_deref(), Some("member"));

    // The directory links the owner's existing account, never changes an
    // owner's role, and cannot deactivate the last owner.
    let me: Value = app.http.get(app.url("/v1/me")).bearer_auth(&owner).send().await?.json().await?;
    let (owner_id, owner_email) = (text(&me["user"]["id"])?, text(&me["user"]["email"])?);
    let linked = step(&app, &acme_scim, &["link", &owner_email]).await?;
    assert_eq!(linked["id"], owner_id.as_str());
    assert_eq!(role_in(&app, "acme", &owner_id).await?.as_deref(), Some("owner"));
    let refused = step(&app, &acme_scim, &["refused-deactivation", &owner_id]).await?;
    assert_eq!(refused, json!({ "status": 409, "active": true }));
    assert_eq!(role_in(&app, "acme", &owner_id).await?.as_deref(), Some("owner"));

    // Deleted from the directory: out of acme; the account stays its own.
    step(&app, &acme_scim, &["delete", &bob]).await?;
    assert_eq!(role_in(&app, "acme", &bob).await?, None);
    let accounts = testdb
        .client()
        .await?
        .query("SELECT 1 FROM public.users WHERE id = $1", &[&bob.parse::<uuid::Uuid>()?])
        .await?;
    assert_eq!(accounts.len(), 1);

    // Each change is in acme's audit log, made by the directory's token.
    let log: Value = app.req(Method::GET, "acme", "/v1/audit-log?limit=100").send().await?.json().await?;
    let actions: Vec<&str> =
        log["data"].as_array().ok_or("no log")?.iter().filter_map(|e| e["action"].as_str()).collect();
    for action in
        ["member.provisioned", "member.deprovisioned", "member.role_changed", "scim.group_mapped", "scim.token_created"]
    {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    let provisioned =
        log["data"].as_array().ok_or("no log")?.iter().find(|e| e["action"] == "member.provisioned").ok_or("none")?;
    assert_eq!(provisioned["details"]["scim_token"], created["scim_token"]["id"]);

    // A revoked token is refused at once; a plan without sso shuts the directory out.
    let id = text(&created["scim_token"]["id"])?;
    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/scim/tokens/{id}")).send().await?.status(), 204);
    assert_eq!(app.http.get(app.url("/scim/v2/Users")).bearer_auth(&acme_scim).send().await?.status(), 401);
    app.set_plan("globex", "pro").await?;
    let res = app.http.get(app.url("/scim/v2/Users")).bearer_auth(&globex_scim).send().await?;
    assert_eq!(res.status(), 402);
    Ok(())
}
