//! Tenant administration: invitations for new and existing accounts, roles,
//! the last-owner rule, removal, and the cross-tenant refusals.

use std::time::Duration;

use plinth_access::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, eventually, member};
use crate::world::{PASSWORD, world};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_accepts_an_invitation_and_works_in_the_tenant() -> TestResult {
    let w = world().await?;
    w.app.create_tenant("acme").await?;
    let res = w.invite("acme", "Grace@Example.com", "member").await?;
    assert_eq!(res.status(), 201);
    let token = w.wait_for_invitations("grace@example.com", 1).await?.remove(0);

    let res = w.accept(json!({ "token": token }), None).await?;
    assert_eq!(assert_error(res, 400, "invalid_request").await?["error"]["details"][0]["field"], "password");
    let res = w.accept(json!({ "token": token, "password": "password123" }), None).await?;
    assert_error(res, 400, "invalid_request").await?;
    let res = w.accept(json!({ "token": token, "password": PASSWORD }), None).await?;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await?;
    assert_eq!(body["role"], "member");
    let session = body["token"].as_str().ok_or("no session")?.to_owned();

    // Member: can create, cannot delete or manage members.
    let res = w.as_user(&session, Method::POST, "acme", "/v1/projects").json(&json!({ "name": "mine" })).send().await?;
    assert_eq!(res.status(), 201);
    assert_error(w.as_user(&session, Method::GET, "acme", "/v1/members").send().await?, 403, "forbidden").await?;
    // The invitation is used up; the account can sign in with its password.
    let res = w.accept(json!({ "token": token, "password": PASSWORD }), None).await?;
    assert_error(res, 400, "invalid_request").await?;
    let login = w
        .app
        .http
        .post(w.app.url("/v1/auth/login"))
        .json(&json!({ "email": "grace@example.com", "password": PASSWORD }))
        .send()
        .await?;
    assert_eq!(login.status(), 200);
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_account_joins_signed_in_or_with_its_password() -> TestResult {
    let w = world().await?;
    w.app.create_tenant("acme").await?;
    w.app.create_tenant("globex").await?;
    // Ada has an account (in another organization).
    let signup = w
        .app
        .http
        .post(w.app.url("/v1/signup"))
        .json(&json!({ "email": "ada@example.com", "password": PASSWORD, "organization": "Ada", "slug": "ada-co" }))
        .send()
        .await?;
    let ada: Value = signup.json().await?;
    let ada_session = ada["token"].as_str().ok_or("no token")?.to_owned();

    w.invite("acme", "ada@example.com", "viewer").await?;
    let acme_token = w.wait_for_invitations("ada@example.com", 1).await?.remove(0);
    assert_error(w.accept(json!({ "token": acme_token }), None).await?, 401, "unauthenticated").await?;
    let res = w.accept(json!({ "token": acme_token, "password": "not her password" }), None).await?;
    assert_error(res, 401, "invalid_credentials").await?;
    // Someone else's session cannot take Ada's invitation.
    let outsider = member(&w.app.db, &w.app.create_tenant("other").await?, Role::Owner).await?;
    assert_error(w.accept(json!({ "token": acme_token }), Some(&outsider)).await?, 403, "forbidden").await?;
    let res = w.accept(json!({ "token": acme_token }), Some(&ada_session)).await?;
    assert_eq!(res.status(), 200);
    assert!(res.json::<Value>().await?["token"].is_null(), "no new session for a signed-in user");
    assert_eq!(w.as_user(&ada_session, Method::GET, "acme", "/v1/projects").send().await?.status(), 200);

    w.invite("globex", "ada@example.com", "member").await?;
    let globex_token = w.wait_for_invitations("ada@example.com", 2).await?.remove(1);
    assert_eq!(w.accept(json!({ "token": globex_token, "password": PASSWORD }), None).await?.status(), 200);
    let me: Value = w.app.http.get(w.app.url("/v1/me")).bearer_auth(&ada_session).send().await?.json().await?;
    let slugs: Vec<&str> =
        me["memberships"].as_array().ok_or("none")?.iter().filter_map(|m| m["tenant"]["slug"].as_str()).collect();
    assert_eq!(slugs, ["acme", "ada-co", "globex"]);
    // Inviting a member again is a conflict.
    assert_error(w.invite("acme", "ada@example.com", "admin").await?, 409, "conflict").await?;
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inviting_again_resends_and_retires_the_old_link() -> TestResult {
    let w = world().await?;
    w.app.create_tenant("acme").await?;
    w.invite("acme", "grace@example.com", "member").await?;
    w.wait_for_invitations("grace@example.com", 1).await?;
    assert_eq!(w.invite("acme", "grace@example.com", "admin").await?.status(), 201);
    let tokens = w.wait_for_invitations("grace@example.com", 2).await?;
    assert_ne!(tokens[0], tokens[1]);
    assert_error(w.accept(json!({ "token": tokens[0], "password": PASSWORD }), None).await?, 400, "invalid_request")
        .await?;
    let res = w.accept(json!({ "token": tokens[1], "password": PASSWORD }), None).await?;
    assert_eq!(res.json::<Value>().await?["role"], "admin", "the latest invitation's role");
    for (body, field) in [
        (json!({ "email": "nope", "role": "member" }), "email"),
        (json!({ "email": "a@example.com", "role": "god" }), "role"),
    ] {
        let res = w.app.req(Method::POST, "acme", "/v1/invitations").json(&body).send().await?;
        assert_eq!(assert_error(res, 400, "invalid_request").await?["error"]["details"][0]["field"], field);
    }
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn roles_change_within_the_owner_rules_and_removal_is_immediate() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    let owner = app.token("acme").ok_or("no token")?;
    let admin = member(&app.db, &acme, Role::Admin).await?;
    let members: Value = app.req(Method::GET, "acme", "/v1/members").send().await?.json().await?;
    let id_of = |role: &str| -> TestResult<String> {
        Ok(members["data"]
            .as_array()
            .ok_or("no data")?
            .iter()
            .find(|m| m["role"] == role)
            .and_then(|m| m["user_id"].as_str())
            .ok_or("missing")?
            .to_owned())
    };
    let (owner_id, admin_id) = (id_of("owner")?, id_of("admin")?);
    let patch = |token: &str, who: &str, role: &str| {
        app.http
            .patch(app.url(&format!("/v1/members/{who}")))
            .header("x-tenant", "acme")
            .bearer_auth(token.to_owned())
            .json(&json!({ "role": role }))
            .send()
    };
    let delete = |token: &str, who: &str| {
        app.http
            .delete(app.url(&format!("/v1/members/{who}")))
            .header("x-tenant", "acme")
            .bearer_auth(token.to_owned())
            .send()
    };

    // The last owner can be neither demoted nor removed.
    assert_error(patch(&owner, &owner_id, "admin").await?, 409, "conflict").await?;
    assert_error(delete(&owner, &owner_id).await?, 409, "conflict").await?;
    // Only owners grant owner or touch an owner.
    assert_error(patch(&admin, &admin_id, "owner").await?, 403, "forbidden").await?;
    assert_error(patch(&admin, &owner_id, "member").await?, 403, "forbidden").await?;
    assert_error(delete(&admin, &owner_id).await?, 403, "forbidden").await?;
    assert_eq!(patch(&owner, &admin_id, "owner").await?.status(), 200);
    assert_eq!(patch(&owner, &owner_id, "member").await?.status(), 200, "no longer the last owner");
    assert_error(patch(&admin, "00000000-0000-0000-0000-000000000000", "member").await?, 404, "not_found").await?;

    // Removal: the removed member's session stops opening the tenant at once.
    let viewer = member(&app.db, &acme, Role::Viewer).await?;
    let members: Value = app
        .http
        .get(app.url("/v1/members"))
        .header("x-tenant", "acme")
        .bearer_auth(&admin)
        .send()
        .await?
        .json()
        .await?;
    let viewer_id = members["data"]
        .as_array()
        .ok_or("no data")?
        .iter()
        .find(|m| m["role"] == "viewer")
        .and_then(|m| m["user_id"].as_str())
        .ok_or("missing")?
        .to_owned();
    let list = || app.http.get(app.url("/v1/projects")).header("x-tenant", "acme").bearer_auth(viewer.clone()).send();
    assert_eq!(list().await?.status(), 200);
    assert_eq!(delete(&admin, &viewer_id).await?.status(), 204);
    eventually(Duration::from_secs(1), || async { Ok(list().await?.status() == 404) }).await?;
    Ok(())
}

#[tokio::test]
async fn one_tenants_admin_is_nobody_in_another() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("alpha").await?;
    let bravo = app.create_tenant("bravo").await?;
    let alpha_owner = app.token("alpha").ok_or("no token")?;
    let bravo_member = member(&app.db, &bravo, Role::Member).await?;
    let members: Value = app.req(Method::GET, "bravo", "/v1/members").send().await?.json().await?;
    let someone = members["data"][0]["user_id"].as_str().ok_or("none")?.to_owned();
    let attempts = [
        (Method::GET, "/v1/members".to_owned(), None),
        (Method::POST, "/v1/invitations".to_owned(), Some(json!({ "email": "x@example.com", "role": "owner" }))),
        (Method::PATCH, format!("/v1/members/{someone}"), Some(json!({ "role": "viewer" }))),
        (Method::DELETE, format!("/v1/members/{someone}"), None),
    ];
    for (method, path, body) in attempts {
        let mut req =
            app.http.request(method.clone(), app.url(&path)).header("x-tenant", "bravo").bearer_auth(&alpha_owner);
        if let Some(body) = &body {
            req = req.json(body);
        }
        assert_error(req.send().await?, 404, "not_found").await?;
        // A plain member of bravo may not manage it either.
        let mut req =
            app.http.request(method.clone(), app.url(&path)).header("x-tenant", "bravo").bearer_auth(&bravo_member);
        if let Some(body) = &body {
            req = req.json(body);
        }
        assert_error(req.send().await?, 403, "forbidden").await?;
    }
    Ok(())
}
