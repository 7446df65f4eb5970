//! Test harness: a real PostgreSQL (the one `plinth` itself would use with zero
//! configuration), one database per test cloned from a migrated template and
//! dropped afterwards, the real server on port 0, and PgBouncer on demand.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use plinth::config::Settings;
use plinth::startup::Application;
use plinth_access::Role;
use plinth_http::ApiError;
use plinth_tenants::{Db, DbConfig, Slug, Tenant, TenantId, TenantStatus, registry};
use tokio::sync::OnceCell;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Server {
    /// URL of the maintenance database (`postgres`) of the test server.
    admin_url: String,
    template: String,
    host: String,
    port: u16,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn base_of(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(b, _)| b)
}

async fn admin_client(url: &str) -> TestResult<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn server() -> TestResult<&'static Server> {
    SERVER
        .get_or_try_init(|| async {
            if std::env::var_os("TEST_LOG").is_some() {
                let _ = plinth::telemetry::init(false, None);
            }
            let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pg");
            let database = plinth::pg::prepare(std::env::var("DATABASE_URL").ok().as_deref(), &data_dir, "postgres")
                .await
                .map_err(|e| format!("{e:#}"))?;
            // The private cluster, if one was started, lives as long as the process.
            std::mem::forget(database.cluster);
            let admin_url = database.url;
            let config: tokio_postgres::Config = admin_url.parse()?;
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".to_owned(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let client = admin_client(&admin_url).await?;
            drop_leftovers(&client).await?;
            let template = format!("plinth_tpl_{}", std::process::id());
            client.batch_execute(&format!("CREATE DATABASE {template}")).await?;
            let url = format!("{}/{template}", base_of(&admin_url));
            // diesel's migration harness needs a multi-thread runtime; tests may not have one.
            tokio::task::spawn_blocking(move || {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
                rt.block_on(plinth_tenants::migrate::run_platform_migrations(&url)).map_err(|e| format!("{e:#}"))?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .await??;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Server { admin_url, template, host, port })
        })
        .await
}

/// Drops databases left by earlier test processes that have exited.
async fn drop_leftovers(client: &tokio_postgres::Client) -> TestResult {
    let rows =
        client.query(r"SELECT datname FROM pg_database WHERE datname ~ '^plinth_(tpl|test)_[0-9]+'", &[]).await?;
    for row in rows {
        let name: String = row.get(0);
        let pid = name.split('_').nth(2).unwrap_or_default();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        }
    }
    Ok(())
}

/// A database of its own for one test, dropped when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
    pub host: String,
    pub port: u16,
}

impl TestDb {
    /// A database with the platform migrations applied.
    pub async fn migrated() -> TestResult<Self> {
        let server = server().await?;
        Self::create(server, Some(&server.template)).await
    }

    /// An empty database (for testing migrations themselves).
    pub async fn empty() -> TestResult<Self> {
        Self::create(server().await?, None).await
    }

