//! Configuration: environment variables, optionally preceded by a file of the
//! same `NAME=value` lines (`--config FILE`, `PLINTH_CONFIG`, or `plinth.env`
//! in the working directory). The environment wins over the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use plinth_http::ratelimit::Limit;
use plinth_identity::limits::RateLimitConfig;
use plinth_tenants::crypto::Secret;

/// The settings that are secrets: each can also be read from a file named by
/// `<NAME>_FILE` (`DATABASE_URL_FILE=/run/secrets/database_url`, the
/// containers' convention), and none is ever printed ([`Secret`]).
pub const SECRETS: [&str; 7] = [
    "DATABASE_URL",
    "PLINTH_LISTEN_DATABASE_URL",
    "PLINTH_STRIPE_SECRET_KEY",
    "PLINTH_STRIPE_WEBHOOK_SECRET",
    "PLINTH_SMTP_URL",
    "PLINTH_METRICS_TOKEN",
    "PLINTH_ENCRYPTION_KEY",
];

/// Every setting Plinth reads, with its default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL`; unset means zero-configuration PostgreSQL (see `pg`).
    pub database_url: Option<Secret>,
    /// `PLINTH_LISTEN_DATABASE_URL`: the direct (not PgBouncer) URL used for
    /// LISTEN/NOTIFY. Defaults to the database URL.
    pub listen_database_url: Option<Secret>,
    /// `PLINTH_LISTEN` (default `127.0.0.1:8080`).
    pub listen: String,
    /// `PLINTH_BASE_DOMAIN` (default `localhost`): `<slug>.<base>` is a tenant.
    pub base_domain: String,
    /// `PLINTH_PUBLIC_URL` (default `http://localhost:8080`): links in mail.
    pub public_url: String,
    /// `PLINTH_DATA_DIR` (default `.plinth`): private PostgreSQL cluster, mail folder.
    pub data_dir: PathBuf,
    /// `PLINTH_DB_POOL_SIZE` (default 16).
    pub db_pool_size: usize,
    /// `PLINTH_DB_WAIT_TIMEOUT_MS` (default 5000): wait for a pooled connection.
    pub db_wait_timeout: Duration,
    /// `PLINTH_DB_CONNECT_TIMEOUT_MS` (default 5000).
    pub db_connect_timeout: Duration,
    /// `PLINTH_DB_STATEMENT_CACHE` (default true): set false behind PgBouncer
    /// in transaction mode.
    pub db_statement_cache: bool,
    /// `PLINTH_DB_MAX_TENANTS_PER_CONNECTION` (default 2000): a pooled
    /// connection scoped to more tenants than this is closed when it comes
    /// back to the pool, which bounds PostgreSQL's memory per backend.
    pub db_max_tenants_per_connection: usize,
    /// `PLINTH_DB_MAX_CONNECTION_AGE_SECS` (default 1800): a pooled
    /// connection older than this is closed when it comes back to the pool.
    pub db_max_connection_age: Duration,
    /// `PLINTH_DB_SPILL_AFTER_MS` (default 20): how long tenant work waits
    /// for its own connection before it takes any free one (see
    /// `plinth_tenants::lanes`).
    pub db_spill_after: Duration,
    /// `PLINTH_DB_MAX_CONNECTIONS` (default four times
    /// `PLINTH_DB_POOL_SIZE`): the connections one instance holds open at
    /// once to every server together, the platform database, shards and
    /// replicas (`plinth_tenants::pool::Budget`).
    pub db_max_connections: Option<usize>,
    /// `PLINTH_REPLICA_CHECK_MS` (default 500): how often each instance
    /// checks the shards' replicas (`plinth_tenants::replicas`).
    pub replica_check: Duration,
    /// `PLINTH_REPLICA_MAX_LAG_MS` (default 5000): a replica further behind
    /// its primary than this, in time, is out of rotation.
    pub replica_max_lag: Duration,
    /// `PLINTH_SPARE_SCHEMAS` (default 0, off): spare tenant schemas kept
    /// ready by the job worker, so provisioning renames one instead of
    /// running the migrations (the warm pool).
    pub spare_schemas: usize,
    /// `PLINTH_MAX_BODY_BYTES` (default 65536): larger JSON bodies get 413.
    pub max_body_bytes: usize,
    /// `PLINTH_BODY_TIMEOUT_SECS` (default 10): a request body still
    /// incomplete this long after its head is answered 408.
    pub body_timeout: Duration,
    /// `PLINTH_MAX_CONNECTIONS` (default 10000): open client connections
    /// per instance; more wait in the listen backlog.
    pub max_connections: usize,
    /// `PLINTH_HASH_CONCURRENCY` (default: the number of cores): argon2id
    /// runs at once (19 MiB each).
    pub hash_concurrency: usize,
    /// `PLINTH_HASH_WAIT_MS` (default 2000): how long a login waits for a
    /// hashing turn before it is answered 503 with `Retry-After`.
    pub hash_wait: Duration,
    /// `PLINTH_MAX_ORGANIZATIONS_PER_USER` (default 20): organizations one
    /// user may own.
    pub max_organizations_per_user: u32,
    /// `PLINTH_DNS_RESOLVER` (`ip:port`; default: the system's resolver):
    /// where verified domains' TXT records are looked up.
    pub dns_resolver: Option<std::net::SocketAddr>,
    /// `PLINTH_MIGRATION_LOCK_TIMEOUT_MS` (default 60000): how long to wait
    /// for another instance's platform migration before giving up.
    pub migration_lock_timeout: Duration,
    /// `PLINTH_MIGRATE_ON_START` (default true): `serve` migrates first.
    pub migrate_on_start: bool,
    /// `PLINTH_SHUTDOWN_TIMEOUT_SECS` (default 30): grace for in-flight requests.
    pub shutdown_timeout: Duration,
    /// `PLINTH_SHUTDOWN_DRAIN_MS` (default 0): after SIGTERM, answer not ready
    /// but keep serving this long before closing the listener.
    pub shutdown_drain: Duration,
    /// `PLINTH_WORKERS` (default: one per core).
    pub workers: Option<usize>,
    /// `PLINTH_LOG_FORMAT`: `json` or `text` (default).
    pub log_json: bool,
    /// `PLINTH_SMTP_URL`: unset means mail is written to `<data dir>/mail`.
    pub smtp_url: Option<Secret>,
    /// `PLINTH_MAIL_FROM` (default `Plinth <noreply@localhost>`).
    pub mail_from: String,
    /// `PLINTH_WORKER` (default true): `serve` also runs the job worker.
    pub run_worker: bool,
    /// `PLINTH_WORKER_CONCURRENCY` (default 4): jobs run at once per worker.
    pub worker_concurrency: usize,
    /// `PLINTH_CLIENT_IP_HEADER`: a header a proxy you control sets to the
    /// client's address (its last entry counts). Unset: the peer address.
    pub client_ip_header: Option<String>,
    /// `PLINTH_METRICS_TOKEN`: the bearer token `GET /metrics` needs;
    /// unset, it needs none.
    pub metrics_token: Option<Secret>,
    /// `PLINTH_ENCRYPTION_KEY`: 32-byte keys in base64, comma-separated; the
    /// first seals what Plinth keeps secret and must read back, all open it.
    /// Unset: a key generated into `<data dir>/encryption.key`, with a warning.
    pub encryption_key: Option<Secret>,
    /// `PLINTH_OTLP_ENDPOINT`: an OpenTelemetry collector's OTLP/HTTP base
    /// URL (`http://collector:4318`); unset, no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// `PLINTH_CORS_ORIGINS`: the web apps' origins that may call the API
    /// from a browser (commas or spaces between them); unset, none may.
    pub cors_origins: Vec<String>,
    /// `PLINTH_PLANS_FILE`: the plan catalog (default: `config/plans.toml`,
    /// built in).
    pub plans_file: Option<PathBuf>,
    /// `PLINTH_STRIPE_SECRET_KEY`, `PLINTH_STRIPE_WEBHOOK_SECRET` (one or
    /// more, comma-separated), `PLINTH_STRIPE_API_BASE`.
    pub stripe: plinth_billing::config::StripeConfig,
    /// `PLINTH_STRIPE_PRICE_PRO`, `PLINTH_STRIPE_PRICE_ENTERPRISE`: the Stripe
    /// price of a plan, over the catalog's `stripe_price`.
    pub stripe_prices: Vec<(String, String)>,
    /// `PLINTH_LIMIT_*`: rate limits of the sensitive routes, each `N/period`
    /// (`5/15m`, `30/1m`, `10/1h`, `20/30s`).
    pub limits: RateLimitConfig,
}

