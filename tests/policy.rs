//! The access policy end to end: every route × principal × plan × tenant
//! status against the status codes the guide defines, quotas under
//! concurrency, downgrades, two instances, and 100,000 tenants loaded.

use std::sync::Arc;
use std::time::Duration;

use plinth_identity::links::MembershipRoles;

use plinth::projects::{NewProject, NewTask, create_project, create_task};
use plinth_access::Role;
use plinth_access::{Access, Action, Catalog, Decision, Need, Subject};
use plinth_http::ApiError;
use plinth_tenants::{Db, Tenant, TenantStatus, UserId};
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{
    AppOptions, TestApp, TestDb, TestResult, assert_error, eventually, member, platform_admin, set_status,
};

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    /// Signed in, not a member of the tenant.
    Stranger,
    /// Holds the platform admin grant, not a member.
    PlatformAdmin,
    Member(Role),
    /// An admin API key of the tenant.
    AdminKey,
}

const WHO: [Who; 8] = [
    Who::Anonymous,
    Who::Stranger,
    Who::PlatformAdmin,
    Who::Member(Role::Viewer),
    Who::Member(Role::Member),
    Who::Member(Role::Admin),
    Who::Member(Role::Owner),
    Who::AdminKey,
];

/// What a tenant route needs, written from the guide (not from the code).
#[derive(Debug, Clone, Copy)]
struct Route {
    method: &'static str,
    path: &'static str,
    min_role: Role,
    feature: Option<&'static str>,
    /// Creates something counted by a plan limit the free tenant is at.
    counted: bool,
    ok: u16,
}

const fn route(method: &'static str, path: &'static str, min_role: Role, feature: Option<&'static str>) -> Route {
    let ok = match method.as_bytes()[0] {
        b'P' if method.len() == 4 => 201, // POST
        b'D' => 204,
        _ => 200,
    };
    Route { method, path, min_role, feature, counted: false, ok }
}

const fn counted(mut r: Route) -> Route {
    r.counted = true;
    r
}

/// Every tenant route. `{p}`/`{t}` are an existing project/task, `{new_p}`,
/// `{new_t}`, `{new_key}` and `{other}` are made fresh for each request,
/// `{target}` is a viewer every request may change, `{me}` the caller.
const ROUTES: [Route; 20] = [
    route("GET", "/v1/tenant", Role::Viewer, None),
    route("GET", "/v1/projects", Role::Viewer, None),
    counted(route("POST", "/v1/projects", Role::Member, None)),
    route("GET", "/v1/projects/{p}", Role::Viewer, None),
    route("PATCH", "/v1/projects/{p}", Role::Member, None),
    route("DELETE", "/v1/projects/{new_p}", Role::Admin, None),
    route("GET", "/v1/projects/{p}/tasks", Role::Viewer, None),
    route("POST", "/v1/projects/{p}/tasks", Role::Member, None),
    route("PATCH", "/v1/tasks/{t}", Role::Member, None),
    route("DELETE", "/v1/tasks/{new_t}", Role::Admin, None),
    route("GET", "/v1/members", Role::Admin, None),
    route("PATCH", "/v1/members/{target}", Role::Admin, None),
    route("DELETE", "/v1/members/{other}", Role::Admin, None),
    route("DELETE", "/v1/members/{me}", Role::Viewer, None),
    counted(route("POST", "/v1/invitations", Role::Admin, None)),
    route("GET", "/v1/api-keys", Role::Admin, Some("api_keys")),
    route("POST", "/v1/api-keys", Role::Admin, Some("api_keys")),
    route("DELETE", "/v1/api-keys/{new_key}", Role::Admin, Some("api_keys")),
    route("GET", "/v1/audit-log", Role::Admin, Some("audit_log")),
    route("GET", "/v1/export", Role::Admin, Some("data_export")),
];

/// The default catalog, as the guide states it.
fn plan_has(plan: &str, feature: &str) -> bool {
    match plan {
        "free" => false,
        "pro" => matches!(feature, "audit_log" | "api_keys"),
        "enterprise" => matches!(feature, "audit_log" | "api_keys" | "custom_domains" | "data_export"),
        _ => false,
    }
}