    async fn create(server: &Server, template: Option<&str>) -> TestResult<Self> {
        let name = format!("plinth_test_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::SeqCst));
        let client = admin_client(&server.admin_url).await?;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        client.batch_execute(&sql).await?;
        Ok(Self {
            url: format!("{}/{name}", base_of(&server.admin_url)),
            name,
            admin_url: server.admin_url.clone(),
            host: server.host.clone(),
            port: server.port,
        })
    }

    pub fn db(&self, pool_size: usize) -> TestResult<Db> {
        let mut config = DbConfig::new(&self.url);
        config.pool_size = pool_size;
        Ok(Db::connect(&config)?)
    }

    /// A plain client on this database, for checks and for breaking things.
    pub async fn client(&self) -> TestResult<tokio_postgres::Client> {
        admin_client(&self.url).await
    }

    /// A client on the server's admin database, for what cannot be done
    /// from inside this one (`ALTER DATABASE ... ALLOW_CONNECTIONS`).
    pub async fn server_client(&self) -> TestResult<tokio_postgres::Client> {
        admin_client(&self.admin_url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop cannot await; a short-lived runtime on its own thread can.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let client = admin_client(&admin_url).await?;
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

pub const BASE_DOMAIN: &str = "plinth.test";

/// A running Plinth server on its own database.
pub struct TestApp {
    pub addr: String,
    pub db: Db,
    pub http: reqwest::Client,
    handle: actix_web::dev::ServerHandle,
    pub testdb: Option<TestDb>,
    /// The owner's session token of each tenant made with `create_tenant`,
    /// shared by instances on the same database (`with_tokens_of`).
    tokens: std::sync::Arc<std::sync::Mutex<HashMap<String, String>>>,
}

/// How to start a test server.
#[derive(Default, Clone)]
pub struct AppOptions {
    /// Database URL the app's pool uses (default: the test database).
    pub database_url: Option<String>,
    pub pool_size: Option<usize>,
    pub statement_cache: Option<bool>,
    pub max_body_bytes: Option<usize>,
    /// More settings, as environment variables would give them.
    pub settings: Vec<(&'static str, &'static str)>,
}

impl TestApp {
    pub async fn spawn() -> TestResult<Self> {
        let testdb = TestDb::migrated().await?;
        let mut app = Self::spawn_on(&testdb, AppOptions::default()).await?;
        app.testdb = Some(testdb);
        Ok(app)
    }

    /// Starts another server on an existing test database (a second
    /// instance, or one behind PgBouncer).
    pub async fn spawn_on(testdb: &TestDb, options: AppOptions) -> TestResult<Self> {
        let mut values = HashMap::new();
        values.insert("PLINTH_LISTEN".to_owned(), "127.0.0.1:0".to_owned());
        values.insert("PLINTH_BASE_DOMAIN".to_owned(), BASE_DOMAIN.to_owned());
        values.insert("PLINTH_WORKERS".to_owned(), "1".to_owned());
        values.insert("PLINTH_ENCRYPTION_KEY".to_owned(), TEST_ENCRYPTION_KEY.to_owned());
        values.insert("PLINTH_SHUTDOWN_TIMEOUT_SECS".to_owned(), "1".to_owned());
        for (key, value) in &options.settings {
            values.insert((*key).to_owned(), (*value).to_owned());
        }
        let mut settings = Settings::from_values(&values)?;
        let url = options.database_url.clone().unwrap_or_else(|| testdb.url.clone());
        settings.db_pool_size = options.pool_size.unwrap_or(4);
        settings.db_statement_cache = options.statement_cache.unwrap_or(true);
        if let Some(max) = options.max_body_bytes {
            settings.max_body_bytes = max;
        }
        let config = plinth::cli::db_config(&settings, &url);
        let db = Db::connect(&config)?;
        let app =
            Application::build(&settings, &config, testdb.url.clone(), plinth_tenants::notify::Listener::new()).await?;
        let addr = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        let http = http_client().timeout(Duration::from_secs(30)).build()?;
        let app = Self { addr, db, http, handle, testdb: None, tokens: Default::default() };
        app.wait_until_cache_trusted().await?;
        Ok(app)
    }

    /// Waits for the notification listener to connect (the resolver only
    /// caches once it is connected), so tests observe steady-state behaviour.
    async fn wait_until_cache_trusted(&self) -> TestResult {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self.http.get(format!("{}/health/ready", self.addr)).send().await?;
            if ready.status().is_success() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err("server did not become ready".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A tenant with an owner, whose session `req` uses for this tenant.
    pub async fn create_tenant(&self, slug: &str) -> TestResult<Tenant> {
        let tenant = registry::create(&self.db, &Slug::parse(slug)?, &format!("{slug} Inc.")).await?;
        let token = member(&self.db, &tenant, Role::Owner).await?;
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(slug.to_owned(), token);
        Ok(tenant)
    }

    /// A tenant made with `create_tenant`, moved to `plan`.
    pub async fn create_tenant_on(&self, slug: &str, plan: &str) -> TestResult<Tenant> {
        let tenant = self.create_tenant(slug).await?;
        self.set_plan(slug, plan).await?;
        Ok(tenant)
    }

    /// Moves a tenant made with `create_tenant` to `plan` in the database,
    /// and waits until this instance's policy has it.
    pub async fn set_plan(&self, slug: &str, plan: &str) -> TestResult {
        let tenant = self
            .db
            .platform(async |c| Ok::<_, ApiError>(registry::find_by_slug(c, slug).await?))
            .await?
            .ok_or("no such tenant")?;
        self.db
            .platform(async |c| {
                Ok::<_, ApiError>(registry::set_plan(c, tenant.id, plan, registry::PlanSource::Operator).await?)
            })
            .await?;
        eventually(Duration::from_secs(2), || async {
            let res = self.req(reqwest::Method::GET, slug, "/v1/tenant").send().await?;
            let body: serde_json::Value = res.json().await?;
            Ok(body["plan"] == plan)
        })
        .await?;
        Ok(())
    }

    /// The owner token of a tenant made with `create_tenant`.
    pub fn token(&self, slug: &str) -> Option<String> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(slug).cloned()
    }

    /// Shares the tenant owners' tokens of another instance on the same database.
    pub fn with_tokens_of(mut self, other: &TestApp) -> Self {
        self.tokens = std::sync::Arc::clone(&other.tokens);
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.addr)
    }

    /// A request for `tenant` named by the `X-Tenant` header, signed in as its
    /// owner when the tenant was made with `create_tenant`.
    pub fn req(&self, method: reqwest::Method, tenant: &str, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path)).header("x-tenant", tenant);
        match self.token(tenant) {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    pub async fn create_project(&self, tenant: &str, name: &str) -> TestResult<serde_json::Value> {
        let res = self
            .req(reqwest::Method::POST, tenant, "/v1/projects")
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await?;
        let status = res.status();
        let body: serde_json::Value = res.json().await?;
        assert_eq!(status, 201, "creating a project: {body}");
        Ok(body)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sends the stop command now; the workers wind down on their own.
        drop(self.handle.stop(false));
    }
}

/// Asserts the status and the error code of a JSON error response.
pub async fn assert_error(res: reqwest::Response, status: u16, code: &str) -> TestResult<serde_json::Value> {
    let got = res.status().as_u16();
    let body: serde_json::Value = res.json().await?;
    assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "body: {body}");
    Ok(body)
}

/// Polls `check` every 20 ms for up to `within`, returning how long it took.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> TestResult<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = TestResult<bool>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if check().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err(format!("condition not met within {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PgBouncer in transaction pooling mode in front of the test server.
pub struct PgBouncer {
    child: tokio::process::Child,
    pub port: u16,
    _dir: TempDir,
}

impl PgBouncer {
    pub async fn start(testdb: &TestDb, server_pool_size: usize) -> TestResult<Self> {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("pgbouncer is not installed (scripts/test.sh installs it)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = TempDir::new("pgbouncer")?;
        let ini = dir.path.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={host} port={pgport} user=postgres\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = any\n\
                 pool_mode = transaction\ndefault_pool_size = {server_pool_size}\nmax_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits,options,application_name\n\
                 logfile = {log}\n",
                host = testdb.host,
                pgport = testdb.port,
                log = dir.path.join("pgbouncer.log").display(),
            ),
        )?;
        let mut cmd = tokio::process::Command::new(bin);
        if std::process::Command::new("id").arg("-u").output()?.stdout.starts_with(b"0\n") {
            // PgBouncer refuses to run as root: run it as the postgres user.
            let id = |flag: &str| -> TestResult<u32> {
                let out = std::process::Command::new("id").args([flag, "postgres"]).output()?;
                Ok(String::from_utf8(out.stdout)?.trim().parse()?)
            };
            std::process::Command::new("chown").args(["-R", "postgres"]).arg(&dir.path).status()?;
            cmd.uid(id("-u")?).gid(id("-g")?);
        }
        let child = cmd.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true).spawn()?;
        let bouncer = Self { child, port, _dir: dir };
        let url = bouncer.url(&testdb.name);
        eventually(Duration::from_secs(10), || async {
            Ok(tokio_postgres::connect(&url, tokio_postgres::NoTls).await.is_ok())
        })
        .await?;
        Ok(bouncer)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A tool from the test environment's Python virtual environment
/// (`scripts/test.sh` installs it), or from the PATH.
pub fn tool(name: &str) -> std::process::Command {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin").join(name);
    std::process::Command::new(if venv.exists() { venv.into_os_string() } else { name.into() })
}

/// Runs `tests/browser/<script>` with node (playwright-core and chromium,
/// which `scripts/test.sh` installs), `env` in its environment, for at most
/// five minutes; prints its output and fails unless it exits 0. Returns
/// what it printed.
pub async fn browser_script(script: &str, env: &[(&str, &str)]) -> TestResult<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser").join(script);
    let run = tokio::process::Command::new("node").arg(&path).envs(env.iter().copied()).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .map_err(|_| format!("{script} ran for 5 minutes"))?
        .map_err(|e| format!("running node (scripts/test.sh installs it and playwright-core): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed; see its output above");
    Ok(stdout)
}

/// The key the test servers seal with (32 bytes of base64).
pub const TEST_ENCRYPTION_KEY: &str = "cGxpbnRoIHRlc3RzIHNlYWwgd2l0aCB0aGlzIGtleSE=";

/// An HTTP client for the tests. reqwest's TLS is rustls without a built-in
/// crypto provider (the app installs ring at startup); the tests install the
/// same one.
pub fn http_client() -> reqwest::ClientBuilder {
    // Already installed (by another test) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("plinth-{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs the real `plinth` binary against a test database; whether it
/// succeeded, and what it printed (standard output, then error).
pub async fn plinth_cli(testdb: &TestDb, args: &[&str]) -> TestResult<(bool, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(args)
        .env("DATABASE_URL", &testdb.url)
        .env("RUST_LOG", "warn")
        .env_remove("PLINTH_CONFIG")
        .output()
        .await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

pub async fn set_status(db: &Db, id: TenantId, status: TenantStatus) -> TestResult {
    db.platform(async |c| Ok::<_, ApiError>(registry::set_status(c, id, status).await?)).await?;
    Ok(())
}

pub async fn add_domain(db: &Db, tenant: &Tenant, domain: &str, verified: bool) -> TestResult {
    db.tenant_rows(tenant.scope(), async |rows| Ok::<_, ApiError>(registry::add_domain(rows, domain, verified).await?))
        .await?;
    Ok(())
}

/// A new user with `role` in `tenant` and a session; returns the session
/// token. (No password: these users never log in with one.)
pub async fn member(db: &Db, tenant: &Tenant, role: Role) -> TestResult<String> {
    use diesel::sql_types::{Text, Uuid as SqlUuid};
    use diesel_async::RunQueryDsl;
    let user = plinth_tenants::UserId::new();
    let (tenant_id, role) = (tenant.id.0, role.as_str());
    // The tail of a v7 id is random; its head is the time, shared within a millisecond.
    let email = format!("{}-{}@{}.example.com", role, &user.0.simple().to_string()[20..], tenant.slug);
    let token = db
        .platform(async |c| {
            diesel::sql_query("INSERT INTO public.users (id, email, password_hash) VALUES ($1, $2, 'none')")
                .bind::<SqlUuid, _>(user.0)
                .bind::<Text, _>(&email)
                .execute(c)
                .await?;
            diesel::sql_query("INSERT INTO public.memberships (tenant_id, user_id, role) VALUES ($1, $2, $3)")
                .bind::<SqlUuid, _>(tenant_id)
                .bind::<SqlUuid, _>(user.0)
                .bind::<Text, _>(role)
                .execute(c)
                .await?;
            let (token, _) =
                plinth_identity::sessions::create_session(c, user, Duration::from_secs(3600), &Default::default())
                    .await?;
            Ok::<_, ApiError>(token)
        })
        .await?;
    Ok(token)
}

/// Adds the user behind session `token` to `tenant` as a member.
pub async fn add_member(db: &Db, tenant: &Tenant, token: &str) -> TestResult {
    use diesel::sql_types::{Bytea, Uuid as SqlUuid};
    use diesel_async::RunQueryDsl;
    let hash = plinth_identity::sessions::hash_token(token);
    let tenant_id = tenant.id.0;
    db.platform(async |c| {
        diesel::sql_query(
            "INSERT INTO public.memberships (tenant_id, user_id, role) \
             SELECT $1, user_id, 'member' FROM public.sessions WHERE token_hash = $2",
        )
        .bind::<SqlUuid, _>(tenant_id)
        .bind::<Bytea, _>(&hash[..])
        .execute(c)
        .await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(())
}

/// A user with the platform admin grant, made as a viewer of `lobby`;
/// returns a session token.
pub async fn platform_admin(app: &TestApp, lobby: &Tenant) -> TestResult<String> {
    let token = member(&app.db, lobby, Role::Viewer).await?;
    let me: serde_json::Value = app
        .http
        .get(app.url("/v1/me"))
        .bearer_auth(&token)
        .header("x-tenant", lobby.slug.as_str())
        .send()
        .await?
        .json()
        .await?;
    let id: uuid::Uuid = me["user"]["id"].as_str().ok_or("no user id")?.parse()?;
    app.db.platform(async |c| Ok::<_, plinth_http::ApiError>(plinth_access::grants::grant(c, id).await?)).await?;
    Ok(token)
}

/// A new session (ten minutes) of the account `user`; its token.
pub async fn session_of(db: &Db, user: &str) -> TestResult<String> {
    let id = plinth_tenants::UserId(user.parse()?);
    let token = db
        .platform(async |c| {
            let ttl = Duration::from_secs(600);
            let (token, _) = plinth_identity::sessions::create_session(c, id, ttl, &Default::default()).await?;
            Ok::<_, ApiError>(token)
        })
        .await?;
    Ok(token)
}
