//! The process around the server: graceful shutdown and zero-configuration
//! PostgreSQL.

use std::process::Stdio;
use std::time::Duration;

use plinth_tenants::{Slug, registry};
use tokio::io::AsyncWriteExt as _;

use crate::harness::{TempDir, TestDb, TestResult, eventually};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let tenant = registry::create(&testdb.db(1)?, &Slug::parse("acme")?, "Acme").await?;
    let token = crate::harness::member(&testdb.db(1)?, &tenant, plinth_access::Role::Member).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("serve")
        .env("DATABASE_URL", &testdb.url)
        .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("PLINTH_WORKERS", "1")
        .env("PLINTH_SHUTDOWN_TIMEOUT_SECS", "10")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let http = crate::harness::http_client().build()?;
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(20), || async {
        Ok(http.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status() == 200))
    })
    .await?;

    // A request whose body is still arriving when the signal comes.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    // First a whole request on the same connection, answered: the server has
    // surely accepted it before the signal.
    stream.write_all(b"GET /health/live HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await?;
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).contains("\"ok\"") {
        let mut buf = [0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await?;
        if n == 0 {
            return Err("the connection closed before the first answer".into());
        }
        first.extend_from_slice(&buf[..n]);
    }
    let body = br#"{"name": "written during shutdown"}"#;
    let head = format!(
        "POST /v1/projects HTTP/1.1\r\nhost: 127.0.0.1\r\nx-tenant: acme\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body[..10]).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pid = server.id().ok_or("no pid")?;
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    assert!(killed.success());
    // New connections are refused while the in-flight request is finishing
    // (the listener closes soon after the signal; waited for, not slept on).
    crate::harness::eventually(Duration::from_secs(10), || async {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err())
    })
    .await
    .map_err(|_| "still accepting after SIGTERM")?;

    stream.write_all(&body[10..]).await?;
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await?;
    assert!(response.starts_with("HTTP/1.1 201"), "in-flight request answered: {response}");

    let status = tokio::time::timeout(Duration::from_secs(15), server.wait()).await??;
    assert!(status.success(), "exit status {status}");
    let client = testdb.client().await?;
    let stored: i64 =
        client.query_one(&format!("SELECT count(*) FROM {}.projects", tenant.schema.quoted()), &[]).await?.get(0);
    assert_eq!(stored, 1);
    Ok(())
}

/// With nothing configured and no server answering, Plinth starts a private
/// cluster from the installed PostgreSQL binaries and stops it afterwards. Two
/// processes starting at once share one cluster; the last to leave stops it.
#[tokio::test]
async fn a_private_cluster_starts_is_shared_and_stops() -> TestResult {
    let dir = TempDir::new("cluster")?;
    let data = dir.path.join("postgres");
    let start = |data: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || plinth::pg::PrivateCluster::start(&data).map_err(|e| format!("{e:#}")))
    };
    let (first, second) = tokio::join!(start(data.clone()), start(data.clone()));
    let (first, second) = (first??, second??);
    assert_eq!(first.url("postgres"), second.url("postgres"), "one cluster, shared");

    let url = plinth::pg::ensure_database(&first.url("postgres"), "plinth").await.map_err(|e| format!("{e:#}"))?;
    let query = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok::<i32, tokio_postgres::Error>(client.query_one("SELECT 1", &[]).await?.get(0))
    };
    assert_eq!(query(url.clone()).await?, 1);

    // Whoever leaves first leaves it running for the other; the last one stops it.
    assert!(first.owns() != second.owns(), "exactly one started it");
    tokio::task::spawn_blocking(move || first.stop()).await?;
    assert_eq!(query(url.clone()).await?, 1, "stopped while another process still used it");
    tokio::task::spawn_blocking(move || second.stop()).await?;
    assert!(query(url).await.is_err(), "the last user stopped it");
    Ok(())
}

/// Several processes creating the zero-configuration database at the same
/// moment all get it (PostgreSQL reports the losers' race in two ways).
#[tokio::test]
async fn concurrent_database_creation_is_not_an_error() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let admin = testdb.url.rsplit_once('/').map(|(b, _)| format!("{b}/postgres")).ok_or("url")?;
    let name = format!("{}_zc", testdb.name);
    let attempts = (0..6).map(|_| {
        let (admin, name) = (admin.clone(), name.clone());
        tokio::spawn(async move { plinth::pg::ensure_database(&admin, &name).await.map_err(|e| format!("{e:#}")) })
    });
    for attempt in futures_util::future::join_all(attempts).await {
        assert!(attempt?.is_ok_and(|url| url.ends_with(&name)));
    }
    let client = testdb.client().await?;
    client.batch_execute(&format!("DROP DATABASE {name}")).await?;
    Ok(())
}

/// A fresh machine: with nothing answering and no server binaries, or a
/// server that wants a password, zero configuration stops and says exactly
/// what to install or which `DATABASE_URL` to set.
#[tokio::test]
async fn zero_configuration_says_what_to_install_or_set() -> TestResult {
    let data = TempDir::new("fresh")?;
    let nothing = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let local = plinth::pg::Local { address: nothing.to_string(), bin_dir: Some(data.path.join("no-binaries-here")) };
    let err = plinth::pg::prepare_with(None, &local, &data.path, "plinth").await.err().map(|e| format!("{e:#}"));
    let err = err.ok_or("prepared a database with no server and no binaries")?;
    assert!(err.contains("no PostgreSQL answers on") && err.contains("sudo apt-get install postgresql"), "{err}");
    assert!(err.contains("DATABASE_URL=postgres://USER:PASSWORD@HOST:5432/DATABASE"), "{err}");

    // A server that takes password logins only.
    let cluster = crate::processes::Cluster::init(&[])?;
    cluster.hba("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")?;
    cluster.start()?;
    let local = plinth::pg::Local { address: format!("127.0.0.1:{}", cluster.port), bin_dir: None };
    let err = plinth::pg::prepare_with(None, &local, &data.path, "plinth").await.err().map(|e| format!("{e:#}"));
    let err = err.ok_or("connected without a password")?;
    assert!(err.contains("asks for a password for user postgres"), "{err}");
    assert!(err.contains(&format!("DATABASE_URL=postgres://plinth:PASSWORD@127.0.0.1:{}/plinth", cluster.port)));
    // And no private cluster was started in its place.
    assert!(!data.path.join("postgres").exists());
    Ok(())
}