/// The status and error code the guide defines.
fn expected(route: &Route, who: Who, plan: &str, suspended: bool) -> (u16, Option<&'static str>) {
    let role = match who {
        Who::Anonymous => return (401, Some("unauthenticated")),
        Who::Stranger | Who::PlatformAdmin => return (404, Some("not_found")),
        Who::Member(role) => role,
        Who::AdminKey => Role::Admin,
    };
    if suspended {
        return (403, Some("tenant_suspended"));
    }
    // Leaving is for users; a key removing a member is removing someone else.
    let min_role = if route.path.contains("{me}") && who == Who::AdminKey { Role::Admin } else { route.min_role };
    if role < min_role {
        return (403, Some("forbidden"));
    }
    if let Some(feature) = route.feature
        && !plan_has(plan, feature)
    {
        return (402, Some("plan_required"));
    }
    // The free tenants of the table hold 3 projects and 5 members: at or
    // over both limits.
    if route.counted && plan == "free" {
        return (402, Some("quota_exceeded"));
    }
    (route.ok, None)
}

struct TableTenant {
    tenant: Tenant,
    slug: String,
    plan: &'static str,
    suspended: bool,
    tokens: Vec<(Role, String)>,
    key: String,
    project: String,
    task: String,
    target: String,
}

async fn insert_project(db: &Db, tenant: &Tenant, name: &str) -> TestResult<String> {
    let new = NewProject { name: name.into(), description: String::new() };
    let project = db.tenant(tenant.scope(), async |c| Ok::<_, ApiError>(create_project(c, new).await?)).await?;
    Ok(project.id.to_string())
}

async fn insert_task(db: &Db, tenant: &Tenant, project: &str) -> TestResult<String> {
    let project = project.parse()?;
    let new = NewTask { title: "t".into(), done: false };
    let task = db.tenant(tenant.scope(), async |c| Ok::<_, ApiError>(create_task(c, project, new).await?)).await?;
    Ok(task.ok_or("no project")?.id.to_string())
}

