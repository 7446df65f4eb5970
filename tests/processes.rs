//! Processes a test owns: a PostgreSQL cluster of its own (for TLS and for
//! stopping the database under a running Plinth), and `plinth serve`
//! children.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

use crate::harness::{TempDir, TestResult, eventually};

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A PostgreSQL cluster in a temporary directory, on its own port, started
/// and stopped by the test (as the `postgres` user when the tests run as
/// root). Stopped and removed on drop.
pub struct Cluster {
    bin: PathBuf,
    dir: TempDir,
    pub port: u16,
    as_postgres: bool,
}

impl Cluster {
    /// Runs initdb with the given `postgresql.conf` settings; not started.
    pub fn init(settings: &[(&str, &str)]) -> TestResult<Self> {
        let bin = plinth::pg::find_bin_dir().ok_or("PostgreSQL server binaries not found")?;
        let dir = TempDir::new("cluster")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cluster = Self { bin, dir, port, as_postgres: is_root() };
        cluster.chown()?;
        let mut initdb = Command::new(cluster.bin.join("initdb"));
        initdb.args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-instructions", "-D"]).arg(cluster.data());
        cluster.run(initdb)?;
        let conf: String = [("port", port.to_string()), ("listen_addresses", "'127.0.0.1'".into())]
            .into_iter()
            .chain([("unix_socket_directories", format!("'{}'", cluster.dir.path.display()))])
            .chain(settings.iter().map(|(k, v)| ((*k), v.to_string())))
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        let mut file = std::fs::OpenOptions::new().append(true).open(cluster.data().join("postgresql.conf"))?;
        std::io::Write::write_all(&mut file, conf.as_bytes())?;
        Ok(cluster)
    }

    /// A streaming replica of `primary` (running), copied with
    /// `pg_basebackup` and set up to follow it (`-R`); not started.
    pub fn replica_of(primary: &Cluster) -> TestResult<Self> {
        let dir = TempDir::new("replica")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cluster = Self { bin: primary.bin.clone(), dir, port, as_postgres: is_root() };
        cluster.chown()?;
        let mut backup = Command::new(cluster.bin.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"])
            .args(["-X", "stream", "-R", "-c", "fast", "-D"])
            .arg(cluster.data());
        cluster.run(backup)?;
        // The copied settings name the primary's port and socket directory.
        let conf =
            format!("port = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n", cluster.dir.path.display());
        let mut file = std::fs::OpenOptions::new().append(true).open(cluster.data().join("postgresql.conf"))?;
        std::io::Write::write_all(&mut file, conf.as_bytes())?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path.join("data")
    }

    /// A file beside the data directory, readable by the server.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    /// Writes a file the server reads (certificates, keys), owned by it.
    pub fn write(&self, name: &str, contents: &str, mode: u32) -> TestResult<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.file(name);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        self.chown()?;
        Ok(path)
    }

    /// Replaces `pg_hba.conf`.
    pub fn hba(&self, lines: &str) -> TestResult {
        std::fs::write(self.data().join("pg_hba.conf"), lines)?;
        self.chown()
    }

    fn chown(&self) -> TestResult {
        if self.as_postgres {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&self.dir.path).status()?;
            if !status.success() {
                return Err("chown of the cluster directory failed".into());
            }
        }
        Ok(())
    }

    pub fn start(&self) -> TestResult {
        let mut pg_ctl = Command::new(self.bin.join("pg_ctl"));
        pg_ctl.args(["-w", "-t", "60", "-l"]).arg(self.file("server.log")).arg("-D").arg(self.data()).arg("start");
        self.run(pg_ctl).map_err(|e| format!("{e}; server log: {}", self.log()).into())
    }

    /// Stops the server at once, as a crash or a failover would: no
    /// checkpoint, connections cut.
    pub fn stop(&self) -> TestResult {
        let mut pg_ctl = Command::new(self.bin.join("pg_ctl"));
        pg_ctl.args(["-w", "-m", "immediate", "-D"]).arg(self.data()).arg("stop");
        self.run(pg_ctl)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.file("server.log")).unwrap_or_default()
    }

    /// A URL for `database` through `host` (`localhost` or `127.0.0.1`).
    pub fn url(&self, host: &str, database: &str) -> String {
        format!("postgres://postgres@{host}:{}/{database}", self.port)
    }

    fn run(&self, cmd: Command) -> TestResult {
        let mut cmd = if self.as_postgres {
            let mut wrapped = Command::new("runuser");
            wrapped.args(["-u", "postgres", "--"]).arg(cmd.get_program()).args(cmd.get_args());
            wrapped
        } else {
            cmd
        };
        let out = cmd.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(format!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.stop();
        }
    }
}

