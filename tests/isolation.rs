//! Tenant isolation: another tenant's ids are 404 on every route, and a
//! concurrent hammer alternating tenants over a small pool never sees a row of
//! the other tenant — directly and through PgBouncer in transaction mode.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{AppOptions, PgBouncer, TestApp, TestDb, TestResult, assert_error};

struct Fixture {
    project: String,
    task: String,
}

async fn seed(app: &TestApp, tenant: &str) -> TestResult<Fixture> {
    let project = app.create_project(tenant, &format!("{tenant}-main")).await?;
    let project = project["id"].as_str().ok_or("no id")?.to_owned();
    for i in 0..3 {
        app.create_project(tenant, &format!("{tenant}-extra-{i}")).await?;
    }
    let res = app
        .req(Method::POST, tenant, &format!("/v1/projects/{project}/tasks"))
        .json(&json!({ "title": format!("{tenant}-task") }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let task: Value = res.json().await?;
    Ok(Fixture { project, task: task["id"].as_str().ok_or("no id")?.to_owned() })
}

/// Every tenant route, tried by `intruder` with `victim`'s ids.
async fn every_route_refuses_foreign_ids(app: &TestApp, intruder: &str, victim: &Fixture) -> TestResult {
    let p = &victim.project;
    let t = &victim.task;
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/v1/projects/{p}"), None),
        (Method::PATCH, format!("/v1/projects/{p}"), Some(json!({ "name": "pwned" }))),
        (Method::DELETE, format!("/v1/projects/{p}"), None),
        (Method::GET, format!("/v1/projects/{p}/tasks"), None),
        (Method::POST, format!("/v1/projects/{p}/tasks"), Some(json!({ "title": "planted" }))),
        (Method::PATCH, format!("/v1/tasks/{t}"), Some(json!({ "done": true }))),
        (Method::DELETE, format!("/v1/tasks/{t}"), None),
    ];
    for (method, path, body) in attempts {
        let mut req = app.req(method.clone(), intruder, &path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await?;
        assert_eq!(res.status(), 404, "{method} {path} as {intruder}");
        assert_error(res, 404, "not_found").await?;
    }
    Ok(())
}

async fn isolation_holds(app: &TestApp) -> TestResult {
    // Pro: the seed goes past the free plan's project limit.
    app.create_tenant_on("alpha", "pro").await?;
    app.create_tenant_on("bravo", "pro").await?;
    let a = seed(app, "alpha").await?;
    let b = seed(app, "bravo").await?;
    every_route_refuses_foreign_ids(app, "bravo", &a).await?;
    every_route_refuses_foreign_ids(app, "alpha", &b).await?;

    // The victim's data is untouched.
    let project: Value =
        app.req(Method::GET, "alpha", &format!("/v1/projects/{}", a.project)).send().await?.json().await?;
    assert_eq!(project["name"], "alpha-main");
    let tasks: Value =
        app.req(Method::GET, "alpha", &format!("/v1/projects/{}/tasks", a.project)).send().await?.json().await?;
    assert_eq!(tasks["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(tasks["data"][0]["done"], false);
    assert_eq!(tasks["data"][0]["title"], "alpha-task");
    Ok(())
}

/// ≥ 8 tasks × ≥ 200 requests alternating tenants; every response must hold
/// only its own tenant's rows.
async fn hammer(app: Arc<TestApp>) -> TestResult<usize> {
    let tenants = ["alpha", "bravo"];
    let mut own_ids = Vec::new();
    for t in tenants {
        let body: Value = app.req(Method::GET, t, "/v1/projects?limit=100").send().await?.json().await?;
        let ids: Vec<String> = body["data"]
            .as_array()
            .ok_or("no data")?
            .iter()
            .filter_map(|p| p["id"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(ids.len(), 4);
        own_ids.push(ids);
    }
    let own_ids = Arc::new(own_ids);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..8usize {
        let app = Arc::clone(&app);
        let own_ids = Arc::clone(&own_ids);
        workers.spawn(async move {
            let mut checked = 0usize;
            for i in 0..200usize {
                let which = (worker + i) % 2;
                let tenant = tenants[which];
                if i % 3 == 0 {
                    // A foreign id must not be found…
                    let foreign = &own_ids[1 - which][i % 4];
                    let res = app.req(Method::GET, tenant, &format!("/v1/projects/{foreign}")).send().await?;
                    if res.status() != 404 {
                        return Err(format!("{tenant} reached a foreign project: {}", res.status()).into());
                    }
                } else if i % 3 == 1 {
                    // …an own id must be, with its own name…
                    let own = &own_ids[which][i % 4];
                    let body: Value =
                        app.req(Method::GET, tenant, &format!("/v1/projects/{own}")).send().await?.json().await?;
                    let name = body["name"].as_str().unwrap_or_default();
                    if !name.starts_with(tenant) {
                        return Err(format!("{tenant} got {body}").into());
                    }
                } else {
                    // …and a list holds only own rows.
                    let body: Value =
                        app.req(Method::GET, tenant, "/v1/projects?limit=100").send().await?.json().await?;
                    let rows = body["data"].as_array().ok_or("no data")?;
                    if rows.len() != 4
                        || rows.iter().any(|p| !p["name"].as_str().unwrap_or_default().starts_with(tenant))
                    {
                        return Err(format!("{tenant} list leaked: {body}").into());
                    }
                }
                checked += 1;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(checked)
        });
    }
    let mut total = 0;
    while let Some(result) = workers.join_next().await {
        total += result??;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_reach_each_other_directly() -> TestResult {
    let testdb = TestDb::migrated().await?;
    // A pool of 2 so requests of both tenants constantly share connections.
    let app = Arc::new(TestApp::spawn_on(&testdb, AppOptions { pool_size: Some(2), ..Default::default() }).await?);
    isolation_holds(&app).await?;
    assert_eq!(hammer(Arc::clone(&app)).await?, 1600);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_reach_each_other_through_pgbouncer() -> TestResult {
    let testdb = TestDb::migrated().await?;
    // Two server connections shared by a client pool of 6: transaction
    // pooling hands each transaction whichever server connection is free.
    let bouncer = PgBouncer::start(&testdb, 2).await?;
    let options = AppOptions {
        database_url: Some(bouncer.url(&testdb.name)),
        pool_size: Some(6),
        statement_cache: Some(false),
        ..Default::default()
    };
    let app = Arc::new(TestApp::spawn_on(&testdb, options).await?);
    isolation_holds(&app).await?;
    assert_eq!(hammer(Arc::clone(&app)).await?, 1600);

    // The pooled server connections carry no tenant schema between transactions.
    let (client, conn) = tokio_postgres::connect(&bouncer.url(&testdb.name), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    for _ in 0..10 {
        // Simple protocol: a prepared statement could not cross PgBouncer here.
        let rows = client.simple_query("SHOW search_path").await?;
        let path = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        let path = path.ok_or("no search_path")?;
        assert!(!path.contains("t_"), "a server connection kept a tenant search_path: {path}");
    }
    Ok(())
}

/// A request cancelled in the middle of a tenant transaction (client gone,
/// timeout) must not hand its connection, still inside that tenant's
/// transaction, to the next user of the pool.
#[tokio::test]
async fn a_cancelled_tenant_transaction_never_reaches_the_next_user() -> TestResult {
    use diesel::sql_types::{Nullable, Text};
    use diesel_async::RunQueryDsl;
    use plinth_http::ApiError;

    #[derive(diesel::QueryableByName)]
    struct Current {
        #[diesel(sql_type = Nullable<Text>)]
        value: Option<String>,
    }

    let testdb = TestDb::migrated().await?;
    let db = testdb.db(1)?; // one connection: the next user gets the same one, or a new one
    let slug = |s: &str| plinth_tenants::Slug::parse(s);
    let a = plinth_tenants::registry::create(&db, &slug("alpha")?, "Alpha").await?;
    let b = plinth_tenants::registry::create(&db, &slug("bravo")?, "Bravo").await?;

    for _ in 0..3 {
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            db.tenant(a.scope(), async |c| {
                diesel::sql_query("INSERT INTO projects (id, name) VALUES (gen_random_uuid(), 'half-done')")
                    .execute(c.pg())
                    .await?;
                diesel::sql_query("SELECT pg_sleep(1)").execute(c.pg()).await?;
                Ok::<_, ApiError>(())
            }),
        )
        .await;
        assert!(cancelled.is_err(), "the transaction was cut off");

        let in_b: Current = db
            .tenant(b.scope(), async |c| {
                Ok::<_, ApiError>(diesel::sql_query("SELECT current_schema() AS value").get_result(c.pg()).await?)
            })
            .await?;
        assert_eq!(in_b.value.as_deref(), Some(b.schema.as_str()));
        let path: Current = db
            .platform(async |c| {
                Ok::<_, ApiError>(
                    diesel::sql_query("SELECT current_setting('search_path') AS value").get_result(c).await?,
                )
            })
            .await?;
        assert!(!path.value.unwrap_or_default().contains("t_"), "a tenant search_path survived the cancellation");
    }
    // Nothing of the cancelled transactions was committed by whoever came next.
    let client = testdb.client().await?;
    let half_done: i64 =
        client.query_one(&format!("SELECT count(*) FROM {}.projects", a.schema.quoted()), &[]).await?.get(0);
    assert_eq!(half_done, 0, "a cancelled transaction's writes were committed");
    Ok(())
}

/// Platform rows that belong to a tenant (memberships, invitations, API
/// keys) are reached only through the tenant's own scope: an owner acting in
/// their own tenant, naming another tenant's member or key, finds nothing
/// and changes nothing.
#[tokio::test]
async fn another_tenants_members_and_keys_are_out_of_reach_from_ones_own() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant_on("alpha", "pro").await?;
    let bravo = app.create_tenant_on("bravo", "pro").await?;
    crate::harness::member(&app.db, &bravo, plinth_access::Role::Member).await?;
    let listed: Value = app.req(Method::GET, "bravo", "/v1/members").send().await?.json().await?;
    let bravo_member = listed["data"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "member"))
        .and_then(|m| m["user_id"].as_str())
        .ok_or("bravo has no plain member")?
        .to_owned();
    let bravo_email = listed["data"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "member"))
        .and_then(|m| m["email"].as_str())
        .ok_or("no email")?
        .to_owned();
    let key: Value = app
        .req(Method::POST, "bravo", "/v1/api-keys")
        .json(&json!({ "name": "ci", "role": "member" }))
        .send()
        .await?
        .json()
        .await?;
    let bravo_key = key["api_key"]["id"].as_str().ok_or("no key id")?.to_owned();

    // From alpha, as alpha's owner, aimed at bravo's rows.
    let path = format!("/v1/members/{bravo_member}");
    let patch = app.req(Method::PATCH, "alpha", &path).json(&json!({ "role": "admin" })).send().await?;
    assert_error(patch, 404, "not_found").await?;
    assert_error(app.req(Method::DELETE, "alpha", &path).send().await?, 404, "not_found").await?;
    let key_path = format!("/v1/api-keys/{bravo_key}");
    assert_error(app.req(Method::DELETE, "alpha", &key_path).send().await?, 404, "not_found").await?;
    let alpha_members: Value = app.req(Method::GET, "alpha", "/v1/members").send().await?.json().await?;
    assert!(!alpha_members.to_string().contains(&bravo_member), "{alpha_members}");
    let alpha_keys: Value = app.req(Method::GET, "alpha", "/v1/api-keys").send().await?.json().await?;
    assert!(!alpha_keys.to_string().contains(&bravo_key), "{alpha_keys}");
    // Membership elsewhere is not membership here: alpha may invite bravo's member.
    let invited =
        app.req(Method::POST, "alpha", "/v1/invitations").json(&json!({ "email": bravo_email, "role": "viewer" }));
    assert_eq!(invited.send().await?.status(), 201);

    // Bravo's rows are as they were, and bravo's audit log holds nothing from alpha.
    let after: Value = app.req(Method::GET, "bravo", "/v1/members").send().await?.json().await?;
    let role = after["data"].as_array().and_then(|m| m.iter().find(|m| m["user_id"] == bravo_member.as_str()));
    assert_eq!(role.map(|m| m["role"].clone()), Some(json!("member")), "{after}");
    let keys: Value = app.req(Method::GET, "bravo", "/v1/api-keys").send().await?.json().await?;
    assert!(keys.to_string().contains(&bravo_key), "{keys}");
    let log: Value = app.req(Method::GET, "bravo", "/v1/audit-log").send().await?.json().await?;
    let actions: Vec<&str> =
        log["data"].as_array().into_iter().flatten().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.iter().all(|a| *a == "api_key.created"), "{actions:?}");
    Ok(())
}

/// The one-round-trip read (`Db::tenant_read`) names the tenant's schema in
/// its SQL and is prepared once per connection: over one pooled connection,
/// alternating tenants, each tenant's read must be its own prepared
/// statement. Had the cache keyed it by anything but its text (one
/// statement for every tenant), a tenant would read the other's project.
#[tokio::test]
async fn a_read_in_one_round_trip_is_prepared_for_each_tenant_apart() -> TestResult {
    use diesel::sql_types::{BigInt, Uuid};
    use plinth::projects::{PROJECT_BY_ID, Project};
    use plinth_http::ApiError;
    use plinth_tenants::db::TenantSql;

    let testdb = TestDb::migrated().await?;
    let db = testdb.db(1)?; // one connection, its statements prepared after the first read
    let slug = |s: &str| plinth_tenants::Slug::parse(s);
    let a = plinth_tenants::registry::create(&db, &slug("alpha")?, "Alpha").await?;
    let b = plinth_tenants::registry::create(&db, &slug("bravo")?, "Bravo").await?;
    let client = testdb.client().await?;
    let mut projects = Vec::new();
    for t in [&a, &b] {
        let id = uuid::Uuid::now_v7();
        let sql = format!("INSERT INTO {}.projects (id, name) VALUES ($1, $2)", t.schema.quoted());
        client.execute(&sql, &[&id, &t.slug]).await?;
        projects.push(id);
    }

    for i in 0..200 {
        let (own, other) = if i % 2 == 0 { ((&a, 0), (&b, 1)) } else { ((&b, 1), (&a, 0)) };
        let found: Vec<Project> = db
            .tenant_read::<_, _, ApiError>(own.0.scope(), PROJECT_BY_ID, |q| q.bind::<Uuid, _>(projects[own.1]))
            .await?;
        assert_eq!(found.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), [own.0.slug.as_str()], "read {i}");
        let foreign: Vec<Project> = db
            .tenant_read::<_, _, ApiError>(own.0.scope(), PROJECT_BY_ID, |q| q.bind::<Uuid, _>(projects[other.1]))
            .await?;
        assert!(foreign.is_empty(), "{} read {}'s project (read {i})", own.0.slug, other.0.slug);
    }

    // Prepared once for each tenant on the connection, and kept: the reads
    // after the first two sent only Bind and Execute.
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let prepared: Count = db
        .statement(async |c| {
            use diesel_async::RunQueryDsl;
            let sql = "SELECT count(*) AS n FROM pg_prepared_statements WHERE statement LIKE 'SELECT id, name, % WHERE id = $1'";
            Ok::<_, ApiError>(diesel::sql_query(sql).get_result(c).await?)
        })
        .await?;
    assert_eq!(prepared.n, 2, "one prepared read per tenant");

    // A table left unqualified resolves through the session's search_path,
    // where no tenant table exists: the read fails instead of reading rows.
    let unqualified = TenantSql("SELECT id, name, description, created_at, updated_at FROM projects WHERE id = $1");
    let refused =
        db.tenant_read::<_, Project, ApiError>(a.scope(), unqualified, |q| q.bind::<Uuid, _>(projects[0])).await;
    assert!(refused.is_err(), "an unqualified tenant table was found: {refused:?}");
    Ok(())
}