impl Settings {
    /// The plan catalog: `PLINTH_PLANS_FILE` or the built-in one, with the
    /// `PLINTH_STRIPE_PRICE_*` prices applied.
    pub fn catalog(&self) -> anyhow::Result<plinth_access::Catalog> {
        let mut catalog = plinth_access::Catalog::load(self.plans_file.as_deref())?;
        for (plan, price) in &self.stripe_prices {
            catalog.set_price(plan, price).with_context(|| format!("PLINTH_STRIPE_PRICE_{}", plan.to_uppercase()))?;
        }
        Ok(catalog)
    }

    /// Reads the settings from the environment and an optional file.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut values = HashMap::new();
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PLINTH_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from("plinth.env")).filter(|p| p.is_file()));
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            values.extend(parse_file(&text).with_context(|| format!("in {}", path.display()))?);
        }
        for (key, value) in std::env::vars() {
            if key == "DATABASE_URL" || key == "DATABASE_URL_FILE" || key.starts_with("PLINTH_") {
                values.insert(key, value);
            }
        }
        Self::from_values(&values)
    }

    /// Builds settings from `NAME → value`, applying defaults; a secret's
    /// `<NAME>_FILE` is read here.
    pub fn from_values(values: &HashMap<String, String>) -> anyhow::Result<Self> {
        let values = &read_secret_files(values)?;
        let get = |k: &str| values.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let num = |k: &str, default: u64| -> anyhow::Result<u64> {
            get(k).map_or(Ok(default), |v| v.parse().with_context(|| format!("{k} must be a whole number")))
        };
        let flag = |k: &str, default: bool| -> anyhow::Result<bool> {
            match get(k) {
                None => Ok(default),
                Some("1" | "true" | "yes" | "on") => Ok(true),
                Some("0" | "false" | "no" | "off") => Ok(false),
                Some(_) => bail!("{k} must be true or false"),
            }
        };
        let log_format = get("PLINTH_LOG_FORMAT").unwrap_or("text");
        if !matches!(log_format, "json" | "text") {
            bail!("PLINTH_LOG_FORMAT must be json or text");
        }
        Ok(Self {
            database_url: get("DATABASE_URL").map(Secret::new),
            listen_database_url: get("PLINTH_LISTEN_DATABASE_URL").map(Secret::new),
            listen: get("PLINTH_LISTEN").unwrap_or("127.0.0.1:8080").to_owned(),
            base_domain: get("PLINTH_BASE_DOMAIN").unwrap_or("localhost").to_owned(),
            public_url: get("PLINTH_PUBLIC_URL").unwrap_or("http://localhost:8080").to_owned(),
            data_dir: PathBuf::from(get("PLINTH_DATA_DIR").unwrap_or(".plinth")),
            db_pool_size: usize::try_from(num("PLINTH_DB_POOL_SIZE", 16)?)?.max(1),
            db_wait_timeout: Duration::from_millis(num("PLINTH_DB_WAIT_TIMEOUT_MS", 5000)?),
            db_connect_timeout: Duration::from_millis(num("PLINTH_DB_CONNECT_TIMEOUT_MS", 5000)?),
            db_statement_cache: flag("PLINTH_DB_STATEMENT_CACHE", true)?,
            db_max_tenants_per_connection: usize::try_from(num("PLINTH_DB_MAX_TENANTS_PER_CONNECTION", 2000)?)?.max(1),
            db_max_connection_age: Duration::from_secs(num("PLINTH_DB_MAX_CONNECTION_AGE_SECS", 1800)?.max(1)),
            db_spill_after: Duration::from_millis(num("PLINTH_DB_SPILL_AFTER_MS", 20)?),
            db_max_connections: get("PLINTH_DB_MAX_CONNECTIONS")
                .map(|_| num("PLINTH_DB_MAX_CONNECTIONS", 0).and_then(|n| Ok(usize::try_from(n)?.max(1))))
                .transpose()?,
            replica_check: Duration::from_millis(num("PLINTH_REPLICA_CHECK_MS", 500)?.max(10)),
            replica_max_lag: Duration::from_millis(num("PLINTH_REPLICA_MAX_LAG_MS", 5000)?),
            spare_schemas: usize::try_from(num("PLINTH_SPARE_SCHEMAS", 0)?)?,
            max_body_bytes: usize::try_from(num("PLINTH_MAX_BODY_BYTES", 64 * 1024)?)?,
            body_timeout: Duration::from_secs(num("PLINTH_BODY_TIMEOUT_SECS", 10)?.max(1)),
            max_connections: usize::try_from(num("PLINTH_MAX_CONNECTIONS", 10_000)?)?.max(1),
            hash_concurrency: match get("PLINTH_HASH_CONCURRENCY") {
                Some(v) => v.parse::<usize>().context("PLINTH_HASH_CONCURRENCY must be a whole number")?.max(1),
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            },
            hash_wait: Duration::from_millis(num("PLINTH_HASH_WAIT_MS", 2000)?),
            max_organizations_per_user: u32::try_from(num("PLINTH_MAX_ORGANIZATIONS_PER_USER", 20)?)?.max(1),
            dns_resolver: get("PLINTH_DNS_RESOLVER")
                .map(|v| v.parse())
                .transpose()
                .context("PLINTH_DNS_RESOLVER must be an address and port, such as 127.0.0.1:53")?,
            migration_lock_timeout: Duration::from_millis(num("PLINTH_MIGRATION_LOCK_TIMEOUT_MS", 60_000)?.max(1)),
            migrate_on_start: flag("PLINTH_MIGRATE_ON_START", true)?,
            shutdown_timeout: Duration::from_secs(num("PLINTH_SHUTDOWN_TIMEOUT_SECS", 30)?),
            shutdown_drain: Duration::from_millis(num("PLINTH_SHUTDOWN_DRAIN_MS", 0)?),
            workers: get("PLINTH_WORKERS").map(|v| v.parse()).transpose().context("PLINTH_WORKERS")?,
            log_json: log_format == "json",
            smtp_url: get("PLINTH_SMTP_URL").map(Secret::new),
            plans_file: get("PLINTH_PLANS_FILE").map(PathBuf::from),
            stripe: plinth_billing::config::StripeConfig {
                secret_key: get("PLINTH_STRIPE_SECRET_KEY").map(Secret::new),
                webhook_secrets: plinth_billing::config::StripeConfig::secrets(get("PLINTH_STRIPE_WEBHOOK_SECRET")),
                api_base: get("PLINTH_STRIPE_API_BASE").unwrap_or(plinth_billing::config::STRIPE_API).to_owned(),
                // Stripe's default Smart Retries try for up to two weeks.
                grace: Duration::from_secs(86_400 * num("PLINTH_BILLING_GRACE_DAYS", 14)?),
                seats_debounce: Duration::from_secs(num("PLINTH_BILLING_SEATS_DEBOUNCE_SECS", 10)?),
                meter_every: Duration::from_secs(num("PLINTH_BILLING_METER_SECS", 60)?.max(1)),
                features_from_stripe: match get("PLINTH_BILLING_FEATURES") {
                    None | Some("catalog") => false,
                    Some("stripe") => true,
                    Some(other) => bail!("PLINTH_BILLING_FEATURES must be catalog or stripe, not {other:?}"),
                },
                offline: flag("PLINTH_BILLING_OFFLINE", false)?,
                sync_every: Duration::from_secs(60 * num("PLINTH_BILLING_SYNC_MINUTES", 60)?),
                breaker_open: Duration::from_secs(num("PLINTH_STRIPE_BREAKER_SECS", 30)?.max(1)),
                livemode: match get("PLINTH_STRIPE_MODE") {
                    Some("live") => Some(true),
                    Some("test") => Some(false),
                    Some(other) => bail!("PLINTH_STRIPE_MODE must be live or test, not {other:?}"),
                    None => get("PLINTH_STRIPE_SECRET_KEY").and_then(plinth_billing::config::key_livemode),
                },
            },
            stripe_prices: ["pro", "enterprise"]
                .into_iter()
                .filter_map(|plan| {
                    let price = get(&format!("PLINTH_STRIPE_PRICE_{}", plan.to_ascii_uppercase()))?;
                    Some((plan.to_owned(), price.to_owned()))
                })
                .collect(),
            mail_from: get("PLINTH_MAIL_FROM").unwrap_or("Plinth <noreply@localhost>").to_owned(),
            run_worker: flag("PLINTH_WORKER", true)?,
            worker_concurrency: usize::try_from(num("PLINTH_WORKER_CONCURRENCY", 4)?)?.max(1),
            client_ip_header: get("PLINTH_CLIENT_IP_HEADER").map(str::to_ascii_lowercase),
            metrics_token: get("PLINTH_METRICS_TOKEN").map(Secret::new),
            encryption_key: get("PLINTH_ENCRYPTION_KEY").map(Secret::new),
            otlp_endpoint: match get("PLINTH_OTLP_ENDPOINT").map(str::trim).filter(|v| !v.is_empty()) {
                Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                    bail!("PLINTH_OTLP_ENDPOINT must be an http:// or https:// URL, like http://collector:4318")
                }
                url => url.map(str::to_owned),
            },
            cors_origins: plinth_http::cors::parse_origins(get("PLINTH_CORS_ORIGINS").unwrap_or_default())
                .map_err(|e| anyhow::anyhow!("PLINTH_CORS_ORIGINS: {e}"))?,
            limits: {
                let d = RateLimitConfig::default();
                let limit = |k: &str, default: Limit| -> anyhow::Result<Limit> {
                    get(k).map_or(Ok(default), |v| parse_limit(v).with_context(|| format!("{k} must look like 5/15m")))
                };
                RateLimitConfig {
                    login_per_ip: limit("PLINTH_LIMIT_LOGIN_PER_IP", d.login_per_ip)?,
                    login_failures_per_account_ip: limit(
                        "PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP",
                        d.login_failures_per_account_ip,
                    )?,
                    login_failures_per_account: limit(
                        "PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT",
                        d.login_failures_per_account,
                    )?,
                    signup_per_ip: limit("PLINTH_LIMIT_SIGNUP_PER_IP", d.signup_per_ip)?,
                    password_reset_per_ip: limit("PLINTH_LIMIT_PASSWORD_RESET_PER_IP", d.password_reset_per_ip)?,
                    password_reset_per_account: limit(
                        "PLINTH_LIMIT_PASSWORD_RESET_PER_ACCOUNT",
                        d.password_reset_per_account,
                    )?,
                    verify_per_ip: limit("PLINTH_LIMIT_VERIFY_PER_IP", d.verify_per_ip)?,
                    invitations_per_address: limit("PLINTH_LIMIT_INVITATIONS_PER_ADDRESS", d.invitations_per_address)?,
                    invitations_per_tenant: limit("PLINTH_LIMIT_INVITATIONS_PER_TENANT", d.invitations_per_tenant)?,
                    organizations_per_user: limit("PLINTH_LIMIT_ORGANIZATIONS_PER_USER", d.organizations_per_user)?,
                    unknown_tokens_per_ip: limit("PLINTH_LIMIT_UNKNOWN_TOKENS_PER_IP", d.unknown_tokens_per_ip)?,
                }
            },
        })
    }
}

