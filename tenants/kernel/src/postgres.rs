//! Opening connections to PostgreSQL, with TLS as `DATABASE_URL` asks.
//!
//! Every connection Plinth opens (the pools, the NOTIFY listener, migrations)
//! goes through [`Target`], which honours libpq's `sslmode`:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it | no |
//! | `require` | always | no; as `verify-ca` when `sslrootcert` is given (libpq does the same) |
//! | `verify-ca` | always | chain up to `sslrootcert` |
//! | `verify-full` | always | chain up to `sslrootcert`, and the host name |
//!
//! `sslrootcert` is a PEM file, or `system` for the operating system's roots;
//! without it the verifying modes read `~/.postgresql/root.crt`, as libpq does.
//! TLS is rustls with the ring provider; no OpenSSL.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, so the two
//! verifying modes and `sslrootcert` are taken out of the URL here and become
//! the rustls configuration; tokio-postgres is told `require`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use diesel_async::AsyncPgConnection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection as tokio-postgres hands it over, TLS or not.
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// What `sslmode` asks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// No TLS (`disable`), or TLS without looking at the certificate
    /// (`prefer`, `require`).
    Nothing,
    /// The chain up to a trusted root, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

/// A parsed `DATABASE_URL` and the TLS set-up it asks for. Parse once, connect
/// many times.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    mode: &'static str,
}

impl std::fmt::Debug for Target {
    // The config holds the password; show where, not how.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("server", &self.server()).field("sslmode", &self.mode).finish()
    }
}

impl Target {
    /// Parses a libpq URL (`postgres://…?sslmode=…&sslrootcert=…`) or
    /// key/value string. Errors name the setting at fault, never the password.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (rest, ssl) = take_ssl_options(url);
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e: tokio_postgres::Error| anyhow::anyhow!("DATABASE_URL is not valid: {e}"))?;
        let (mode, verify) = match ssl.mode.as_deref() {
            None | Some("prefer") => ("prefer", Verify::Nothing),
            Some("disable") => ("disable", Verify::Nothing),
            Some("require") if ssl.root_cert.is_some() => ("require", Verify::Chain),
            Some("require") => ("require", Verify::Nothing),
            Some("verify-ca") => ("verify-ca", Verify::Chain),
            Some("verify-full") => ("verify-full", Verify::Full),
            Some(other) => anyhow::bail!(
                "DATABASE_URL: sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ),
        };
        config.ssl_mode(match mode {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let algorithms = provider.signature_verification_algorithms;
        let client = match verify {
            Verify::Nothing => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(Verifier { roots: None, algorithms }))
            }
            Verify::Chain | Verify::Full => {
                let roots = Arc::new(load_roots(ssl.root_cert.as_deref(), mode)?);
                if verify == Verify::Full {
                    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                        .build()
                        .context("building the certificate verifier")?;
                    builder.with_webpki_verifier(webpki)
                } else {
                    let chain = Verifier { roots: Some(roots), algorithms };
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(chain))
                }
            }
        }
        .with_no_client_auth();
        Ok(Self { config, tls: MakeRustlsConnect::new(client), mode })
    }

    /// `host:port/database`, for messages.
    pub fn server(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}/{}", self.config.get_dbname().unwrap_or("postgres"))
    }

    /// The `sslmode` in force.
    pub fn ssl_mode(&self) -> &'static str {
        self.mode
    }

    /// The connection settings, to add to (application name, timeouts).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// Opens one connection. The caller drives the returned [`Connection`].
    /// The error names the server and the `sslmode`, then the cause (print
    /// it with `{:#}`): `…: error performing TLS handshake: invalid peer
    /// certificate: UnknownIssuer`.
    pub async fn connect(&self) -> anyhow::Result<(tokio_postgres::Client, Connection)> {
        self.config.connect(self.tls.clone()).await.with_context(|| self.failed())
    }

    /// Opens one connection as a diesel-async connection.
    pub async fn connect_diesel(&self) -> anyhow::Result<AsyncPgConnection> {
        let (client, connection) = self.connect().await?;
        Ok(AsyncPgConnection::try_from_client_and_connection(client, connection).await?)
    }

    fn failed(&self) -> String {
        format!("connecting to PostgreSQL at {} (sslmode={})", self.server(), self.mode)
    }
}

