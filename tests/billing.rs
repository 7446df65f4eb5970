//! The Stripe webhook inbox: verified, stored once, acknowledged after the
//! commit; refused and not stored otherwise.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{AppOptions, TestApp, TestDb, TestResult, assert_error};
use crate::stripe::{event, now, object, signature, v1};

const SECRET: &str = "whsec_plinth_test_secret";
const OLD_SECRET: &str = "whsec_plinth_previous_secret";

async fn app() -> TestResult<(TestApp, TestDb)> {
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(
        &testdb,
        AppOptions {
            settings: vec![("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_plinth_test_secret, whsec_plinth_previous_secret")],
            ..Default::default()
        },
    )
    .await?;
    Ok((app, testdb))
}

async fn post(app: &TestApp, body: &str, signature: Option<&str>) -> TestResult<reqwest::Response> {
    let mut req =
        app.http.request(Method::POST, app.url("/v1/webhooks/stripe")).header("content-type", "application/json");
    if let Some(signature) = signature {
        req = req.header("stripe-signature", signature);
    }
    Ok(req.body(body.to_owned()).send().await?)
}

async fn stored(testdb: &TestDb) -> TestResult<Vec<(String, String, i32, Option<String>, String)>> {
    let client = testdb.client().await?;
    let rows = client
        .query(
            "SELECT id, status, duplicates, parked_reason, payload FROM public.stripe_events ORDER BY received_at",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect())
}

fn subscription_event(id: &str) -> String {
    let mut sub = object("subscription");
    sub["id"] = json!("sub_plinth_1");
    event(id, "customer.subscription.updated", now(), sub).to_string()
}

#[tokio::test]
async fn a_signed_event_is_stored_once_and_a_redelivery_acknowledged() -> TestResult {
    let (app, testdb) = app().await?;
    let body = subscription_event("evt_plinth_1");
    let res = post(&app, &body, Some(&signature(&body, SECRET, now()))).await?;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await?;
    assert_eq!((answer["id"].as_str(), answer["duplicate"].as_bool()), (Some("evt_plinth_1"), Some(false)));
    // Acknowledged after the commit: the row is there, byte for byte.
    let rows = stored(&testdb).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].4.as_str()),
        ("evt_plinth_1", "received", body.as_str())
    );

    // Stripe delivers it again (a new signature, the same event).
    let res = post(&app, &body, Some(&signature(&body, SECRET, now()))).await?;
    let answer: Value = res.json().await?;
    assert_eq!(answer["duplicate"], true);
    let rows = stored(&testdb).await?;
    assert_eq!((rows.len(), rows[0].2), (1, 1), "still one row, one duplicate counted");
    Ok(())
}

#[tokio::test]
async fn bad_missing_and_stale_signatures_are_refused_and_nothing_is_stored() -> TestResult {
    let (app, testdb) = app().await?;
    let body = subscription_event("evt_plinth_2");
    let t = now();
    for (why, header) in [
        ("wrong secret", Some(signature(&body, "whsec_someone_else", t))),
        ("another body", Some(signature(&subscription_event("evt_other"), SECRET, t))),
        ("no v1", Some(format!("t={t}"))),
        ("garbage", Some("nonsense".to_owned())),
        ("stale: 301 s old", Some(signature(&body, SECRET, t - 301))),
        ("from the future", Some(signature(&body, SECRET, t + 301))),
        ("missing", None),
    ] {
        let res = post(&app, &body, header.as_deref()).await?;
        assert_eq!(res.status(), 400, "{why}");
        assert_error(res, 400, "invalid_request").await?;
    }
    // A body changed after signing.
    let tampered = body.replace("sub_plinth_1", "sub_plinth_9");
    assert_eq!(post(&app, &tampered, Some(&signature(&body, SECRET, t))).await?.status(), 400);
    assert!(stored(&testdb).await?.is_empty());
    // 299 s old is still within the tolerance.
    assert_eq!(post(&app, &body, Some(&signature(&body, SECRET, t - 299))).await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn secrets_rotate_without_losing_events() -> TestResult {
    let (app, testdb) = app().await?;
    let t = now();
    // The previous endpoint secret is still accepted while both are configured.
    let body = subscription_event("evt_plinth_3");
    assert_eq!(post(&app, &body, Some(&signature(&body, OLD_SECRET, t))).await?.status(), 200);
    // During a roll Stripe signs with several secrets: any matching v1 counts.
    let body = subscription_event("evt_plinth_4");
    let header = format!("t={t},v1={},v1={}", v1(&body, "whsec_retired", t), v1(&body, SECRET, t));
    assert_eq!(post(&app, &body, Some(&header)).await?.status(), 200);
    assert_eq!(stored(&testdb).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_signed_body_that_does_not_parse_is_kept_parked() -> TestResult {
    let (app, testdb) = app().await?;
    let t = now();
    let malformed = r#"{"id": "evt_plinth_5", "object": "event", "type": "customer.subscription.updated", "data": "#;
    let res = post(&app, malformed, Some(&signature(malformed, SECRET, t))).await?;
    assert_eq!(res.status(), 200, "signed: acknowledged, so Stripe stops retrying");
    // An event whose object is not what its type says.
    let wrong =
        event("evt_plinth_6", "customer.subscription.updated", t, json!({ "id": "sub_x", "object": "nonsense" }))
            .to_string();
    assert_eq!(post(&app, &wrong, Some(&signature(&wrong, SECRET, t))).await?.status(), 200);
    let rows = stored(&testdb).await?;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.1, "parked", "{row:?}");
        assert!(row.3.as_deref().is_some_and(|r| !r.is_empty()));
    }
    assert!(rows.iter().any(|r| r.4 == malformed), "the raw body is kept as received");
    // Delivered again: recognised, still one row each.
    assert_eq!(post(&app, malformed, Some(&signature(malformed, SECRET, now()))).await?.status(), 200);
    assert_eq!(stored(&testdb).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn without_a_webhook_secret_billing_is_not_configured() -> TestResult {
    let app = TestApp::spawn().await?;
    let body = subscription_event("evt_plinth_7");
    let res = post(&app, &body, Some(&signature(&body, SECRET, now()))).await?;
    assert_error(res, 503, "billing_not_configured").await?;
    Ok(())
}
