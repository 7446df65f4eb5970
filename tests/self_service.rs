//! What a user controls about their own account (sessions, password,
//! address, their data) and what a tenant admin controls about a member's
//! sessions, over HTTP, with mail to a real SMTP listener.

use std::time::Duration;

use plinth_access::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{AppOptions, TestApp, TestResult, add_member, assert_error, eventually, member, session_of};
use crate::world::{PASSWORD, World, world};

async fn login(w: &World, email: &str, password: &str, agent: &str) -> TestResult<String> {
    let res = w
        .app
        .http
        .post(w.app.url("/v1/auth/login"))
        .header("user-agent", agent)
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await?;
    assert_eq!(res.status(), 200, "login {email}");
    let body: Value = res.json().await?;
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

fn token_of(body: &Value) -> TestResult<String> {
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

async fn sessions(w: &World, token: &str) -> TestResult<Vec<Value>> {
    let res = w.app.http.get(w.app.url("/v1/me/sessions")).bearer_auth(token).send().await?;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await?;
    Ok(body["data"].as_array().ok_or("no data")?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_their_sessions_and_ends_them() -> TestResult {
    let w = world().await?;
    let first = token_of(&w.signup("ada@example.com", "acme").await?)?;
    let phone = login(&w, "ada@example.com", PASSWORD, "Phone/2.0").await?;
    let laptop = login(&w, "ada@example.com", PASSWORD, "Laptop/3.0").await?;
    let bob = token_of(&w.signup("bob@example.com", "bobco").await?)?;

    let listed = sessions(&w, &phone).await?;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let current: Vec<&Value> = listed.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["user_agent"], "Phone/2.0");
    assert!(listed.iter().all(|s| s["ip"] == "127.0.0.1" && s["created_at"].is_string()));
    assert!(listed.iter().all(|s| s["last_used_at"].is_string() && s["expires_at"].is_string()));
    let id_of = |agent: &str| listed.iter().find(|s| s["user_agent"] == agent).map(|s| s["id"].clone());
    let laptop_id = id_of("Laptop/3.0").ok_or("no laptop session")?;
    let laptop_id = laptop_id.as_str().ok_or("id")?;

    // Another user neither sees nor ends them.
    let bobs = sessions(&w, &bob).await?;
    assert_eq!(bobs.len(), 1);
    assert!(bobs.iter().all(|s| s["id"] != laptop_id));
    let res = w.app.http.delete(w.app.url(&format!("/v1/me/sessions/{laptop_id}"))).bearer_auth(&bob).send().await?;
    assert_error(res, 404, "not_found").await?;
    assert_eq!(w.me(&laptop).await?.status(), 200);

    // Ended one by one.
    let res = w.app.http.delete(w.app.url(&format!("/v1/me/sessions/{laptop_id}"))).bearer_auth(&phone).send().await?;
    assert_eq!(res.status(), 204);
    eventually(Duration::from_secs(1), || async { Ok(w.me(&laptop).await?.status() == 401) }).await?;
    let res = w.app.http.delete(w.app.url(&format!("/v1/me/sessions/{laptop_id}"))).bearer_auth(&phone).send().await?;
    assert_error(res, 404, "not_found").await?;
    assert_eq!(sessions(&w, &phone).await?.len(), 2);

    // Everywhere else.
    let res = w.app.http.delete(w.app.url("/v1/me/sessions")).bearer_auth(&phone).send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["ended"], 1);
    eventually(Duration::from_secs(1), || async { Ok(w.me(&first).await?.status() == 401) }).await?;
    assert_eq!(w.me(&phone).await?.status(), 200);
    assert_eq!(w.me(&bob).await?.status(), 200, "another user's sessions stay");
    let left = sessions(&w, &phone).await?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["current"], true);
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_address_changes_ask_again_and_tell_the_old_address() -> TestResult {
    let w = world().await?;
    let mine = token_of(&w.signup("ada@example.com", "acme").await?)?;
    let other = login(&w, "ada@example.com", PASSWORD, "Other/1").await?;
    w.signup("bob@example.com", "bobco").await?;
    let new_password = "a brand new passphrase";
    let change = |current: &str, new: &str| {
        w.app
            .http
            .post(w.app.url("/v1/me/password"))
            .bearer_auth(&mine)
            .json(&json!({ "current_password": current, "new_password": new }))
            .send()
    };
    assert_error(change("not my password at all", new_password).await?, 401, "invalid_credentials").await?;
    let res = change(PASSWORD, "password123").await?;
    assert_eq!(assert_error(res, 400, "invalid_request").await?["error"]["details"][0]["field"], "new_password");
    let res = change(PASSWORD, new_password).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["sessions_ended"], 1);
    eventually(Duration::from_secs(1), || async { Ok(w.me(&other).await?.status() == 401) }).await?;
    assert_eq!(w.me(&mine).await?.status(), 200);
    let old = w.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await?;
    assert_error(old, 401, "invalid_credentials").await?;
    login(&w, "ada@example.com", new_password, "Test/1").await?;

    let ask = |email: &str, password: &str| {
        w.app
            .http
            .post(w.app.url("/v1/me/email"))
            .bearer_auth(&mine)
            .json(&json!({ "email": email, "password": password }))
            .send()
    };
    assert_error(ask("ada@new.example", PASSWORD).await?, 401, "invalid_credentials").await?;
    assert_error(ask("bob@example.com", new_password).await?, 409, "conflict").await?;
    assert_eq!(ask("Ada@New.Example", new_password).await?.status(), 202);
    let token = w.mailed_token("ada@new.example", "https://app.plinth.test/change-email").await?;
    // Until the link is followed, nothing changes.
    login(&w, "ada@example.com", new_password, "Test/1").await?;
    let res = w.post("/v1/auth/change-email/confirm", json!({ "token": token })).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["email"], "ada@new.example");
    let again = w.post("/v1/auth/change-email/confirm", json!({ "token": token })).await?;
    assert_error(again, 400, "invalid_request").await?;
    let me: Value = w.me(&mine).await?.json().await?;
    assert_eq!(me["user"]["email"], "ada@new.example");
    assert!(me["user"]["email_verified_at"].is_string());
    login(&w, "ada@new.example", new_password, "Test/1").await?;
    let res = w.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": new_password })).await?;
    assert_error(res, 401, "invalid_credentials").await?;
    // The old address is told.
    eventually(Duration::from_secs(10), || async {
        Ok(w.smtp.accepted().iter().any(|raw| {
            mail_parser::MessageParser::default().parse(raw.as_bytes()).is_some_and(|m| {
                m.to().and_then(|t| t.first()).and_then(|a| a.address()) == Some("ada@example.com")
                    && m.body_text(0).is_some_and(|t| t.contains("changed to ada@new.example"))
            })
        }))
    })
    .await?;
    // A session may not change another account: the token is ada's own.
    let bob = login(&w, "bob@example.com", PASSWORD, "Test/1").await?;
    let me: Value = w.me(&bob).await?.json().await?;
    assert_eq!(me["user"]["email"], "bob@example.com");
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_admins_end_a_members_sessions_in_their_tenant_only() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    let globex = app.create_tenant("globex").await?;
    let carol = member(&app.db, &acme, Role::Member).await?;
    add_member(&app.db, &globex, &carol).await?;
    let acme_admin = member(&app.db, &acme, Role::Admin).await?;
    let as_carol =
        |tenant: &str| app.http.get(app.url("/v1/projects")).header("x-tenant", tenant).bearer_auth(&carol).send();
    assert_eq!(as_carol("acme").await?.status(), 200);
    assert_eq!(as_carol("globex").await?.status(), 200);
    // A second instance, which caches carol's session too.
    let other = TestApp::spawn_on(app.testdb.as_ref().ok_or("no db")?, AppOptions::default()).await?;
    let on_other =
        |tenant: &str| other.http.get(other.url("/v1/projects")).header("x-tenant", tenant).bearer_auth(&carol).send();
    assert_eq!(on_other("acme").await?.status(), 200);
    let me: Value = app.http.get(app.url("/v1/me")).bearer_auth(&carol).send().await?.json().await?;
    let carol_id = me["user"]["id"].as_str().ok_or("no id")?.to_owned();
    let owner_me: Value =
        app.http.get(app.url("/v1/me")).bearer_auth(app.token("acme").ok_or("token")?).send().await?.json().await?;
    let owner_id = owner_me["user"]["id"].as_str().ok_or("no id")?.to_owned();
    let end = |tenant: &str, token: &str, user: &str| {
        app.http
            .delete(app.url(&format!("/v1/members/{user}/sessions")))
            .header("x-tenant", tenant)
            .bearer_auth(token)
            .send()
    };

    // Globex's owner acting on acme is nobody there; an admin doesn't end an owner's.
    let globex_owner = app.token("globex").ok_or("token")?;
    assert_error(end("acme", &globex_owner, &carol_id).await?, 404, "not_found").await?;
    assert_error(end("acme", &acme_admin, &owner_id).await?, 403, "forbidden").await?;
    assert_error(end("acme", &acme_admin, &uuid::Uuid::now_v7().to_string()).await?, 404, "not_found").await?;
    // Acme's admin ends them in acme: carol stays signed in to globex.
    let res = end("acme", &acme_admin, &carol_id).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await?["ended"], 1);
    eventually(Duration::from_secs(1), || async { Ok(as_carol("acme").await?.status() == 401) }).await?;
    eventually(Duration::from_secs(1), || async { Ok(on_other("acme").await?.status() == 401) }).await?;
    assert_eq!(on_other("globex").await?.status(), 200);
    assert_eq!(as_carol("globex").await?.status(), 200, "her session still opens her other organization");
    assert_eq!(app.http.get(app.url("/v1/me")).bearer_auth(&carol).send().await?.status(), 200);
    // A new session opens acme again.
    let fresh = session_of(&app.db, &carol_id).await?;
    let res = app.http.get(app.url("/v1/projects")).header("x-tenant", "acme").bearer_auth(&fresh).send().await?;
    assert_eq!(res.status(), 200);
    // Recorded in acme's log (acme's plan has the audit log once it is pro).
    app.set_plan("acme", "pro").await?;
    let log: Value =
        app.req(Method::GET, "acme", "/v1/audit-log?action=member.sessions_ended").send().await?.json().await?;
    assert_eq!(log["data"][0]["target_id"], carol_id.as_str());
    assert_eq!(log["data"][0]["details"]["sessions"], 1);
    app.set_plan("globex", "pro").await?;
    let log: Value =
        app.req(Method::GET, "globex", "/v1/audit-log?action=member.sessions_ended").send().await?.json().await?;
    assert_eq!(log["data"].as_array().map(Vec::len), Some(0), "nothing happened in globex");
    Ok(())
}