/// `values` with each secret whose `<NAME>_FILE` is set read from that
/// file (its trailing line break dropped). Both set is an error: which one
/// was meant is not for Plinth to guess.
fn read_secret_files(values: &HashMap<String, String>) -> anyhow::Result<HashMap<String, String>> {
    let mut values = values.clone();
    for name in SECRETS {
        let file_key = format!("{name}_FILE");
        let Some(path) = values.get(&file_key).map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()) else {
            continue;
        };
        if values.get(name).is_some_and(|v| !v.trim().is_empty()) {
            bail!("{name} and {file_key} are both set: set one");
        }
        // The error names the file, never its content.
        let text = std::fs::read_to_string(&path).with_context(|| format!("{file_key}: reading {path}"))?;
        values.insert(name.to_owned(), text.trim_end_matches(['\n', '\r']).to_owned());
    }
    Ok(values)
}

/// `N/period`, the period a number and a unit: `s`, `m` or `h`.
fn parse_limit(value: &str) -> anyhow::Result<Limit> {
    let (n, period) = value.split_once('/').context("expected N/period")?;
    let burst: u32 = n.trim().parse().context("N must be a whole number")?;
    let period = period.trim();
    let unit = period.chars().last().context("a period is needed")?;
    let amount: u64 = period[..period.len() - unit.len_utf8()].parse().context("period")?;
    let seconds = match unit {
        's' => amount,
        'm' => amount * 60,
        'h' => amount * 3600,
        _ => bail!("the period's unit must be s, m or h"),
    };
    if burst == 0 || seconds == 0 {
        bail!("N and the period must be above zero");
    }
    Ok(Limit::new(burst, Duration::from_secs(seconds)))
}

