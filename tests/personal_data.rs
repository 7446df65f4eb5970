//! A user's own data: the export mailed as a link, and erasing the account
//! with the audit logs left append-only and the person pseudonymised.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestResult, assert_error, eventually};
use crate::world::{PASSWORD, World, world};

fn token_of(body: &Value) -> TestResult<String> {
    Ok(body["token"].as_str().ok_or("no token")?.to_owned())
}

async fn audit_log(w: &World, token: &str, slug: &str) -> TestResult<Vec<Value>> {
    let res = w.as_user(token, Method::GET, slug, "/v1/audit-log?limit=100").send().await?;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await?;
    Ok(body["data"].as_array().ok_or("no data")?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_exports_their_data_then_erases_their_account() -> TestResult {
    let w = world().await?;
    let olivia = token_of(&w.signup("olivia@example.com", "acme").await?)?;
    let ada = token_of(&w.signup("ada@example.com", "adaco").await?)?;
    let gina = token_of(&w.signup("gina@example.com", "globex").await?)?;
    let id_of = async |token: &str| -> TestResult<String> {
        let me: Value = w.me(token).await?.json().await?;
        Ok(me["user"]["id"].as_str().ok_or("no id")?.to_owned())
    };
    let (ada_id, olivia_id) = (id_of(&ada).await?, id_of(&olivia).await?);
    let db = w.app.testdb.as_ref().ok_or("no db")?.client().await?;
    // Ada is also a member of acme; globex invites her address.
    db.execute(
        "INSERT INTO public.memberships (tenant_id, user_id, role) \
         SELECT id, $1::text::uuid, 'member' FROM public.tenants WHERE slug = 'acme'",
        &[&ada_id],
    )
    .await?;
    for (slug, token) in [("acme", &olivia), ("adaco", &ada), ("globex", &gina)] {
        w.set_plan(slug, "pro", token).await?;
    }
    let res = w
        .as_user(&gina, Method::POST, "globex", "/v1/invitations")
        .json(&json!({ "email": "ada@example.com", "role": "member" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    // Signing in is recorded, with the address, in each organization of the user.
    let ada = w
        .app
        .http
        .post(w.app.url("/v1/auth/login"))
        .header("user-agent", "Ada's laptop")
        .json(&json!({ "email": "ada@example.com", "password": PASSWORD }))
        .send()
        .await?
        .json::<Value>()
        .await?["token"]
        .as_str()
        .ok_or("no token")?
        .to_owned();
    w.post("/v1/auth/login", json!({ "email": "olivia@example.com", "password": PASSWORD })).await?;

    // The export.
    let res = w.app.http.post(w.app.url("/v1/me/export")).bearer_auth(&ada).send().await?;
    assert_eq!(res.status(), 202);
    let export = res.json::<Value>().await?["id"].as_str().ok_or("no id")?.to_owned();
    let path = format!("/v1/me/exports/{export}/archive");
    let token = w.mailed_token("ada@example.com", &format!("https://app.plinth.test{path}")).await?;
    let res = w.app.http.get(w.app.url(&format!("{path}?token={token}"))).send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers().get("cache-control").and_then(|v| v.to_str().ok()), Some("no-store"));
    let archive: Value = res.json().await?;
    assert_eq!(archive["account"]["email"], "ada@example.com");
    assert_eq!(archive["account"]["id"], ada_id.as_str());
    let mut slugs: Vec<&str> = archive["memberships"]
        .as_array()
        .ok_or("memberships")?
        .iter()
        .filter_map(|m| m["tenant"]["slug"].as_str())
        .collect();
    slugs.sort_unstable();
    assert_eq!(slugs, ["acme", "adaco"], "only her organizations");
    for membership in archive["memberships"].as_array().ok_or("memberships")? {
        let entries = membership["audit_entries"].as_array().ok_or("entries")?;
        assert!(entries.iter().any(|e| e["action"] == "auth.login"), "{membership}");
        for entry in entries {
            let about_her = entry["actor_id"] == ada_id.as_str() || entry["target_id"] == ada_id.as_str();
            assert!(about_her, "an entry about someone else: {entry}");
        }
    }
    assert!(!archive.to_string().contains(&olivia_id), "nothing about another user");
    assert!(!archive.to_string().contains("olivia@example.com"));
    let sessions = archive["sessions"].as_array().ok_or("sessions")?;
    assert!(sessions.iter().any(|s| s["user_agent"] == "Ada's laptop"));
    // The link needs its token, and expires.
    let res = w.app.http.get(w.app.url(&format!("{path}?token=pls_not_it"))).send().await?;
    assert_error(res, 404, "not_found").await?;
    let res = w.app.http.get(w.app.url(&path)).bearer_auth(&olivia).send().await?;
    assert_eq!(res.status(), 400, "no token: a bad request");
    db.execute("UPDATE public.personal_exports SET expires_at = now() - interval '1 second'", &[]).await?;
    let res = w.app.http.get(w.app.url(&format!("{path}?token={token}"))).send().await?;
    assert_error(res, 410, "link_expired").await?;
    let expiring: i64 = db
        .query_one(
            "SELECT count(*) FROM public.jobs WHERE kind = 'identity.personal_export_expired' AND payload->>'export_id' = $1",
            &[&export],
        )
        .await?
        .get(0);
    assert_eq!(expiring, 1, "a job empties the archive when the link expires");

    // Erasing asks again, and refuses the last owner of an organization.
    let erase = |password: &str| {
        w.app.http.delete(w.app.url("/v1/me")).bearer_auth(&ada).json(&json!({ "password": password })).send()
    };
    assert_error(erase("not the password, no").await?, 401, "invalid_credentials").await?;
    let refused = assert_error(erase(PASSWORD).await?, 409, "conflict").await?;
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("adaco")), "{refused}");
    assert_eq!(w.me(&ada).await?.status(), 200, "nothing changed");
    // Olivia becomes an owner of adaco too; now ada can go.
    db.execute(
        "INSERT INTO public.memberships (tenant_id, user_id, role) \
         SELECT id, $1::text::uuid, 'owner' FROM public.tenants WHERE slug = 'adaco'",
        &[&olivia_id],
    )
    .await?;
    assert_eq!(erase(PASSWORD).await?.status(), 204);
    eventually(Duration::from_secs(1), || async { Ok(w.me(&ada).await?.status() == 401) }).await?;
    let res = w.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await?;
    assert_error(res, 401, "invalid_credentials").await?;
    let count = async |sql: &str| -> TestResult<i64> { Ok(db.query_one(sql, &[&ada_id]).await?.get(0)) };
    assert_eq!(count("SELECT count(*) FROM public.users WHERE id = $1::text::uuid").await?, 0);
    assert_eq!(count("SELECT count(*) FROM public.memberships WHERE user_id = $1::text::uuid").await?, 0);
    assert_eq!(count("SELECT count(*) FROM public.sessions WHERE user_id = $1::text::uuid").await?, 0);
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM public.invitations WHERE email = 'ada@example.com') \
                  + (SELECT count(*) FROM public.mail_outbox WHERE recipient = 'ada@example.com') \
                  + (SELECT count(*) FROM public.users WHERE email = 'ada@example.com')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(left, 0, "no trace of the address in the platform tables");

    // The logs are append-only: her rows are still there as written...
    let schema: String = db.query_one("SELECT schema_name FROM public.tenants WHERE slug = 'acme'", &[]).await?.get(0);
    let stored: i64 = db
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".audit_log WHERE actor_id = $1::text::uuid"), &[&ada_id])
        .await?
        .get(0);
    assert!(stored > 0);
    // ...and read with a pseudonym in her place, without her address.
    let acme = audit_log(&w, &olivia, "acme").await?;
    assert!(!acme.iter().any(|e| e["actor_id"] == ada_id.as_str() || e["target_id"] == ada_id.as_str()), "{acme:?}");
    let erased = acme.iter().find(|e| e["action"] == "user.erased").ok_or("no user.erased entry")?;
    let pseudonym = erased["target_id"].as_str().ok_or("no pseudonym")?;
    assert_ne!(pseudonym, ada_id);
    let hers: Vec<&Value> = acme.iter().filter(|e| e["actor_id"] == pseudonym).collect();
    assert!(hers.iter().any(|e| e["action"] == "auth.login"), "her sign-in is still there, pseudonymised");
    assert!(hers.iter().all(|e| e["ip"].is_null()));
    let by_pseudonym =
        w.as_user(&olivia, Method::GET, "acme", &format!("/v1/audit-log?actor={pseudonym}")).send().await?;
    let by_pseudonym: Value = by_pseudonym.json().await?;
    let listed = by_pseudonym["data"].as_array().ok_or("data")?;
    assert_eq!(listed.len(), hers.len(), "filtering by the pseudonym finds her entries");
    assert!(listed.iter().all(|e| e["actor_id"] == pseudonym));
    let olivias: Vec<&Value> = acme.iter().filter(|e| e["actor_id"] == olivia_id.as_str()).collect();
    assert!(olivias.iter().any(|e| e["action"] == "auth.login" && e["ip"] == "127.0.0.1"), "others are untouched");
    // Globex's invitation entry no longer shows her address; gina's own stay.
    let globex = audit_log(&w, &gina, "globex").await?;
    let invited = globex.iter().find(|e| e["action"] == "invitation.sent").ok_or("no invitation entry")?;
    assert!(invited["details"].get("email").is_none(), "{invited}");
    assert_eq!(invited["actor_id"], id_of(&gina).await?.as_str());
    assert!(!globex.iter().any(|e| e["action"] == "user.erased"), "she was never in globex");
    let members: Value = w.as_user(&olivia, Method::GET, "acme", "/v1/members").send().await?.json().await?;
    assert!(!members.to_string().contains(&ada_id));
    w.worker.stop().await?;
    Ok(())
}