/// An admin API key of `tenant`, written straight to the database (a free
/// tenant cannot create one, but keeps those made before a downgrade).
async fn insert_key(db: &Db, tenant: &Tenant) -> TestResult<(String, String)> {
    use diesel::sql_types::{Bytea, Uuid as SqlUuid};
    use diesel_async::RunQueryDsl;
    let (key, hash) = plinth_identity::sessions::new_api_key()?;
    let id = uuid::Uuid::now_v7();
    let tenant_id = tenant.id.0;
    db.platform(async |c| {
        diesel::sql_query(
            "INSERT INTO public.api_keys (id, tenant_id, name, role, prefix, token_hash) \
             VALUES ($1, $2, 'table', 'admin', 'plk_', $3)",
        )
        .bind::<SqlUuid, _>(id)
        .bind::<SqlUuid, _>(tenant_id)
        .bind::<Bytea, _>(&hash[..])
        .execute(c)
        .await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok((key, id.to_string()))
}

async fn user_id_of(app: &TestApp, slug: &str, token: &str) -> TestResult<String> {
    let me: Value =
        app.http.get(app.url("/v1/me")).bearer_auth(token).header("x-tenant", slug).send().await?.json().await?;
    Ok(me["user"]["id"].as_str().ok_or("no user id")?.to_owned())
}

async fn table_tenant(app: &TestApp, plan: &'static str, suspended: bool) -> TestResult<TableTenant> {
    let slug = format!("{plan}-{}", if suspended { "off" } else { "on" });
    let tenant = app.create_tenant_on(&slug, plan).await?;
    let owner = app.token(&slug).ok_or("no owner token")?;
    let mut tokens = vec![(Role::Owner, owner)];
    for role in [Role::Admin, Role::Member, Role::Viewer] {
        tokens.push((role, member(&app.db, &tenant, role).await?));
    }
    let target_token = member(&app.db, &tenant, Role::Viewer).await?;
    let target = user_id_of(app, &slug, &target_token).await?;
    let project = insert_project(&app.db, &tenant, "table").await?;
    let task = insert_task(&app.db, &tenant, &project).await?;
    if plan == "free" {
        insert_project(&app.db, &tenant, "second").await?;
        insert_project(&app.db, &tenant, "third").await?;
    }
    let (key, _) = insert_key(&app.db, &tenant).await?;
    if suspended {
        set_status(&app.db, tenant.id, TenantStatus::Suspended).await?;
    }
    Ok(TableTenant { tenant, slug, plan, suspended, tokens, key, project, task, target })
}

/// Sends `route` as `who` to `t`; returns the status and error code.
async fn call(
    app: &TestApp,
    t: &TableTenant,
    route: &Route,
    who: Who,
    n: usize,
    strangers: &(String, String),
) -> TestResult<(u16, Option<String>)> {
    let token = match who {
        Who::Anonymous => None,
        Who::Stranger => Some(strangers.0.clone()),
        Who::PlatformAdmin => Some(strangers.1.clone()),
        Who::Member(role) => t.tokens.iter().find(|(r, _)| *r == role).map(|(_, tok)| tok.clone()),
        Who::AdminKey => Some(t.key.clone()),
    };
    let mut path = route.path.replace("{p}", &t.project).replace("{t}", &t.task).replace("{target}", &t.target);
    let mut me_token = None;
    if path.contains("{new_p}") {
        path = path.replace("{new_p}", &insert_project(&app.db, &t.tenant, "doomed").await?);
    }
    if path.contains("{new_t}") {
        path = path.replace("{new_t}", &insert_task(&app.db, &t.tenant, &t.project).await?);
    }
    if path.contains("{new_key}") {
        path = path.replace("{new_key}", &insert_key(&app.db, &t.tenant).await?.1);
    }
    if path.contains("{other}") {
        let other = member(&app.db, &t.tenant, Role::Viewer).await?;
        path = path.replace("{other}", &user_id_of(app, &t.slug, &other).await?);
    }
    if path.contains("{me}") {
        // Leaving: a fresh member of the caller's role, so the others stay.
        let id = match who {
            Who::Member(role) => {
                let fresh = member(&app.db, &t.tenant, role).await?;
                let id = user_id_of(app, &t.slug, &fresh).await?;
                me_token = Some(fresh);
                id
            }
            // A key has no membership to leave: it removes someone else.
            _ => {
                let other = member(&app.db, &t.tenant, Role::Viewer).await?;
                user_id_of(app, &t.slug, &other).await?
            }
        };
        path = path.replace("{me}", &id);
    }
    let body = match (route.method, route.path) {
        ("POST", "/v1/projects") => Some(json!({ "name": "new" })),
        ("PATCH", "/v1/projects/{p}") => Some(json!({ "name": "renamed" })),
        ("POST", "/v1/projects/{p}/tasks") => Some(json!({ "title": "new" })),
        ("PATCH", "/v1/tasks/{t}") => Some(json!({ "done": true })),
        ("PATCH", "/v1/members/{target}") => Some(json!({ "role": "viewer" })),
        ("POST", "/v1/invitations") => Some(json!({ "email": format!("invitee-{n}@example.com"), "role": "viewer" })),
        ("POST", "/v1/api-keys") => Some(json!({ "name": format!("k{n}"), "role": "viewer" })),
        _ => None,
    };
    let method = Method::from_bytes(route.method.as_bytes())?;
    let mut req = app.http.request(method, app.url(&path)).header("x-tenant", &t.slug);
    if let Some(token) = me_token.or(token) {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let code = if status >= 400 {
        let body: Value = res.json().await?;
        body["error"]["code"].as_str().map(str::to_owned)
    } else {
        None
    };
    Ok((status, code))
}

#[tokio::test]
async fn every_route_role_plan_and_status_gets_the_status_the_guide_defines() -> TestResult {
    let app = TestApp::spawn().await?;
    let lobby = app.create_tenant("lobby").await?;
    let strangers = (member(&app.db, &lobby, Role::Owner).await?, platform_admin(&app, &lobby).await?);
    let mut tenants = Vec::new();
    for plan in ["free", "pro", "enterprise"] {
        for suspended in [false, true] {
            tenants.push(table_tenant(&app, plan, suspended).await?);
        }
    }
    let mut failures = Vec::new();
    let mut n = 0;
    for t in &tenants {
        for route in ROUTES.iter() {
            for who in WHO {
                n += 1;
                let (status, code) = call(&app, t, route, who, n, &strangers).await?;
                let (want_status, want_code) = expected(route, who, t.plan, t.suspended);
                if status != want_status || code.as_deref() != want_code {
                    failures.push(format!(
                        "{} {} as {who:?} on {} ({}): got {status} {code:?}, want {want_status} {want_code:?}",
                        route.method,
                        route.path,
                        t.plan,
                        if t.suspended { "suspended" } else { "active" },
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {n} cases differ:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn platform_routes_need_the_platform_grant() -> TestResult {
    let app = TestApp::spawn().await?;
    let lobby = app.create_tenant("lobby").await?;
    let victim = app.create_tenant("victim").await?;
    let owner = app.token("lobby").ok_or("no token")?;
    let admin = platform_admin(&app, &lobby).await?;
    let id = victim.id.to_string();
    let routes: Vec<(Method, String, Option<Value>, u16)> = vec![
        (Method::GET, "/v1/admin/tenants".into(), None, 200),
        (Method::GET, format!("/v1/admin/tenants/{id}"), None, 200),
        (Method::PUT, format!("/v1/admin/tenants/{id}/plan"), Some(json!({ "plan": "pro" })), 200),
        (Method::POST, format!("/v1/admin/tenants/{id}/suspend"), None, 200),
        (Method::POST, format!("/v1/admin/tenants/{id}/reactivate"), None, 200),
        (Method::DELETE, format!("/v1/admin/tenants/{id}"), None, 204),
    ];
    for (method, path, body, ok) in routes {
        let send = |token: Option<&str>| {
            let mut req = app.http.request(method.clone(), app.url(&path));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = &body {
                req = req.json(body);
            }
            req.send()
        };
        assert_error(send(None).await?, 401, "unauthenticated").await?;
        // A tenant owner is nobody on platform routes.
        assert_error(send(Some(&owner)).await?, 403, "forbidden").await?;
        let res = send(Some(&admin)).await?;
        assert_eq!(res.status().as_u16(), ok, "{method} {path}: {}", res.text().await?);
    }
    // The platform grant opens no tenant: the admin is not a member of lobby's neighbour.
    let res = app.http.get(app.url("/v1/projects")).bearer_auth(&admin).header("x-tenant", "lobby").send().await?;
    assert_eq!(res.status(), 200, "the admin's own lobby membership still works");
    let other = app.create_tenant("other").await?;
    let res = app.http.get(app.url("/v1/projects")).bearer_auth(&admin).header("x-tenant", &other.slug).send().await?;
    assert_error(res, 404, "not_found").await?;
    // An unknown plan is refused by name.
    let res = app
        .http
        .put(app.url(&format!("/v1/admin/tenants/{}/plan", other.id)))
        .bearer_auth(&admin)
        .json(&json!({ "plan": "gold" }))
        .send()
        .await?;
    let body = assert_error(res, 400, "invalid_request").await?;
    assert_eq!(body["error"]["details"][0]["field"], "plan");
    Ok(())
}

#[tokio::test]
async fn plan_required_names_the_cheapest_plan_that_grants_the_feature() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let body = assert_error(app.req(Method::GET, "acme", "/v1/audit-log").send().await?, 402, "plan_required").await?;
    assert_eq!((body["error"]["feature"].as_str(), body["error"]["plan"].as_str()), (Some("audit_log"), Some("pro")));
    app.set_plan("acme", "pro").await?;
    assert_eq!(app.req(Method::GET, "acme", "/v1/audit-log").send().await?.status(), 200);
    let body = assert_error(app.req(Method::GET, "acme", "/v1/export").send().await?, 402, "plan_required").await?;
    assert_eq!(body["error"]["plan"], "enterprise");
    Ok(())
}

#[tokio::test]
async fn the_tenant_shows_its_plan_features_and_limits_with_usage() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    member(&app.db, &acme, Role::Viewer).await?;
    app.create_project("acme", "one").await?;
    let body: Value = app.req(Method::GET, "acme", "/v1/tenant").send().await?.json().await?;
    assert_eq!(body["plan"], "free");
    assert_eq!(body["tenant"]["slug"], "acme");
    assert_eq!(body["role"], "owner");
    assert_eq!(body["features"], json!([]));
    assert_eq!(body["limits"]["projects"], json!({ "used": 1, "max": 3 }));
    assert_eq!(body["limits"]["members"], json!({ "used": 2, "max": 3 }));
    assert_eq!(body["limits"]["api_keys"], json!({ "used": 0, "max": null }));
    app.set_plan("acme", "enterprise").await?;
    let body: Value = app.req(Method::GET, "acme", "/v1/tenant").send().await?.json().await?;
    assert_eq!(body["features"], json!(["api_keys", "audit_log", "custom_domains", "data_export", "sso"]));
    assert_eq!(body["limits"]["members"], json!({ "used": 2, "max": null }));
    Ok(())
}

#[tokio::test]
async fn twenty_concurrent_creates_at_a_limit_of_three_make_three() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(&testdb, AppOptions { pool_size: Some(20), ..Default::default() }).await?;
    app.create_tenant("acme").await?;
    let creates =
        (0..20).map(|i| app.req(Method::POST, "acme", "/v1/projects").json(&json!({ "name": format!("p{i}") })).send());
    let results = futures_util::future::join_all(creates).await;
    let mut created = 0;
    for res in results {
        let res = res?;
        if res.status() == 201 {
            created += 1;
        } else {
            let body = assert_error(res, 402, "quota_exceeded").await?;
            assert_eq!((body["error"]["limit"].as_u64(), body["error"]["used"].as_u64()), (Some(3), Some(3)));
        }
    }
    assert_eq!(created, 3, "exactly the limit is created");
    let list: Value = app.req(Method::GET, "acme", "/v1/projects").send().await?.json().await?;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(3));

    // Seats: the owner holds one of three; twenty invitations at once make two.
    let invites = (0..20).map(|i| {
        app.req(Method::POST, "acme", "/v1/invitations")
            .json(&json!({ "email": format!("i{i}@example.com"), "role": "viewer" }))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(invites)
        .await
        .into_iter()
        .map(|r| r.map(|r| r.status().as_u16()))
        .collect::<Result<_, _>>()?;
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 2, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201 || *s == 402), "{statuses:?}");
    Ok(())
}

#[tokio::test]
async fn a_downgrade_keeps_everything_but_stops_growth() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant_on("acme", "pro").await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.create_project("acme", &format!("p{i}")).await?["id"].as_str().ok_or("id")?.to_owned());
    }
    let key: Value = app
        .req(Method::POST, "acme", "/v1/api-keys")
        .json(&json!({ "name": "ci", "role": "viewer" }))
        .send()
        .await?
        .json()
        .await?;
    app.set_plan("acme", "free").await?;
    // Nothing is deleted: all five are listed and readable.
    let list: Value = app.req(Method::GET, "acme", "/v1/projects").send().await?.json().await?;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(5));
    assert_eq!(app.req(Method::GET, "acme", &format!("/v1/projects/{}", ids[4])).send().await?.status(), 200);
    // The key made on pro still reads data; managing keys needs pro again.
    let secret = key["key"].as_str().ok_or("no key")?;
    let res = app.http.get(app.url("/v1/projects")).bearer_auth(secret).header("x-tenant", "acme").send().await?;
    assert_eq!(res.status(), 200);
    assert_error(app.req(Method::GET, "acme", "/v1/api-keys").send().await?, 402, "plan_required").await?;
    // Creating is refused until under the limit; deleting works.
    let res = app.req(Method::POST, "acme", "/v1/projects").json(&json!({ "name": "six" })).send().await?;
    let body = assert_error(res, 402, "quota_exceeded").await?;
    assert_eq!((body["error"]["limit"].as_u64(), body["error"]["used"].as_u64()), (Some(3), Some(5)));
    for id in &ids[..3] {
        assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/projects/{id}")).send().await?.status(), 204);
    }
    app.create_project("acme", "back under").await?;
    Ok(())
}

#[tokio::test]
async fn an_operator_adds_a_plan_and_a_limit_without_code() -> TestResult {
    let dir = crate::harness::TempDir::new("plans")?;
    let path = dir.path.join("plans.toml");
    let catalog = format!(
        "{}\n[[plan]]\nname = \"team\"\nincludes = \"free\"\nfeatures = [\"api_keys\"]\nlimits = {{ api_keys = 2 }}\n",
        plinth_access::catalog::DEFAULT
    );
    std::fs::write(&path, catalog)?;
    let path: &'static str = Box::leak(path.to_string_lossy().into_owned().into_boxed_str());
    let testdb = TestDb::migrated().await?;
    let app =
        TestApp::spawn_on(&testdb, AppOptions { settings: vec![("PLINTH_PLANS_FILE", path)], ..Default::default() })
            .await?;
    app.create_tenant_on("acme", "team").await?;
    let create =
        || app.req(Method::POST, "acme", "/v1/api-keys").json(&json!({ "name": "k", "role": "viewer" })).send();
    assert_eq!(create().await?.status(), 201);
    assert_eq!(create().await?.status(), 201);
    let body = assert_error(create().await?, 402, "quota_exceeded").await?;
    assert_eq!((body["error"]["quota"].as_str(), body["error"]["limit"].as_u64()), (Some("api_keys"), Some(2)));
    // The audit log is not part of "team": the cheapest plan with it is pro.
    let body = assert_error(app.req(Method::GET, "acme", "/v1/audit-log").send().await?, 402, "plan_required").await?;
    assert_eq!(body["error"]["plan"], "pro");
    Ok(())
}

#[tokio::test]
async fn a_change_made_through_one_instance_is_enforced_by_another_within_a_second() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let one = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let two = TestApp::spawn_on(&testdb, AppOptions::default()).await?.with_tokens_of(&one);
    let acme = one.create_tenant("acme").await?;
    let lobby = one.create_tenant("lobby").await?;
    let admin = platform_admin(&one, &lobby).await?;
    let editor = member(&one.db, &acme, Role::Member).await?;
    let editor_id = user_id_of(&one, "acme", &editor).await?;
    let create = |app: &TestApp| {
        app.http
            .post(app.url("/v1/projects"))
            .bearer_auth(&editor)
            .header("x-tenant", "acme")
            .json(&json!({ "name": "x" }))
            .send()
    };
    assert_eq!(create(&two).await?.status(), 201, "instance two knows the editor");

    // A role change through one...
    let res = one
        .req(Method::PATCH, "acme", &format!("/v1/members/{editor_id}"))
        .json(&json!({ "role": "viewer" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let took = eventually(Duration::from_secs(1), || async { Ok(create(&two).await?.status() == 403) }).await?;
    eprintln!("role change seen by the other instance after {took:?}");

    // ...a plan change through one's platform admin route...
    assert_error(two.req(Method::GET, "acme", "/v1/audit-log").send().await?, 402, "plan_required").await?;
    let res = one
        .http
        .put(one.url(&format!("/v1/admin/tenants/{}/plan", acme.id)))
        .bearer_auth(&admin)
        .json(&json!({ "plan": "pro" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    eventually(Duration::from_secs(1), || async {
        Ok(two.req(Method::GET, "acme", "/v1/audit-log").send().await?.status() == 200)
    })
    .await?;

    // ...a revoked key...
    let key: Value = one
        .req(Method::POST, "acme", "/v1/api-keys")
        .json(&json!({ "name": "k", "role": "viewer" }))
        .send()
        .await?
        .json()
        .await?;
    let (secret, key_id) =
        (key["key"].as_str().ok_or("key")?.to_owned(), key["api_key"]["id"].as_str().ok_or("id")?.to_owned());
    let read = || two.http.get(two.url("/v1/projects")).bearer_auth(&secret).header("x-tenant", "acme").send();
    assert_eq!(read().await?.status(), 200);
    assert_eq!(one.req(Method::DELETE, "acme", &format!("/v1/api-keys/{key_id}")).send().await?.status(), 204);
    eventually(Duration::from_secs(1), || async { Ok(read().await?.status() == 401) }).await?;

    // ...and a removed member.
    let res = one.req(Method::DELETE, "acme", &format!("/v1/members/{editor_id}")).send().await?;
    assert_eq!(res.status(), 204);
    let list = || two.http.get(two.url("/v1/projects")).bearer_auth(&editor).header("x-tenant", "acme").send();
    eventually(Duration::from_secs(1), || async { Ok(list().await?.status() == 404) }).await?;
    Ok(())
}

/// Every decision of the table's principals, straight from an engine.
async fn decisions(access: &Access, subjects: &[(Subject, plinth_tenants::TenantId)]) -> TestResult<Vec<Decision>> {
    let needs = [
        Need { resource: "projects", action: Action::Read, feature: None },
        Need { resource: "projects", action: Action::Write, feature: None },
        Need { resource: "projects", action: Action::Delete, feature: None },
        Need { resource: "members", action: Action::Manage, feature: None },
        Need { resource: "api_keys", action: Action::Manage, feature: Some("api_keys") },
        Need { resource: "audit_log", action: Action::Manage, feature: Some("audit_log") },
        Need { resource: "export", action: Action::Manage, feature: Some("data_export") },
        Need { resource: "billing", action: Action::Manage, feature: None },
    ];
    let mut out = Vec::new();
    for (subject, tenant) in subjects {
        for need in &needs {
            out.push(access.check(*subject, Some(*tenant), need).await?);
        }
    }
    Ok(out)
}

/// An engine without a listener, loaded as if one had just connected, so
/// checks come from the engine (not from the database).
async fn current_engine(db: &Db) -> TestResult<std::sync::Arc<Access>> {
    let access = Access::start(db.clone(), Catalog::default_catalog()?, Arc::new(MembershipRoles)).await?;
    (access.listen_handlers()[0].1)(plinth_tenants::notify::ListenEvent::Connected);
    access.reload().await?;
    assert!(access.is_current());
    Ok(access)
}

#[tokio::test]
async fn a_check_answers_the_same_with_100_000_tenants_loaded() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(4)?;
    let app = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let mut subjects = Vec::new();
    for plan in ["free", "pro", "enterprise"] {
        let tenant = app.create_tenant_on(plan, plan).await?;
        for role in [Role::Viewer, Role::Member, Role::Admin, Role::Owner] {
            let token = member(&db, &tenant, role).await?;
            let user: uuid::Uuid = user_id_of(&app, plan, &token).await?.parse()?;
            subjects.push((Subject::Member(tenant.id, UserId(user)), tenant.id));
        }
    }
    let small = current_engine(&db).await?;
    let before = decisions(&small, &subjects).await?;
    assert!(before.iter().any(|d| matches!(d, Decision::Allowed { .. })));
    assert!(before.iter().any(|d| matches!(d, Decision::PlanRequired { .. })));
    assert!(before.iter().any(|d| matches!(d, Decision::Forbidden)));

    // 100,000 more tenants, each with an owner, an admin and a viewer.
    let client = testdb.client().await?;
    client
        .batch_execute(
            "INSERT INTO public.tenants (id, slug, name, schema_name, plan) \
             SELECT gen_random_uuid(), 'bulk-' || i, 'Bulk ' || i, 't_' || lpad(to_hex(i), 32, '0'), \
                    (ARRAY['free', 'pro', 'enterprise'])[1 + i % 3] \
             FROM generate_series(1, 100000) AS i;
             INSERT INTO public.users (id, email, password_hash) \
             SELECT gen_random_uuid(), 'bulk-' || i || '@example.com', 'none' FROM generate_series(1, 300000) AS i;
             INSERT INTO public.memberships (tenant_id, user_id, role) \
             SELECT t.id, u.id, (ARRAY['owner', 'admin', 'viewer'])[1 + (u.n - 1) % 3] \
             FROM (SELECT id, row_number() OVER () AS n FROM public.tenants WHERE slug LIKE 'bulk-%') t \
             JOIN (SELECT id, row_number() OVER () AS n FROM public.users WHERE email LIKE 'bulk-%') u \
               ON (u.n - 1) / 3 + 1 = t.n;",
        )
        .await?;
    let large = current_engine(&db).await?;
    let (tenants, links) = large.counts();
    assert!(tenants > 100_000 && links > 300_000, "loaded {tenants} tenants and {links} links");
    assert_eq!(decisions(&large, &subjects).await?, before);
    Ok(())
}

#[tokio::test]
async fn while_the_listener_is_away_checks_read_the_database() -> TestResult {
    use plinth_tenants::notify::ListenEvent;
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(4)?;
    let app = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let acme = app.create_tenant("acme").await?;
    let token = member(&db, &acme, Role::Admin).await?;
    let user = UserId(user_id_of(&app, "acme", &token).await?.parse()?);
    let subject = Subject::Member(acme.id, user);
    let manage = Need { resource: "members", action: Action::Manage, feature: None };

    // An engine with no listener: its events are played by hand.
    let access = Access::start(db.clone(), Catalog::default_catalog()?, Arc::new(MembershipRoles)).await?;
    let handlers = access.listen_handlers();
    let connection = &handlers[0].1;
    connection(ListenEvent::Connected);
    access.reload().await?;
    assert!(access.is_current());
    assert!(matches!(access.check(subject, Some(acme.id), &manage).await?, Decision::Allowed { .. }));

    // A demotion whose notification this engine never hears: while it
    // believes itself connected it answers from memory (what the listener
    // exists to prevent)...
    let client = testdb.client().await?;
    client
        .execute(
            "UPDATE public.memberships SET role = 'viewer' WHERE tenant_id = $1 AND user_id = $2",
            &[&acme.id.0, &user.0],
        )
        .await?;
    assert!(matches!(access.check(subject, Some(acme.id), &manage).await?, Decision::Allowed { .. }));
    // ...and once the listener is lost it reads the rows for every check.
    connection(ListenEvent::Disconnected);
    assert!(!access.is_current());
    assert_eq!(access.check(subject, Some(acme.id), &manage).await?, Decision::Forbidden);
    let read = Need { resource: "projects", action: Action::Read, feature: None };
    assert!(matches!(access.check(subject, Some(acme.id), &read).await?, Decision::Allowed { .. }));
    // Reconnected: everything is reloaded, and the engine answers again.
    connection(ListenEvent::Connected);
    access.reload().await?;
    assert_eq!(access.check(subject, Some(acme.id), &manage).await?, Decision::Forbidden);
    Ok(())
}

/// A pending invitation with a known token, written straight to the database.
async fn invitation(testdb: &TestDb, tenant: &Tenant, email: &str) -> TestResult<String> {
    let (token, hash) = plinth_identity::sessions::new_token()?;
    testdb
        .client()
        .await?
        .execute(
            "INSERT INTO public.invitations (id, tenant_id, email, role, token_hash, expires_at) \
             VALUES ($1, $2, $3, 'viewer', $4, now() + interval '1 day')",
            &[&uuid::Uuid::now_v7(), &tenant.id.0, &email, &&hash[..]],
        )
        .await?;
    Ok(token)
}

#[tokio::test]
async fn an_invitation_holds_its_seat_until_a_downgrade_fills_the_plan() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    member(&app.db, &acme, Role::Member).await?;
    let held = invitation(&testdb, &acme, "held@example.com").await?;
    let late = invitation(&testdb, &acme, "late@example.com").await?;
    let accept = |token: String| {
        app.http
            .post(app.url("/v1/invitations/accept"))
            .json(&json!({ "token": token, "password": "a long enough passphrase" }))
            .send()
    };
    // Free: 3 seats. Two members and two pending invitations: over the limit
    // for a new invitation...
    app.set_plan("acme", "free").await?;
    let res = app
        .req(Method::POST, "acme", "/v1/invitations")
        .json(&json!({ "email": "more@example.com", "role": "viewer" }))
        .send()
        .await?;
    let body = assert_error(res, 402, "quota_exceeded").await?;
    assert_eq!((body["error"]["limit"].as_u64(), body["error"]["used"].as_u64()), (Some(3), Some(4)));
    // ...but an invitation already holds its seat: the first to accept joins
    // (3 members), the next finds the plan full.
    assert_eq!(accept(held).await?.status(), 200);
    let body = assert_error(accept(late.clone()).await?, 402, "quota_exceeded").await?;
    assert_eq!(body["error"]["used"].as_u64(), Some(3));
    // Back on pro, the same link still works: refusing it used nothing up.
    app.set_plan("acme", "pro").await?;
    assert_eq!(accept(late).await?.status(), 200);
    Ok(())
}
