//! One tenant's backup and restore (`plinth tenants backup|restore`), run as
//! the real binary: back as itself after the tenant was deleted, as a copy
//! beside the original, and archives that must be refused.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TempDir, TestApp, TestResult, add_domain, assert_error, plinth_cli};
use plinth_tenants::backup::Archive;
use plinth_tenants::registry;

const PASSWORD: &str = "backup passphrase 1";

/// Signs up `email` with organization `slug`; the owner's session token.
async fn sign_up(app: &TestApp, email: &str, slug: &str) -> TestResult<String> {
    let res = app
        .http
        .post(app.url("/v1/signup"))
        .json(&json!({ "email": email, "password": PASSWORD, "organization": "Acme Rockets", "slug": slug }))
        .send()
        .await?;
    assert_eq!(res.status(), 201, "signing up {slug}");
    let body: Value = res.json().await?;
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

/// Signs in with the password: a new session token.
async fn sign_in(app: &TestApp, email: &str) -> TestResult<String> {
    let res =
        app.http.post(app.url("/v1/auth/login")).json(&json!({ "email": email, "password": PASSWORD })).send().await?;
    assert_eq!(res.status(), 200, "signing in {email}");
    let body: Value = res.json().await?;
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

fn get(app: &TestApp, token: &str, tenant: &str, path: &str) -> reqwest::RequestBuilder {
    app.http.request(Method::GET, app.url(path)).bearer_auth(token).header("x-tenant", tenant)
}

/// The names of a tenant's projects, as its member sees them.
async fn project_names(app: &TestApp, token: &str, tenant: &str) -> TestResult<Vec<String>> {
    let res = get(app, token, tenant, "/v1/projects?limit=100").send().await?;
    assert_eq!(res.status(), 200, "listing {tenant}'s projects");
    let body: Value = res.json().await?;
    Ok(body["data"].as_array().ok_or("no data")?.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
}

async fn create_project(app: &TestApp, token: &str, tenant: &str, name: &str) -> TestResult<String> {
    let res = app
        .http
        .post(app.url("/v1/projects"))
        .bearer_auth(token)
        .header("x-tenant", tenant)
        .json(&json!({ "name": name }))
        .send()
        .await?;
    assert_eq!(res.status(), 201, "creating {name} in {tenant}");
    let body: Value = res.json().await?;
    Ok(body["id"].as_str().ok_or("no id")?.to_owned())
}

#[tokio::test]
async fn a_tenant_comes_back_from_its_archive_as_a_copy_and_as_itself() -> TestResult {
    let app = TestApp::spawn().await?;
    let testdb = app.testdb.as_ref().ok_or("no test database")?;
    let owner = sign_up(&app, "owner@acme.example.com", "acme").await?;
    let intruder = sign_up(&app, "owner@globex.example.com", "globex").await?;
    let acme = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "acme").await?))
        .await?
        .ok_or("no acme")?;
    let first = create_project(&app, &owner, "acme", "Moon rocket").await?;
    create_project(&app, &owner, "acme", "Mars rocket").await?;
    let res = app
        .http
        .post(app.url(&format!("/v1/projects/{first}/tasks")))
        .bearer_auth(&owner)
        .header("x-tenant", "acme")
        .json(&json!({ "title": "Fuel it" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    add_domain(&app.db, &acme, "rockets.example.com", true).await?;
    // An API key (on a plan that has them) and a pending invitation.
    app.db
        .platform(async |c| {
            Ok::<_, plinth_http::ApiError>(registry::set_plan(c, acme.id, "pro", registry::PlanSource::Operator).await?)
        })
        .await?;
    crate::harness::eventually(std::time::Duration::from_secs(2), || async {
        let tenant: Value = get(&app, &owner, "acme", "/v1/tenant").send().await?.json().await?;
        Ok(tenant["plan"] == "pro")
    })
    .await?;
    let res = app
        .http
        .post(app.url("/v1/api-keys"))
        .bearer_auth(&owner)
        .header("x-tenant", "acme")
        .json(&json!({ "name": "deploys", "role": "viewer" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201, "creating an API key");
    let created: Value = res.json().await?;
    let key = created["key"].as_str().ok_or("no key")?.to_owned();
    let (invitation, invitation_hash) = plinth_identity::sessions::new_token()?;
    testdb
        .client()
        .await?
        .execute(
            "INSERT INTO public.invitations (id, tenant_id, email, role, token_hash, invited_by, expires_at) \
             SELECT $1, $2, 'new@acme.example.com', 'member', $3, user_id, now() + interval '1 day' \
             FROM public.memberships WHERE tenant_id = $2",
            &[&uuid::Uuid::now_v7(), &acme.id.0, &&invitation_hash[..]],
        )
        .await?;

    // Billing restricts acme (an unpaid invoice): a copy does not inherit it.
    let client = testdb.client().await?;
    // A verified email domain, a single sign-on connection and a SCIM
    // directory (the owner in a group), as their routes leave them.
    client
        .batch_execute(&format!(
            "INSERT INTO public.tenant_email_domains (tenant_id, domain, token, verified_at, verified_by) \
             VALUES ('{acme}', 'acme.example.com', 't', now(), 'dns'); \
             INSERT INTO public.sso_connections (tenant_id, issuer, client_id, client_secret, domains) \
             VALUES ('{acme}', 'https://idp.example.com', 'plinth', '\\x00', ARRAY['acme.example.com']); \
             INSERT INTO public.scim_tokens (id, tenant_id, prefix, token_hash) \
             VALUES ('{token}', '{acme}', 'plp_x', '\\x01'); \
             INSERT INTO public.scim_users (tenant_id, user_id, external_id) \
             SELECT tenant_id, user_id, 'ext-owner' FROM public.memberships WHERE tenant_id = '{acme}'; \
             INSERT INTO public.scim_groups (id, tenant_id, display_name, role) \
             VALUES ('{group}', '{acme}', 'Admins', 'admin'); \
             INSERT INTO public.scim_group_members (tenant_id, group_id, user_id) \
             SELECT tenant_id, '{group}', user_id FROM public.scim_users WHERE tenant_id = '{acme}';",
            acme = acme.id.0,
            token = uuid::Uuid::now_v7(),
            group = uuid::Uuid::now_v7(),
        ))
        .await?;
    let directory = "SELECT (SELECT count(*) FROM public.tenant_email_domains WHERE tenant_id = $1) \
                          + (SELECT count(*) FROM public.sso_connections WHERE tenant_id = $1) \
                          + (SELECT count(*) FROM public.scim_tokens WHERE tenant_id = $1) \
                          + (SELECT count(*) FROM public.scim_users WHERE tenant_id = $1) \
                          + (SELECT count(*) FROM public.scim_groups WHERE tenant_id = $1) \
                          + (SELECT count(*) FROM public.scim_group_members WHERE tenant_id = $1)";
    let rows: i64 = client.query_one(directory, &[&acme.id.0]).await?.get(0);
    assert_eq!(rows, 6);
    client.execute("UPDATE public.tenants SET restricted_at = now() WHERE id = $1", &[&acme.id.0]).await?;

    let dir = TempDir::new("backup")?;
    let file = dir.path.join("acme.tar");
    let file = file.to_str().ok_or("path")?;
    let (ok, out) = plinth_cli(testdb, &["tenants", "backup", "acme", "--out", file]).await?;
    assert!(ok, "backup failed: {out}");
    let archive = Archive::read(std::fs::File::open(file)?)?;
    assert_eq!(archive.manifest.tenant.id, acme.id.0);
    assert_eq!(archive.manifest.tenant.slug, "acme");
    assert!(!archive.manifest.tenant_migrations.is_empty());
    assert!(archive.manifest.files.contains_key("schema.dump"));

    // A copy beside the original: new id and schema, the same data and
    // members, no domain.
    let (ok, out) = plinth_cli(testdb, &["tenants", "restore", file, "--as", "acme-copy"]).await?;
    assert!(ok, "restoring a copy failed: {out}");
    let copy = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "acme-copy").await?))
        .await?
        .ok_or("no copy")?;
    assert_ne!(copy.id, acme.id);
    assert_ne!(copy.schema, acme.schema);
    assert_eq!(copy.name, acme.name);
    let restricted: Option<chrono::DateTime<chrono::Utc>> =
        client.query_one("SELECT restricted_at FROM public.tenants WHERE id = $1", &[&copy.id.0]).await?.get(0);
    assert_eq!(restricted, None, "the copy has none of the original's billing state");
    let ledger: i64 = client
        .query_one("SELECT count(*) FROM public.tenant_migrations WHERE tenant_id = $1", &[&copy.id.0])
        .await?
        .get(0);
    assert_eq!(usize::try_from(ledger)?, archive.manifest.tenant_migrations.len());
    let domains: i64 = client
        .query_one("SELECT count(*) FROM public.tenant_domains WHERE tenant_id = $1", &[&copy.id.0])
        .await?
        .get(0);
    assert_eq!(domains, 0, "a domain serves one tenant: the original keeps it");
    // Nor keys and invitations: one secret does not open two tenants.
    let secrets: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM public.api_keys WHERE tenant_id = $1) \
                  + (SELECT count(*) FROM public.invitations WHERE tenant_id = $1)",
            &[&copy.id.0],
        )
        .await?
        .get(0);
    assert_eq!(secrets, 0, "the copy has the original's keys or invitations");
    let rows: i64 = client.query_one(directory, &[&copy.id.0]).await?.get(0);
    assert_eq!(rows, 0, "the copy has the original's email domains, connection or directory");
    assert_error(get(&app, &key, "acme-copy", "/v1/projects").send().await?, 404, "not_found").await?;
    assert_eq!(get(&app, &key, "acme", "/v1/projects").send().await?.status(), 200, "the key still opens acme");

    // The owner signs in with the password and finds the copy's data.
    let session = sign_in(&app, "owner@acme.example.com").await?;
    let mut names = project_names(&app, &session, "acme-copy").await?;
    names.sort();
    assert_eq!(names, ["Mars rocket", "Moon rocket"]);
    let tasks: Value =
        get(&app, &session, "acme-copy", &format!("/v1/projects/{first}/tasks")).send().await?.json().await?;
    assert_eq!(tasks["data"][0]["title"], "Fuel it");
    let me: Value = app.http.get(app.url("/v1/me")).bearer_auth(&session).send().await?.json().await?;
    let slugs: Vec<&str> = me["memberships"]
        .as_array()
        .ok_or("no memberships")?
        .iter()
        .filter_map(|m| m["tenant"]["slug"].as_str())
        .collect();
    assert!(slugs.contains(&"acme-copy"), "the copy is among the owner's organizations: {me}");

    // The two are apart: writing to the copy leaves the original alone.
    create_project(&app, &session, "acme-copy", "Copy only").await?;
    let res = app
        .http
        .delete(app.url(&format!("/v1/projects/{first}")))
        .bearer_auth(&session)
        .header("x-tenant", "acme-copy")
        .send()
        .await?;
    assert_eq!(res.status(), 204);
    let mut names = project_names(&app, &owner, "acme").await?;
    names.sort();
    assert_eq!(names, ["Mars rocket", "Moon rocket"], "the original is untouched");
    // Another tenant's owner reaches neither.
    for tenant in ["acme", "acme-copy"] {
        let res = get(&app, &intruder, tenant, "/v1/projects").send().await?;
        assert_error(res, 404, "not_found").await?;
    }
    let res = get(&app, &intruder, "globex", &format!("/v1/projects/{first}")).send().await?;
    assert_error(res, 404, "not_found").await?;

    // A second copy under the same slug, or the original while it exists,
    // is refused before anything is loaded.
    let (ok, out) = plinth_cli(testdb, &["tenants", "restore", file, "--as", "acme-copy"]).await?;
    assert!(!ok && out.contains("slug acme-copy is taken"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["tenants", "restore", file]).await?;
    assert!(!ok && out.contains("exists"), "{out}");
    let schemas: i64 =
        client.query_one("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'", &[]).await?.get(0);
    assert_eq!(schemas, 3, "acme, globex and the copy: nothing half-restored");

    // After a disaster: the tenant is deleted, then restored as itself.
    let (ok, out) = plinth_cli(testdb, &["tenants", "delete", "acme", "--yes"]).await?;
    assert!(ok, "deleting failed: {out}");
    let res = get(&app, &session, "acme", "/v1/projects").send().await?;
    assert_error(res, 404, "not_found").await?;
    // The deleted key is unknown once the deletion's notification arrives
    // (and this instance then remembers so).
    crate::harness::eventually(std::time::Duration::from_secs(2), || async {
        Ok(get(&app, &key, "globex", "/v1/projects").send().await?.status() == 401)
    })
    .await?;
    let (ok, out) = plinth_cli(testdb, &["tenants", "restore", file]).await?;
    assert!(ok, "restoring failed: {out}");
    assert!(out.contains("domains: 1 restored"), "{out}");
    assert!(out.contains("API keys: 1, invitations: 1 restored"), "{out}");
    assert!(out.contains("SCIM directory: 6 rows restored"), "{out}");
    let rows: i64 = client.query_one(directory, &[&acme.id.0]).await?.get(0);
    assert_eq!(rows, 6, "acme's email domain, connection and directory are back");
    let back = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "acme").await?))
        .await?
        .ok_or("acme is not back")?;
    assert_eq!((back.id, &back.schema), (acme.id, &acme.schema));
    // Served again on every route (the registry's NOTIFY clears the caches).
    crate::harness::eventually(std::time::Duration::from_secs(5), || async {
        Ok(get(&app, &session, "acme", "/v1/projects").send().await?.status() == 200)
    })
    .await?;
    let mut names = project_names(&app, &session, "acme").await?;
    names.sort();
    assert_eq!(names, ["Mars rocket", "Moon rocket"]);
    let res = app
        .http
        .get(app.url(&format!("/v1/projects/{first}")))
        .bearer_auth(&session)
        .header("host", "rockets.example.com")
        .send()
        .await?;
    assert_eq!(res.status(), 200, "served on its domain again");
    // Its key works again, within a second (a trigger announces the key to
    // every instance), with its role, and only in acme.
    crate::harness::eventually(std::time::Duration::from_secs(2), || async {
        Ok(get(&app, &key, "acme", "/v1/projects").send().await?.status() == 200)
    })
    .await?;
    assert_error(get(&app, &key, "acme", "/v1/api-keys").send().await?, 403, "forbidden").await?;
    assert_error(get(&app, &key, "acme-copy", "/v1/projects").send().await?, 404, "not_found").await?;
    // Its invitation link works again.
    let res = app
        .http
        .post(app.url("/v1/invitations/accept"))
        .json(&json!({ "token": invitation, "password": PASSWORD }))
        .send()
        .await?;
    assert_eq!(res.status(), 200, "accepting the restored invitation");
    let newcomer = sign_in(&app, "new@acme.example.com").await?;
    assert_eq!(project_names(&app, &newcomer, "acme").await?.len(), 2);
    assert_error(get(&app, &newcomer, "acme-copy", "/v1/projects").send().await?, 404, "not_found").await?;
    // The copy lives on, apart.
    let mut names = project_names(&app, &session, "acme-copy").await?;
    names.sort();
    assert_eq!(names, ["Copy only", "Mars rocket"]);
    Ok(())
}

