//! Rate limits counted by every instance: three servers on one database allow
//! a limit once between them, not three times, and an IPv6 client counts
//! per /64.

use std::collections::BTreeMap;

use futures_util::StreamExt as _;
use serde_json::json;

use crate::harness::{AppOptions, TestApp, TestDb, TestResult};

async fn login(app: &TestApp, address: &str) -> TestResult<u16> {
    let res = app
        .http
        .post(app.url("/v1/auth/login"))
        .header("x-forwarded-for", address)
        .json(&json!({ "email": "nobody@limits.example.com", "password": "not the password at all" }))
        .send()
        .await?;
    let status = res.status().as_u16();
    if status == 429 {
        assert!(res.headers().contains_key("retry-after"));
    }
    Ok(status)
}

#[tokio::test]
async fn three_instances_allow_a_limit_once_and_count_an_ipv6_client_per_64() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let options = AppOptions {
        settings: vec![
            ("PLINTH_CLIENT_IP_HEADER", "x-forwarded-for"),
            ("PLINTH_LIMIT_LOGIN_PER_IP", "6/1h"),
            // Only the per-address limit is under test.
            ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP", "1000/1h"),
            ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT", "1000/1h"),
        ],
        ..Default::default()
    };
    let apps = [
        TestApp::spawn_on(&testdb, options.clone()).await?,
        TestApp::spawn_on(&testdb, options.clone()).await?,
        TestApp::spawn_on(&testdb, options).await?,
    ];

    // One after another, round the three instances, from addresses of one
    // /64: six attempts in all, then refused by whichever instance is asked.
    for i in 0..6 {
        let status = login(&apps[i % 3], &format!("2001:db8:5:6::{i:x}")).await?;
        assert_eq!(status, 401, "attempt {i}");
    }
    for (i, app) in apps.iter().enumerate() {
        assert_eq!(login(app, &format!("2001:db8:5:6:ffff::{i}")).await?, 429, "instance {i}");
    }
    // Another /64, and an IPv4 client, have counts of their own.
    assert_eq!(login(&apps[1], "2001:db8:5:7::1").await?, 401);
    assert_eq!(login(&apps[2], "198.51.100.20").await?, 401);

    // At once: 30 attempts from one new /64 spread over the three instances
    // pass the limit exactly 6 times.
    let statuses = futures_util::stream::iter(0..30usize)
        .map(|i| {
            let app = &apps[i % 3];
            async move { login(app, &format!("2001:db8:9:9:{i:x}::1")).await }
        })
        .buffer_unordered(30)
        .fold(BTreeMap::<u16, u32>::new(), |mut seen, status| async move {
            *seen.entry(status.unwrap_or(0)).or_default() += 1;
            seen
        })
        .await;
    assert_eq!(statuses, BTreeMap::from([(401, 6), (429, 24)]));

    // The counts live in the shared table, hashed: no address is stored.
    let client = testdb.client().await?;
    let rows = client.query("SELECT limiter, key FROM public.rate_limits", &[]).await?;
    assert!(rows.iter().any(|r| r.get::<_, String>(0) == "login_per_ip"));
    for row in rows {
        let key: Vec<u8> = row.get(1);
        assert_eq!(key.len(), 16);
    }
    Ok(())
}