#[derive(Default)]
struct SslOptions {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// The libpq environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
/// `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`) that reaches the server of
/// `url`, for PostgreSQL's own tools (`pg_dump`, `psql`). Given through the
/// environment rather than the command line, where any local user could
/// read the password.
pub fn libpq_env(url: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let (rest, ssl) = take_ssl_options(url);
    let config: tokio_postgres::Config =
        rest.parse().map_err(|e: tokio_postgres::Error| anyhow::anyhow!("DATABASE_URL is not valid: {e}"))?;
    let mut env = Vec::new();
    match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => env.push(("PGHOST", h.clone())),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => env.push(("PGHOST", p.display().to_string())),
        None => {}
    }
    if let Some(port) = config.get_ports().first() {
        env.push(("PGPORT", port.to_string()));
    }
    if let Some(user) = config.get_user() {
        env.push(("PGUSER", user.to_owned()));
    }
    if let Some(password) = config.get_password() {
        env.push(("PGPASSWORD", String::from_utf8_lossy(password).into_owned()));
    }
    if let Some(dbname) = config.get_dbname() {
        env.push(("PGDATABASE", dbname.to_owned()));
    }
    env.push(("PGSSLMODE", ssl.mode.unwrap_or_else(|| "prefer".to_owned())));
    if let Some(root) = ssl.root_cert {
        env.push(("PGSSLROOTCERT", root));
    }
    Ok(env)
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query string or a
/// key/value string, and returns the rest for tokio-postgres.
fn take_ssl_options(url: &str) -> (String, SslOptions) {
    let mut ssl = SslOptions::default();
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            ssl.mode = Some(value);
            true
        }
        "sslrootcert" => {
            ssl.root_cert = Some(value);
            true
        }
        _ => false,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), ssl);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned();
                !take(key, value)
            })
            .collect();
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        (rest, ssl)
    } else {
        // Key/value form; values with spaces in quotes are not taken apart
        // here (tokio-postgres still parses the rest).
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key.trim(), value.trim_matches('\'').to_owned())
            })
            .collect();
        (kept.join(" "), ssl)
    }
}

/// The roots `sslrootcert` names: a PEM file, or `system`.
fn load_roots(root_cert: Option<&str>, mode: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if root_cert == Some("system") {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A system root rustls can't parse is skipped, as a browser would.
            let _ = roots.add(cert);
        }
        anyhow::ensure!(!roots.is_empty(), "sslrootcert=system: no root certificates found on this system");
        return Ok(roots);
    }
    let path = match root_cert {
        Some(path) => PathBuf::from(path),
        None => std::env::home_dir().unwrap_or_default().join(".postgresql/root.crt"),
    };
    let pem = std::fs::read(&path).with_context(|| {
        format!(
            "sslmode={mode} checks the server's certificate against a root certificate: cannot read {} \
             (set sslrootcert=<PEM file> or sslrootcert=system in DATABASE_URL)",
            path.display()
        )
    })?;
    use rustls::pki_types::pem::PemObject as _;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("sslrootcert {}: not a PEM certificate", path.display()))?;
        roots.add(cert).with_context(|| format!("sslrootcert {}: unusable certificate", path.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "sslrootcert {}: no certificate in the file", path.display());
    Ok(roots)
}

/// The certificate check of the modes rustls's own verifier does not cover.
/// Without `roots` (`prefer`, `require`) the connection is encrypted and the
/// certificate is not checked, libpq's meaning of these modes; with them
/// (`verify-ca`) the chain must lead to one of them, and the name in the
/// certificate is not compared with the host. Either way the handshake
/// signatures are checked, so the session keys belong to whoever holds the
/// certificate.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_and_root_leave_the_url() {
        let (rest, ssl) = take_ssl_options("postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=%2Fr%2Fca.pem");
        assert_eq!(rest, "postgres://u:p@db:5432/app");
        assert_eq!(ssl.mode.as_deref(), Some("verify-full"));
        assert_eq!(ssl.root_cert.as_deref(), Some("/r/ca.pem"));
        let (rest, _) = take_ssl_options("postgres://db/app?connect_timeout=3&sslmode=require");
        assert_eq!(rest, "postgres://db/app?connect_timeout=3");
        let (rest, ssl) = take_ssl_options("host=db dbname=app sslmode=verify-ca sslrootcert=/r/ca.pem");
        assert_eq!(rest, "host=db dbname=app");
        assert_eq!(ssl.mode.as_deref(), Some("verify-ca"));
    }

    #[test]
    fn an_unknown_mode_is_named_and_the_password_is_not() {
        let err = Target::parse("postgres://u:hunter2@db/app?sslmode=verify").err().map(|e| format!("{e:#}"));
        let err = err.unwrap_or_default();
        assert!(err.contains("sslmode=verify is not one of"), "{err}");
        assert!(!err.contains("hunter2"));
        let target = Target::parse("postgres://u:hunter2@db/app?sslmode=disable").map(|t| format!("{t:?}"));
        assert!(!target.unwrap_or_default().contains("hunter2"));
    }
}