#[tokio::test]
async fn archives_from_a_newer_plinth_or_damaged_are_refused() -> TestResult {
    let app = TestApp::spawn().await?;
    let testdb = app.testdb.as_ref().ok_or("no test database")?;
    sign_up(&app, "owner@acme.example.com", "acme").await?;
    let dir = TempDir::new("backup")?;
    let file = dir.path.join("acme.tar");
    let (ok, out) = plinth_cli(testdb, &["tenants", "backup", "acme", "--out", file.to_str().ok_or("path")?]).await?;
    assert!(ok, "backup failed: {out}");

    // A tenant migration this binary does not know.
    let mut newer = Archive::read(std::fs::File::open(&file)?)?;
    newer.manifest.tenant_migrations.push("2099-01-01-000001_from_the_future".to_owned());
    let newer_file = dir.path.join("newer.tar");
    newer.write(std::fs::File::create(&newer_file)?)?;
    let (ok, out) =
        plinth_cli(testdb, &["tenants", "restore", newer_file.to_str().ok_or("path")?, "--as", "acme-newer"]).await?;
    assert!(!ok, "a newer archive was restored: {out}");
    assert!(out.contains("comes from a newer Plinth") && out.contains("2099-01-01-000001_from_the_future"), "{out}");

    // One byte of the schema dump changed.
    let mut bytes = std::fs::read(&file)?;
    let at = bytes.windows(5).position(|w| w == b"PGDMP").ok_or("no dump in the archive")? + 40;
    bytes[at] ^= 0x55;
    let damaged_file = dir.path.join("damaged.tar");
    std::fs::write(&damaged_file, bytes)?;
    let (ok, out) =
        plinth_cli(testdb, &["tenants", "restore", damaged_file.to_str().ok_or("path")?, "--as", "acme-damaged"])
            .await?;
    assert!(!ok && out.contains("damaged"), "{out}");

    let client = testdb.client().await?;
    let tenants: i64 = client.query_one("SELECT count(*) FROM public.tenants", &[]).await?.get(0);
    assert_eq!(tenants, 1, "nothing was restored");
    Ok(())
}

