//! Verified email domains: proven by a TXT record (looked up at a DNS server
//! on loopback) or by a link mailed to an administrative address; one
//! organization per domain; joining by domain.

use reqwest::Method;
use serde_json::{Value, json};

use crate::dns::DnsServer;
use crate::harness::{AppOptions, TestApp, TestResult, assert_error};
use crate::world::{World, world_with};

fn token_of(body: &Value) -> TestResult<String> {
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_are_proven_by_dns_or_mail_once_and_let_their_users_join() -> TestResult {
    let dns = DnsServer::start().await?;
    let resolver: &'static str = Box::leak(dns.addr.to_string().into_boxed_str());
    let w = world_with(AppOptions { settings: vec![("PLINTH_DNS_RESOLVER", resolver)], ..Default::default() }).await?;
    let acme = token_of(&w.signup("olivia@acme.test", "acme").await?)?;
    let globex = token_of(&w.signup("gina@globex.test", "globex").await?)?;
    let free = token_of(&w.signup("fred@free.test", "freeco").await?)?;
    w.set_plan("acme", "enterprise", &acme).await?;
    w.set_plan("globex", "enterprise", &globex).await?;
    let call = |token: &str, tenant: &str, method: Method, path: &str, body: Option<Value>| {
        let req = w.as_user(token, method, tenant, path);
        match body {
            Some(body) => req.json(&body),
            None => req,
        }
        .send()
    };

    let res = call(&free, "freeco", Method::POST, "/v1/domains", Some(json!({ "domain": "free.test" }))).await?;
    assert_error(res, 402, "plan_required").await?;
    let res = call(&acme, "acme", Method::POST, "/v1/domains", Some(json!({ "domain": "not a domain" }))).await?;
    assert_error(res, 400, "invalid_request").await?;
    let res = call(&acme, "acme", Method::POST, "/v1/domains", Some(json!({ "domain": " Example.COM. " }))).await?;
    assert_eq!(res.status(), 201);
    let added: Value = res.json().await?;
    assert_eq!(added["domain"], "example.com");
    assert!(added["verified_at"].is_null() && added["auto_join"] == false);
    assert_eq!(added["dns_record"]["name"], "_plinth-challenge.example.com");
    assert_eq!(added["dns_record"]["type"], "TXT");
    let value = added["dns_record"]["value"].as_str().ok_or("no value")?.to_owned();
    assert!(value.starts_with("plinth-domain-verification="));
    let res = call(&acme, "acme", Method::POST, "/v1/domains", Some(json!({ "domain": "example.com" }))).await?;
    assert_error(res, 409, "conflict").await?;

    // By DNS: not yet, a wrong value, then the right one beside others.
    let verify = |token: &str, tenant: &str, domain: &str| {
        w.as_user(token, Method::POST, tenant, &format!("/v1/domains/{domain}/verify")).send()
    };
    assert_error(verify(&acme, "acme", "example.com").await?, 409, "conflict").await?;
    dns.set_txt("_plinth-challenge.example.com", &["plinth-domain-verification=0000"]);
    assert_error(verify(&acme, "acme", "example.com").await?, 409, "conflict").await?;
    dns.set_txt("_plinth-challenge.example.com", &["v=spf1 -all", &value]);
    let res = verify(&acme, "acme", "example.com").await?;
    assert_eq!(res.status(), 200);
    let verified: Value = res.json().await?;
    assert_eq!(verified["verified_by"], "dns");
    assert!(verified["verified_at"].is_string());

    // Another organization can't have it, and can't touch acme's.
    let res = call(&globex, "globex", Method::POST, "/v1/domains", Some(json!({ "domain": "example.com" }))).await?;
    assert_error(res, 409, "conflict").await?;
    let res =
        call(&globex, "globex", Method::PATCH, "/v1/domains/example.com", Some(json!({ "auto_join": true }))).await?;
    assert_error(res, 404, "not_found").await?;
    assert_error(call(&globex, "globex", Method::DELETE, "/v1/domains/example.com", None).await?, 404, "not_found")
        .await?;
    assert_error(verify(&globex, "globex", "example.com").await?, 404, "not_found").await?;
    let acme_has = |v: &Value| v["data"].as_array().is_some_and(|d| d.iter().any(|x| x["domain"] == "example.com"));
    let list: Value = call(&acme, "acme", Method::GET, "/v1/domains", None).await?.json().await?;
    assert!(acme_has(&list) && list["data"][0]["verified_by"] == "dns");
    let list: Value = call(&globex, "globex", Method::GET, "/v1/domains", None).await?.json().await?;
    assert!(!acme_has(&list), "{list}");

    // Two organizations waiting on one domain: the first proof wins.
    let mut values = Vec::new();
    for (token, tenant) in [(&acme, "acme"), (&globex, "globex")] {
        let res = call(token, tenant, Method::POST, "/v1/domains", Some(json!({ "domain": "shared.test" }))).await?;
        assert_eq!(res.status(), 201);
        values.push(res.json::<Value>().await?["dns_record"]["value"].as_str().ok_or("value")?.to_owned());
    }
    dns.set_txt("_plinth-challenge.shared.test", &[&values[0], &values[1]]);
    assert_eq!(verify(&globex, "globex", "shared.test").await?.status(), 200);
    assert_error(verify(&acme, "acme", "shared.test").await?, 409, "conflict").await?;

    // By mail, to an administrative address at the domain.
    let res = call(&globex, "globex", Method::POST, "/v1/domains", Some(json!({ "domain": "globex.test" }))).await?;
    assert_eq!(res.status(), 201);
    let send = |mailbox: &str| {
        call(
            &globex,
            "globex",
            Method::POST,
            "/v1/domains/globex.test/verify-email",
            Some(json!({ "mailbox": mailbox })),
        )
    };
    assert_error(send("gina").await?, 400, "invalid_request").await?;
    let res = send("postmaster").await?;
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await?["to"], "postmaster@globex.test");
    let token = w.mailed_token("postmaster@globex.test", "https://app.plinth.test/domains/confirm").await?;
    let res = w.post("/v1/domain-proofs/confirm", json!({ "token": token })).await?;
    assert_eq!(res.status(), 200);
    let proven: Value = res.json().await?;
    assert_eq!((proven["domain"].as_str(), proven["verified_by"].as_str()), (Some("globex.test"), Some("email")));
    assert_error(w.post("/v1/domain-proofs/confirm", json!({ "token": token })).await?, 400, "invalid_request").await?;

    // Joining by domain: only verified domains, off by default, exact domain only.
    let res = call(&acme, "acme", Method::POST, "/v1/domains", Some(json!({ "domain": "pending.test" }))).await?;
    assert_eq!(res.status(), 201);
    let res =
        call(&acme, "acme", Method::PATCH, "/v1/domains/pending.test", Some(json!({ "auto_join": true }))).await?;
    assert_error(res, 409, "conflict").await?;
    let res = call(
        &acme,
        "acme",
        Method::PATCH,
        "/v1/domains/example.com",
        Some(json!({ "auto_join": true, "auto_join_role": "owner" })),
    )
    .await?;
    assert_error(res, 400, "invalid_request").await?;
    let body = json!({ "auto_join": true, "auto_join_role": "viewer" });
    let res = call(&acme, "acme", Method::PATCH, "/v1/domains/example.com", Some(body)).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["auto_join_role"], "viewer");
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    let seat_updates = async || -> TestResult<i64> {
        let sql = "SELECT count(*) FROM public.jobs j JOIN public.tenants t ON t.id = j.tenant_id \
                   WHERE j.kind = 'billing.seats' AND t.slug = 'acme'";
        Ok(w.app.testdb.as_ref().ok_or("no db")?.client().await?.query_one(sql, &[]).await?.get(0))
    };
    let before = seat_updates().await?;
    assert_eq!(joined(&w, "newbie@example.com", "newbie").await?, [pair("acme", "viewer"), pair("newbie", "owner")]);
    assert_eq!(seat_updates().await?, before + 1, "a per-seat subscription follows a member who joined by domain");
    assert_eq!(joined(&w, "near@sub.example.com", "nearco").await?, [pair("nearco", "owner")]);
    assert_eq!(joined(&w, "other@globex.test", "otherco").await?, [pair("otherco", "owner")], "globex's is off");
    let log: Value =
        call(&acme, "acme", Method::GET, "/v1/audit-log?action=member.auto_joined", None).await?.json().await?;
    assert_eq!(log["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(log["data"][0]["details"]["domain"], "example.com");

    // Removed: nobody joins by it, and another organization may prove it.
    assert_eq!(call(&acme, "acme", Method::DELETE, "/v1/domains/example.com", None).await?.status(), 204);
    assert_eq!(joined(&w, "late@example.com", "lateco").await?, [pair("lateco", "owner")]);
    let res = call(&globex, "globex", Method::POST, "/v1/domains", Some(json!({ "domain": "example.com" }))).await?;
    assert_eq!(res.status(), 201);

    // A resolver that doesn't answer: 503, not a hang and not a 500.
    let silent = AppOptions { settings: vec![("PLINTH_DNS_RESOLVER", "127.0.0.1:9")], ..Default::default() };
    let silent = TestApp::spawn_on(w.app.testdb.as_ref().ok_or("no db")?, silent).await?;
    let res = silent
        .http
        .post(silent.url("/v1/domains/pending.test/verify"))
        .header("x-tenant", "acme")
        .bearer_auth(&acme)
        .send()
        .await?;
    assert_error(res, 503, "unavailable").await?;
    w.worker.stop().await?;
    Ok(())
}

/// Signs `email` up with an organization `slug`, verifies the address, and
/// lists the organizations it is then a member of, with roles.
async fn joined(w: &World, email: &str, slug: &str) -> TestResult<Vec<(String, String)>> {
    let me = token_of(&w.signup(email, slug).await?)?;
    let token = w.mailed_token(email, "https://app.plinth.test/verify-email").await?;
    assert_eq!(w.post("/v1/auth/verify-email", json!({ "token": token })).await?.status(), 200);
    let me: Value = w.me(&me).await?.json().await?;
    let mut member_of: Vec<(String, String)> = me["memberships"]
        .as_array()
        .ok_or("memberships")?
        .iter()
        .map(|m| (m["tenant"]["slug"].as_str().unwrap_or("").to_owned(), m["role"].as_str().unwrap_or("").to_owned()))
        .collect();
    member_of.sort();
    Ok(member_of)
}
