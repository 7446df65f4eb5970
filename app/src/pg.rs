//! Zero-configuration PostgreSQL.
//!
//! `DATABASE_URL` wins when set. Otherwise Plinth uses the server on
//! 127.0.0.1:5432 if one answers (creating database `plinth` if missing), and
//! failing that starts a private cluster from the installed PostgreSQL server
//! binaries under the data directory (as the `postgres` OS user when started
//! as root), which it stops again on shutdown.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Where the database is, and the private cluster if Plinth started one.
pub struct Database {
    pub url: String,
    pub cluster: Option<PrivateCluster>,
}

impl Database {
    /// Stops the private cluster, if any.
    pub fn shutdown(self) {
        if let Some(cluster) = self.cluster {
            cluster.stop();
        }
    }
}

/// Where zero configuration looks for PostgreSQL: a server on `address`,
/// else a private cluster from the server binaries in `bin_dir` (found on
/// the system when `None`).
#[derive(Debug, Clone)]
pub struct Local {
    pub address: String,
    pub bin_dir: Option<PathBuf>,
}

impl Default for Local {
    fn default() -> Self {
        Self { address: "127.0.0.1:5432".to_owned(), bin_dir: None }
    }
}

/// Finds or starts the database named `name`.
///
/// Falls back to a private cluster only when nothing answers on
/// 127.0.0.1:5432. A server that answers but refuses (authentication, a
/// failed `CREATE DATABASE`) is an error: silently switching to another
/// database would look like lost data.
pub async fn prepare(database_url: Option<&str>, data_dir: &Path, name: &str) -> anyhow::Result<Database> {
    prepare_with(database_url, &Local::default(), data_dir, name).await
}

/// [`prepare`], looking for the local server and binaries where `local` says.
pub async fn prepare_with(
    database_url: Option<&str>,
    local: &Local,
    data_dir: &Path,
    name: &str,
) -> anyhow::Result<Database> {
    if let Some(url) = database_url {
        return Ok(Database { url: url.to_owned(), cluster: None });
    }
    let address = &local.address;
    let admin = format!("postgres://postgres@{address}/postgres");
    match connect(&admin).await {
        Ok(client) => {
            let url = create_if_missing(&client, &admin, name).await.with_context(|| {
                format!("using the PostgreSQL server on {address} (set DATABASE_URL to use another)")
            })?;
            tracing::info!(database = name, "using the PostgreSQL server on {address}");
            return Ok(Database { url, cluster: None });
        }
        Err(err) if wants_password(&err) => bail!(
            "the PostgreSQL server on {address} asks for a password for user postgres, and zero configuration has \
             none. Set DATABASE_URL, for example DATABASE_URL=postgres://plinth:PASSWORD@{address}/plinth \
             (a role that may create the database, or owns it), or let local connections in without a password \
             (trust) in its pg_hba.conf"
        ),
        Err(err) if err.as_db_error().is_some() => {
            return Err(err).with_context(|| {
                format!("the PostgreSQL server on {address} refused the connection (set DATABASE_URL)")
            });
        }
        Err(err) => tracing::warn!(error = %err, "no PostgreSQL answers on {address}; starting a private cluster"),
    }
    let bin = match &local.bin_dir {
        Some(dir) => dir.join("initdb").is_file().then(|| dir.clone()),
        None => find_bin_dir(),
    };
    let Some(bin) = bin else {
        bail!(
            "no PostgreSQL answers on {address}, and no PostgreSQL server binaries (initdb, pg_ctl) are installed \
             to start a private one. Install PostgreSQL (Debian/Ubuntu: sudo apt-get install postgresql; \
             Fedora: sudo dnf install postgresql-server; macOS: brew install postgresql), or set \
             DATABASE_URL=postgres://USER:PASSWORD@HOST:5432/DATABASE to use a server elsewhere \
             (PLINTH_PG_BINDIR names the binaries' directory when it is somewhere unusual)"
        );
    };
    let cluster = PrivateCluster::start_with(&bin, &data_dir.join("postgres"))?;
    let url = ensure_database(&cluster.url("postgres"), name).await?;
    Ok(Database { url, cluster: Some(cluster) })
}

/// Whether the server asked for a password (or refused the login for want
/// of one): tokio-postgres reports the former as a configuration error.
fn wants_password(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    let code = err.code();
    code == Some(&SqlState::INVALID_PASSWORD)
        || code == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
        || std::error::Error::source(err).is_some_and(|cause| cause.to_string().contains("password missing"))
}

async fn connect(admin_url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = admin_url.parse()?;
    config.connect_timeout(Duration::from_secs(2));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects to the server at `admin_url`, creates database `name` if missing
/// and returns a URL for it.
pub async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let client = connect(admin_url).await.context("connecting")?;
    create_if_missing(&client, admin_url, name).await
}

