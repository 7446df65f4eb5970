//! Passkeys end to end in a real browser: Debian's chromium with virtual
//! authenticators, driven by playwright-core (`tests/browser/passkeys.mjs`;
//! both installed by `scripts/test.sh`). This test makes the accounts, runs
//! the script on one of Plinth's pages at `http://localhost:<port>` (the
//! relying party is `localhost`, which browsers treat as a secure origin),
//! and checks what the database and the audit logs kept.

use plinth_tenants::registry;
use serde_json::Value;

use crate::harness::{AppOptions, TestApp, TestResult, browser_script};
use crate::world::{PASSWORD, world_with};

fn token_of(body: &Value) -> TestResult<String> {
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkeys_register_sign_in_alone_and_stand_in_for_the_code_in_a_browser() -> TestResult {
    let w =
        world_with(AppOptions { settings: vec![("PLINTH_BASE_DOMAIN", "localhost")], ..Default::default() }).await?;
    let app = &w.app;
    let alice = token_of(&w.signup("alice@acme.test", "acme").await?)?;
    let bob = token_of(&w.signup("bob@globex.test", "globex").await?)?;
    let dave = token_of(&w.signup("dave@initech.test", "initech").await?)?;

    // initech requires single sign-on for initech.test (its provider is
    // never reached: the refusal comes first).
    w.set_plan("initech", "enterprise", &dave).await?;
    let initech = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "initech").await?))
        .await?
        .ok_or("no initech")?;
    let client = app.testdb.as_ref().ok_or("no test db")?.client().await?;
    client
        .execute(
            "INSERT INTO public.tenant_email_domains (tenant_id, domain, token, verified_at, verified_by) \
             VALUES ($1, 'initech.test', 'proof', now(), 'dns')",
            &[&initech.id.0],
        )
        .await?;
    client
        .execute(
            "INSERT INTO public.sso_connections (tenant_id, issuer, client_id, client_secret, domains, required) \
             VALUES ($1, 'https://idp.initech.test', 'plinth', '\\x00', ARRAY['initech.test'], true)",
            &[&initech.id.0],
        )
        .await?;

    let base = app.url("").replace("127.0.0.1", "localhost");
    let base = base.trim_end_matches('/');
    // A second instance: a ceremony begun on one finishes on the other.
    let testdb = app.testdb.as_ref().ok_or("no test db")?;
    let other = TestApp::spawn_on(
        testdb,
        AppOptions { settings: vec![("PLINTH_BASE_DOMAIN", "localhost")], ..Default::default() },
    )
    .await?;
    let other_url = other.url("").replace("127.0.0.1", "localhost");
    let stdout = browser_script(
        "passkeys.mjs",
        &[
            ("BASE_URL", base),
            ("OTHER_URL", other_url.trim_end_matches('/')),
            ("PASSWORD", PASSWORD),
            ("ALICE_EMAIL", "alice@acme.test"),
            ("ALICE_TOKEN", &alice),
            ("BOB_TOKEN", &bob),
            ("DAVE_TOKEN", &dave),
        ],
    )
    .await?;

    // A session signed in with a passkey as the second factor is Alice's,
    // in her organization only.
    let session = stdout.lines().find_map(|l| l.strip_prefix("SESSION ")).ok_or("no session printed")?;
    for (tenant, status) in [("acme", 200), ("globex", 404)] {
        let res = app.http.get(app.url("/v1/projects")).header("x-tenant", tenant).bearer_auth(session).send().await?;
        assert_eq!(res.status(), status, "alice's passkey session in {tenant}");
    }

    // What the database kept: her one passkey, used.
    let rows = client
        .query(
            "SELECT p.name, p.last_used_at IS NOT NULL FROM public.passkeys p \
             JOIN public.users u ON u.id = p.user_id WHERE u.email = $1",
            &[&"alice@acme.test"],
        )
        .await?;
    let kept: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(kept, vec![("work laptop".to_owned(), true)]);
    // Every answered ceremony is used up. Two were never answered and wait
    // to expire: the registration the laptop refused (it held her passkey
    // already), and the sign-in whose answer was sent as a second factor.
    let rows = client.query("SELECT kind FROM public.passkey_ceremonies ORDER BY kind", &[]).await?;
    let left: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(left, ["register", "sign_in"]);

    // Her personal export lists her passkey by name, no key.
    let res = app.http.post(app.url("/v1/me/export")).bearer_auth(session).send().await?;
    assert_eq!(res.status(), 202);
    let export = res.json::<Value>().await?["id"].as_str().ok_or("no id")?.to_owned();
    let path = format!("/v1/me/exports/{export}/archive");
    let token = w.mailed_token("alice@acme.test", &format!("https://app.plinth.test{path}")).await?;
    let archive: Value = app.http.get(app.url(&format!("{path}?token={token}"))).send().await?.json().await?;
    let listed = archive["passkeys"].as_array().ok_or("no passkeys in the export")?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "work laptop");
    assert!(listed[0].get("static_state").is_none() && listed[0].get("credential_id").is_none());

    // acme's audit log has what happened to Alice's sign-in methods.
    let acme = app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "acme").await?))
        .await?
        .ok_or("no acme")?;
    let actions: Vec<String> = app
        .db
        .tenant(acme.scope(), async |c| {
            let entries =
                plinth_tenants::audit::read(c, plinth_tenants::audit::Filter { limit: 100, ..Default::default() })
                    .await?;
            Ok::<_, plinth_http::ApiError>(entries.into_iter().map(|e| e.action).collect())
        })
        .await?;
    for (action, times) in [("auth.passkey_added", 2), ("auth.passkey_removed", 1), ("auth.passkey_login", 2)] {
        assert_eq!(actions.iter().filter(|a| *a == action).count(), times, "{action} in {actions:?}");
    }
    Ok(())
}