/// An admin's own export: a job writes the archive and mails a link that
/// serves it until it expires; the plan, the role and the organization
/// bound who may ask and what the link reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_gets_the_organizations_archive_by_a_mailed_link_that_expires() -> TestResult {
    use crate::mail_and_jobs::{Running, fast, settings};
    use crate::smtp::SmtpServer;
    use plinth_access::Role;
    use std::time::Duration;

    let app = TestApp::spawn().await?;
    let testdb = app.testdb.as_ref().ok_or("no test database")?;
    let acme = app.create_tenant_on("acme", "enterprise").await?;
    app.create_tenant_on("globex", "enterprise").await?;
    app.create_tenant("initech").await?; // free: no data_export
    app.create_project("acme", "Moon rocket").await?;
    app.create_project("globex", "Globex secret").await?;

    let post = |tenant: &'static str| app.req(Method::POST, tenant, "/v1/tenant/exports").send();
    assert_error(post("initech").await?, 402, "plan_required").await?;
    let viewer = crate::harness::member(&app.db, &acme, Role::Viewer).await?;
    let res =
        app.http.post(app.url("/v1/tenant/exports")).bearer_auth(&viewer).header("x-tenant", "acme").send().await?;
    assert_error(res, 403, "forbidden").await?;

    let res = post("acme").await?;
    assert_eq!(res.status(), 202);
    let export: Value = res.json().await?;
    assert_eq!(export["status"], "queued");
    let id = export["id"].as_str().ok_or("no id")?.to_owned();
    assert_error(post("acme").await?, 409, "conflict").await?;
    // Another organization's admin cannot see it.
    let res = app.req(Method::GET, "globex", &format!("/v1/tenant/exports/{id}")).send().await?;
    assert_error(res, 404, "not_found").await?;

    let smtp = SmtpServer::start().await?;
    let dir = TempDir::new("export-mail")?;
    let worker = Running::mail(testdb, &settings(Some(smtp.url()), &dir.path)?, fast())?;
    crate::harness::eventually(Duration::from_secs(60), || async { Ok(smtp.accepted().len() == 1) }).await?;
    let raw = smtp.accepted().remove(0);
    let message = mail_parser::MessageParser::default().parse(raw.as_bytes()).ok_or("unparsable message")?;
    let owner_email: String = testdb
        .client()
        .await?
        .query_one(
            "SELECT u.email FROM public.users u JOIN public.memberships m ON m.user_id = u.id \
             WHERE m.tenant_id = $1 AND m.role = 'owner'",
            &[&acme.id.0],
        )
        .await?
        .get(0);
    assert_eq!(message.to().and_then(|a| a.first()).and_then(|a| a.address()), Some(owner_email.as_str()));
    let text = message.body_text(0).ok_or("no text body")?;
    let start = text.find("/v1/exports/").ok_or("no link in the mail")?;
    let link: String = text[start..].chars().take_while(|c| !c.is_whitespace()).collect();
    assert!(link.starts_with(&format!("/v1/exports/{id}/archive?token=")), "{link}");

    let status: Value = app.req(Method::GET, "acme", &format!("/v1/tenant/exports/{id}")).send().await?.json().await?;
    assert_eq!(status["status"], "ready");
    // The link alone downloads the archive: no session, no tenant header.
    let res = app.http.get(app.url(&link)).send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-tar");
    let bytes = res.bytes().await?;
    assert_eq!(Some(bytes.len() as i64), status["bytes"].as_i64());
    let archive = Archive::read(&bytes[..])?;
    assert_eq!(archive.manifest.tenant.slug, "acme");
    assert_eq!(archive.manifest.tenant.id, acme.id.0);
    // Restored as a copy, it holds acme's data and nothing of globex's.
    let file = dir.path.join("export.tar");
    std::fs::write(&file, &bytes)?;
    let (ok, out) =
        plinth_cli(testdb, &["tenants", "restore", file.to_str().ok_or("path")?, "--as", "acme-export"]).await?;
    assert!(ok, "{out}");
    let copy = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "acme-export").await?))
        .await?
        .ok_or("no copy")?;
    let names: Vec<String> = testdb
        .client()
        .await?
        .query(&format!("SELECT name FROM {}.projects", copy.schema.quoted()), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["Moon rocket"]);

    // A wrong token, or the token on another export's id, finds nothing.
    let wrong = link.replace("token=", "token=x");
    assert_error(app.http.get(app.url(&wrong)).send().await?, 404, "not_found").await?;
    let other = link.replace(&id, &uuid::Uuid::now_v7().to_string());
    assert_error(app.http.get(app.url(&other)).send().await?, 404, "not_found").await?;

    // When the link's time is up, the expiry job drops the archive.
    let client = testdb.client().await?;
    client.execute("UPDATE public.jobs SET run_at = now() WHERE kind = 'tenants.export_expired'", &[]).await?;
    crate::harness::eventually(Duration::from_secs(30), || async {
        let row = client.query_one("SELECT status, archive IS NULL FROM public.tenant_exports", &[]).await?;
        Ok(row.get::<_, String>(0) == "expired" && row.get::<_, bool>(1))
    })
    .await?;
    assert_error(app.http.get(app.url(&link)).send().await?, 410, "link_expired").await?;
    worker.stop().await?;
    Ok(())
}