fn parse_file(text: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut values = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: expected NAME=value", n + 1);
        };
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        values.insert(key.trim().to_owned(), value.to_owned());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() -> anyhow::Result<()> {
        let s = Settings::from_values(&HashMap::new())?;
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert!(s.database_url.is_none());
        let file = parse_file("# comment\nPLINTH_LISTEN = \"0.0.0.0:9000\"\nPLINTH_DB_POOL_SIZE=4\n")?;
        let s = Settings::from_values(&file)?;
        assert_eq!((s.listen.as_str(), s.db_pool_size), ("0.0.0.0:9000", 4));
        assert!(parse_file("nonsense").is_err());
        let bad: HashMap<_, _> = [("PLINTH_DB_POOL_SIZE".to_owned(), "many".to_owned())].into();
        assert!(Settings::from_values(&bad).is_err());
        assert_eq!(parse_limit("5/15m")?, Limit::new(5, Duration::from_secs(900)));
        assert_eq!(parse_limit(" 20 / 30s ")?, Limit::new(20, Duration::from_secs(30)));
        for bad in ["5", "0/1m", "5/0h", "5/1d", "x/1m", "5/m"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn secrets_come_from_files_and_never_print() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("plinth-secrets-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut values = HashMap::new();
        for (i, name) in SECRETS.iter().enumerate() {
            let path = dir.join(name);
            let value = if *name == "PLINTH_ENCRYPTION_KEY" {
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned()
            } else {
                format!("postgres://u:file-secret-{i}@db/x")
            };
            std::fs::write(&path, format!("{value}\n"))?;
            values.insert(format!("{name}_FILE"), path.display().to_string());
        }
        let s = Settings::from_values(&values)?;
        assert_eq!(s.database_url.as_ref().map(Secret::expose), Some("postgres://u:file-secret-0@db/x"));
        assert_eq!(s.stripe.webhook_secrets.len(), 1);
        assert_eq!(s.metrics_token.as_ref().map(Secret::expose), Some("postgres://u:file-secret-5@db/x"));
        let printed = format!("{s:?}");
        assert!(!printed.contains("file-secret") && !printed.contains("AAECAwQF"), "{printed}");

        // Both, or a file that is not there: an error that names the
        // setting and the file, never a value.
        let mut both = values.clone();
        both.insert("DATABASE_URL".to_owned(), "postgres://u:inline-secret@db/x".to_owned());
        let err = format!("{:#}", Settings::from_values(&both).err().ok_or_else(|| anyhow::anyhow!("both accepted"))?);
        assert!(err.contains("DATABASE_URL_FILE") && !err.contains("secret"), "{err}");
        let mut missing = HashMap::new();
        missing.insert("PLINTH_METRICS_TOKEN_FILE".to_owned(), dir.join("absent").display().to_string());
        let err = format!(
            "{:#}",
            Settings::from_values(&missing).err().ok_or_else(|| anyhow::anyhow!("a missing file accepted"))?
        );
        assert!(err.contains("PLINTH_METRICS_TOKEN_FILE") && err.contains("absent"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
