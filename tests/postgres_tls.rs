//! TLS to PostgreSQL: a cluster of the test's own with `ssl = on`, a
//! certificate for `localhost` signed by a CA the test makes, and a
//! `pg_hba.conf` that accepts TLS connections only, so any connection Plinth
//! opened in the clear would be refused.

use plinth_tenants::postgres::Target;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

use crate::harness::TestResult;
use crate::processes::{Cluster, Serve};

struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> TestResult<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    /// A server certificate for `names`, and its key, in PEM.
    fn server(&self, names: &[&str]) -> TestResult<(String, String)> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Opens a connection through [`Target`] and asks the server whether it is
/// encrypted.
async fn connect(url: &str) -> Result<bool, String> {
    let target = Target::parse(url).map_err(|e| format!("{e:#}"))?;
    let (client, connection) = target.connect().await.map_err(|e| format!("{e:#}"))?;
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn every_connection_honours_sslmode_and_verify_full_refuses_a_wrong_root_or_host() -> TestResult {
    let authority = Authority::new("Plinth test CA")?;
    let stranger = Authority::new("Someone else's CA")?;
    let (cert, key) = authority.server(&["localhost"])?;
    let cluster = Cluster::init(&[("ssl", "on")])?;
    let cert_file = cluster.write("server.crt", &cert, 0o644)?;
    let key_file = cluster.write("server.key", &key, 0o600)?;
    let root = cluster.write("root.crt", &authority.issuer.pem(), 0o644)?;
    let wrong_root = cluster.write("wrong-root.crt", &stranger.issuer.pem(), 0o644)?;
    std::fs::OpenOptions::new().append(true).open(cluster.file("data/postgresql.conf")).and_then(|mut f| {
        use std::io::Write as _;
        writeln!(f, "ssl_cert_file = '{}'\nssl_key_file = '{}'", cert_file.display(), key_file.display())
    })?;
    cluster.hba("local all all trust\nhostssl all all 127.0.0.1/32 trust\n")?;
    cluster.start()?;

    let local = cluster.url("localhost", "postgres");
    let by_ip = cluster.url("127.0.0.1", "postgres");
    let root = root.display();
    let wrong_root = wrong_root.display();

    // The verifying modes with the right root.
    assert_eq!(connect(&format!("{local}?sslmode=verify-full&sslrootcert={root}")).await, Ok(true));
    assert_eq!(connect(&format!("{by_ip}?sslmode=verify-ca&sslrootcert={root}")).await, Ok(true));
    // libpq: require with a root given checks the chain as verify-ca does.
    assert_eq!(connect(&format!("{by_ip}?sslmode=require&sslrootcert={root}")).await, Ok(true));
    // Encrypted without looking at the certificate.
    assert_eq!(connect(&format!("{by_ip}?sslmode=require")).await, Ok(true));
    assert_eq!(connect(&format!("{by_ip}?sslmode=prefer")).await, Ok(true));
    assert_eq!(connect(&by_ip).await, Ok(true), "prefer is the default");

    // A wrong root, a host name the certificate does not name, no TLS at all.
    let err = connect(&format!("{local}?sslmode=verify-full&sslrootcert={wrong_root}")).await.err();
    let err = err.ok_or("verify-full accepted a certificate from an unknown authority")?;
    assert!(err.contains("sslmode=verify-full") && err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    let err = connect(&format!("{by_ip}?sslmode=verify-ca&sslrootcert={wrong_root}")).await.err();
    assert!(err.ok_or("verify-ca accepted a wrong root")?.contains("UnknownIssuer"));
    let err = connect(&format!("{by_ip}?sslmode=verify-full&sslrootcert={root}")).await.err();
    let err = err.ok_or("verify-full accepted a certificate for another host name")?;
    assert!(err.contains("certificate not valid for name \"127.0.0.1\""), "{err}");
    let err = connect(&format!("{by_ip}?sslmode=disable")).await.err();
    assert!(err.ok_or("the server took a plain connection")?.contains("no encryption"));
    let err = connect(&format!("{local}?sslmode=verify-full&sslrootcert=/nonexistent/root.crt")).await.err();
    let err = err.ok_or("verify-full without a readable root connected")?;
    assert!(err.contains("cannot read /nonexistent/root.crt") && err.contains("sslrootcert="), "{err}");

    // `plinth migrate` refuses the wrong root and says why.
    let migrate = |url: String| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
            .arg("migrate")
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .output()
    };
    let out = migrate(format!("{local}?sslmode=verify-full&sslrootcert={wrong_root}")).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid peer certificate: UnknownIssuer"), "{stderr}");
    let out = migrate(format!("{local}?sslmode=verify-full&sslrootcert={root}")).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The whole server over verify-full: the pools, the NOTIFY listener (ready
    // waits for it) and the start-up migrations; the server accepts nothing
    // else.
    let url = format!("{local}?sslmode=verify-full&sslrootcert={root}");
    let serve = Serve::start(&[("DATABASE_URL", &url)]).await?;
    let http = crate::harness::http_client().build()?;
    let signed: serde_json::Value = http
        .post(format!("{}/v1/signup", serve.base))
        .json(&json!({
            "email": "owner@tls.example.com", "password": "a long enough password",
            "organization": "Over TLS", "slug": "over-tls",
        }))
        .send()
        .await?
        .json()
        .await?;
    let token = signed["token"].as_str().ok_or_else(|| format!("no token: {signed}"))?;
    let res = http
        .post(format!("{}/v1/projects", serve.base))
        .header("x-tenant", "over-tls")
        .bearer_auth(token)
        .json(&json!({ "name": "Encrypted" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let res = http.get(format!("{}/v1/projects", serve.base)).header("x-tenant", "over-tls").bearer_auth(token);
    let listed: serde_json::Value = res.send().await?.json().await?;
    assert_eq!(listed["data"][0]["name"], "Encrypted", "{listed}");
    let (client, connection) = Target::parse(&url)?.connect().await.map_err(|e| format!("{e:#}"))?;
    tokio::spawn(connection);
    let plain: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.backend_type = 'client backend' AND NOT s.ssl",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(plain, 0);
    let listeners: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'plinth listener'", &[])
        .await?
        .get(0);
    assert!(listeners >= 1, "the NOTIFY listener is connected over TLS");
    drop(serve);
    Ok(())
}