async fn create_if_missing(client: &tokio_postgres::Client, admin_url: &str, name: &str) -> anyhow::Result<String> {
    if !database_exists(client, name).await? {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(err) = client.batch_execute(&sql).await {
            // Another process may have created it meanwhile: depending on the
            // moment, PostgreSQL reports duplicate_database or unique_violation.
            if !database_exists(client, name).await? {
                return Err(err).context("creating the database");
            }
        }
    }
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}

async fn database_exists(client: &tokio_postgres::Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some())
}

/// A PostgreSQL cluster owned by this process, under the data directory.
pub struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Started by this process, rather than found running.
    owned: bool,
    /// Held with a shared lock while this process uses the cluster: the last
    /// user to leave, whoever started it, is the one that stops it.
    users: std::fs::File,
}

impl PrivateCluster {
    /// Initializes (first time) and starts the cluster in `dir`, or joins the
    /// one another Plinth process already runs there. A lock file serializes
    /// processes starting at the same moment.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = find_bin_dir()
            .context("PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL or set DATABASE_URL")?;
        Self::start_with(&bin, dir)
    }

    /// [`start`](Self::start) with the server binaries in `bin`.
    pub fn start_with(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let bin = bin.to_path_buf();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let lock_path = dir.with_extension("lock");
        let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock().context("locking the private cluster")?;
        let users_path = dir.with_extension("users");
        let users = std::fs::File::create(&users_path).with_context(|| format!("creating {}", users_path.display()))?;
        users.lock_shared().context("registering as a user of the private cluster")?;
        let as_postgres = is_root();
        let mut cluster = Self { bin, dir, port: 0, as_postgres, owned: false, users };
        if let Some(port) = cluster.running_port() {
            tracing::info!(port, "joining the private PostgreSQL cluster another process started");
            cluster.port = port;
            return Ok(cluster);
        }
        cluster.port = free_port()?;
        cluster.owned = true;
        if as_postgres {
            cluster.run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&cluster.dir), false)?;
        }
        if !cluster.dir.join("PG_VERSION").exists() {
            let initdb = cluster.bin.join("initdb");
            let mut cmd = Command::new(initdb);
            cmd.args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-instructions", "-D"]).arg(&cluster.dir);
            cluster.run(&mut cmd, true).context("initdb")?;
        }
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", cluster.port, cluster.dir.display());
        let mut cmd = Command::new(cluster.bin.join("pg_ctl"));
        cmd.args(["-w", "-t", "60", "-o", &options, "-l"])
            .arg(cluster.dir.join("server.log"))
            .arg("-D")
            .arg(&cluster.dir)
            .arg("start");
        cluster.run(&mut cmd, true).context("starting the private PostgreSQL cluster")?;
        tracing::info!(port = cluster.port, dir = %cluster.dir.display(), "private PostgreSQL cluster started");
        Ok(cluster)
    }

    /// The port of a server already running on this data directory.
    fn running_port(&self) -> Option<u16> {
        let mut status = Command::new(self.bin.join("pg_ctl"));
        status.arg("-D").arg(&self.dir).arg("status");
        self.run(&mut status, true).ok()?;
        // postmaster.pid: pid, data directory, start time, port, ...
        std::fs::read_to_string(self.dir.join("postmaster.pid")).ok()?.lines().nth(3)?.trim().parse().ok()
    }

    /// Whether this process started the cluster.
    pub fn owns(&self) -> bool {
        self.owned
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the cluster (fast shutdown) if no other Plinth process still
    /// uses it; otherwise leaves it to the last one.
    pub fn stop(&self) {
        if self.users.try_lock().is_err() {
            tracing::info!("the private PostgreSQL cluster is still used by another process; leaving it running");
            return;
        }
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.args(["-w", "-m", "fast", "-D"]).arg(&self.dir).arg("stop");
        match self.run(&mut cmd, true) {
            Ok(()) => tracing::info!("private PostgreSQL cluster stopped"),
            Err(err) => tracing::warn!(error = format!("{err:#}"), "stopping the private PostgreSQL cluster failed"),
        }
    }

    fn run(&self, cmd: &mut Command, as_postgres: bool) -> anyhow::Result<()> {
        let mut cmd = if as_postgres && self.as_postgres {
            let mut wrapped = Command::new("runuser");
            wrapped.args(["-u", "postgres", "--"]).arg(cmd.get_program()).args(cmd.get_args());
            wrapped
        } else {
            std::mem::replace(cmd, Command::new("true"))
        };
        let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
        if !out.status.success() {
            bail!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// The directory of the installed PostgreSQL server binaries (`initdb`, `pg_ctl`).
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PLINTH_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    // Debian/Ubuntu keep each major version apart; take the newest.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    bin.join("initdb").is_file().then_some(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}
