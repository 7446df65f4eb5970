use std::time::Duration;

use plinth_tenants::{TenantStatus, registry};

use reqwest::Method;

use crate::harness::{AppOptions, BASE_DOMAIN, TestApp, TestResult, add_domain, assert_error, eventually, set_status};

#[tokio::test]
async fn tenant_by_subdomain_header_and_verified_custom_domain() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    app.create_tenant("globex").await?;
    app.create_project("acme", "acme-project").await?;
    add_domain(&app.db, &acme, "projects.acme.example", true).await?;
    add_domain(&app.db, &acme, "unverified.acme.example", false).await?;

    let names = |body: serde_json::Value| -> Vec<String> {
        body["data"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect()
    };
    // Signed in as acme's owner unless said otherwise.
    let acme_token = app.token("acme").ok_or("no token")?;
    let get =
        |host: &str| app.http.get(app.url("/v1/projects")).header("host", host.to_owned()).bearer_auth(&acme_token);

    for host in [format!("acme.{BASE_DOMAIN}"), format!("ACME.{BASE_DOMAIN}:8080"), "projects.acme.example".into()] {
        let res = get(&host).send().await?;
        assert_eq!(res.status(), 200, "host {host}");
        assert_eq!(names(res.json().await?), ["acme-project"], "host {host}");
    }
    let res = app.req(Method::GET, "acme", "/v1/projects").send().await?;
    assert_eq!(names(res.json().await?), ["acme-project"]);
    let globex_token = app.token("globex").ok_or("no token")?;
    let res = get(&format!("globex.{BASE_DOMAIN}")).bearer_auth(&globex_token).send().await?;
    assert_eq!(names(res.json().await?), Vec::<String>::new());
    // acme's owner is nobody in globex: 404, as if it did not exist.
    assert_error(get(&format!("globex.{BASE_DOMAIN}")).send().await?, 404, "not_found").await?;

    // Unknown tenants, however named.
    assert_error(get(&format!("nobody.{BASE_DOMAIN}")).send().await?, 404, "not_found").await?;
    assert_error(get(&format!("a.b.{BASE_DOMAIN}")).send().await?, 404, "not_found").await?;
    let nobody = app.req(Method::GET, "nobody", "/v1/projects").bearer_auth(&acme_token);
    assert_error(nobody.send().await?, 404, "not_found").await?;
    for spoof in ["acme'--", "ACME", "acme; DROP TABLE public.tenants", "../acme", "acme\u{0}"] {
        let res = app.http.get(app.url("/v1/projects")).header("x-tenant", spoof).bearer_auth(&acme_token).send().await;
        if let Ok(res) = res {
            assert_error(res, 404, "not_found").await?;
        }
    }
    // An unverified domain routes nowhere; no tenant named at all is a 400.
    assert_error(get("unverified.acme.example").send().await?, 400, "invalid_request").await?;
    assert_error(app.http.get(app.url("/v1/projects")).bearer_auth(&acme_token).send().await?, 400, "invalid_request")
        .await?;
    // The header cannot move a request off the tenant its host names.
    let res = get(&format!("acme.{BASE_DOMAIN}")).header("x-tenant", "globex").send().await?;
    assert_error(res, 400, "invalid_request").await?;
    let res = get("projects.acme.example").header("x-tenant", "globex").send().await?;
    assert_error(res, 400, "invalid_request").await?;

    // A domain added later is served within a second, though its absence was cached.
    assert_error(get("new.acme.example").send().await?, 400, "invalid_request").await?;
    add_domain(&app.db, &acme, "new.acme.example", true).await?;
    eventually(Duration::from_secs(1), || async { Ok(get("new.acme.example").send().await?.status() == 200) }).await?;
    Ok(())
}

#[tokio::test]
async fn suspension_reactivation_and_deletion_take_effect_within_a_second() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    let status =
        || async { Ok::<_, reqwest::Error>(app.req(Method::GET, "acme", "/v1/projects").send().await?.status()) };
    assert_eq!(status().await?, 200); // now cached

    // Suspend through the registry directly (as another instance or the CLI would).
    set_status(&app.db, acme.id, TenantStatus::Suspended).await?;
    let took = eventually(Duration::from_secs(1), || async { Ok(status().await? == 403) }).await?;
    eprintln!("suspension visible after {took:?}");
    assert_error(app.req(Method::GET, "acme", "/v1/projects").send().await?, 403, "tenant_suspended").await?;

    set_status(&app.db, acme.id, TenantStatus::Active).await?;
    eventually(Duration::from_secs(1), || async { Ok(status().await? == 200) }).await?;

    registry::delete(&app.db, acme.id).await?;
    eventually(Duration::from_secs(1), || async { Ok(status().await? == 404) }).await?;
    Ok(())
}

#[tokio::test]
async fn a_second_instance_sees_changes_made_elsewhere_within_a_second() -> TestResult {
    let first = TestApp::spawn().await?;
    let testdb = first.testdb.as_ref().ok_or("no test db")?;
    let second = TestApp::spawn_on(testdb, AppOptions::default()).await?.with_tokens_of(&first);
    let acme = first.create_tenant("acme").await?;
    for app in [&first, &second] {
        assert_eq!(app.req(Method::GET, "acme", "/v1/projects").send().await?.status(), 200);
    }
    set_status(&first.db, acme.id, TenantStatus::Suspended).await?;
    for app in [&first, &second] {
        eventually(Duration::from_secs(1), || async {
            Ok(app.req(Method::GET, "acme", "/v1/projects").send().await?.status() == 403)
        })
        .await?;
    }
    // A tenant created after the second instance cached "not found" appears too.
    let acme_owner = first.token("acme").ok_or("no token")?;
    let newco = |app: &TestApp| app.req(Method::GET, "newco", "/v1/projects").bearer_auth(acme_owner.clone());
    assert_eq!(newco(&second).send().await?.status(), 404);
    let newco_tenant = first.create_tenant("newco").await?;
    crate::harness::add_member(&first.db, &newco_tenant, &acme_owner).await?;
    eventually(Duration::from_secs(1), || async { Ok(newco(&second).send().await?.status() == 200) }).await?;
    Ok(())
}