/// `plinth serve` as a child process on a port of its own, with its output
/// kept for the test to read.
pub struct Serve {
    child: tokio::process::Child,
    pub base: String,
    output: Arc<Mutex<Vec<u8>>>,
    _data: TempDir,
}

impl Serve {
    /// Starts `plinth serve` with `env` added to the test's environment
    /// (`PLINTH_LISTEN`, `PLINTH_WORKERS=1` and a data directory are set
    /// unless `env` sets them) and waits until `/health/ready` answers 200.
    pub async fn start(env: &[(&str, &str)]) -> TestResult<Self> {
        let serve = Self::spawn(env)?;
        serve.ready(Duration::from_secs(60)).await?;
        Ok(serve)
    }

    /// Starts `plinth serve` without waiting.
    pub fn spawn(env: &[(&str, &str)]) -> TestResult<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::spawn_on(port, env)
    }

    /// Starts `plinth serve` on `port` without waiting.
    pub fn spawn_on(port: u16, env: &[(&str, &str)]) -> TestResult<Self> {
        let data = TempDir::new("serve")?;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"));
        cmd.arg("serve")
            .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("PLINTH_WORKERS", "1")
            .env("PLINTH_DATA_DIR", &data.path)
            .env("PLINTH_BILLING_SYNC_MINUTES", "0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in env {
            cmd.env(name, value);
        }
        let mut child = cmd.spawn()?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for mut pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut out) = output.lock() {
                        out.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        Ok(Self { child, base: format!("http://127.0.0.1:{port}"), output, _data: data })
    }

    /// Waits until `/health/ready` answers 200, or says why not.
    pub async fn ready(&self, within: Duration) -> TestResult {
        let http = crate::harness::http_client().build()?;
        let url = format!("{}/health/ready", self.base);
        eventually(within, || async { Ok(http.get(&url).send().await.is_ok_and(|r| r.status() == 200)) })
            .await
            .map(|_| ())
            .map_err(|e| format!("{e}; plinth serve said:\n{}", self.output()).into())
    }

    /// Everything the process wrote so far, stdout and stderr together.
    pub fn output(&self) -> String {
        self.output.lock().map(|o| String::from_utf8_lossy(&o).into_owned()).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit; its exit status.
    pub async fn terminate(&mut self) -> TestResult<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??)
    }
}

/// HAProxy in front of servers on `ports`: round robin, health checks on
/// `/health/ready` every 200 ms, and a request whose connection a server
/// refused retried on another (only that: a request that reached a server
/// is never sent twice). A new server connection per request, so that no
/// request is sent on a kept-alive connection a stopping server is closing.
pub struct Haproxy {
    child: tokio::process::Child,
    pub base: String,
    _dir: TempDir,
}

impl Haproxy {
    pub async fn start(ports: &[u16]) -> TestResult<Self> {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("haproxy is not installed (scripts/test.sh installs it)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = TempDir::new("haproxy")?;
        let servers: String =
            ports.iter().enumerate().map(|(i, p)| format!("    server plinth{i} 127.0.0.1:{p} check\n")).collect();
        let config = format!(
            "global\n    maxconn 2000\n    log stderr format raw local0\n\
             defaults\n    mode http\n    log global\n    option httplog\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\
             \x20   retries 3\n    option redispatch 1\n    retry-on conn-failure\n\
             \x20   http-reuse never\n    option http-server-close\n\
             frontend web\n    bind 127.0.0.1:{port}\n    default_backend plinth\n\
             backend plinth\n    balance roundrobin\n    option httpchk GET /health/ready\n\
             \x20   http-check expect status 200\n    default-server inter 200ms fall 2 rise 2\n{servers}"
        );
        let path = dir.path.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let check = Command::new(bin).arg("-c").arg("-f").arg(&path).output()?;
        if !check.status.success() {
            return Err(format!("haproxy -c: {}", String::from_utf8_lossy(&check.stderr)).into());
        }
        let log = std::fs::File::create(dir.path.join("haproxy.log"))?;
        let child = tokio::process::Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let proxy = Self { child, base: format!("http://127.0.0.1:{port}"), _dir: dir };
        let http = crate::harness::http_client().build()?;
        let url = format!("{}/health/ready", proxy.base);
        eventually(Duration::from_secs(30), || async {
            Ok(http.get(&url).send().await.is_ok_and(|r| r.status() == 200))
        })
        .await?;
        Ok(proxy)
    }
}

impl Haproxy {
    /// HAProxy's log of every request (`option httplog`) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
