//! Ten thousand tenants on one node (not a test).
//!
//! `cargo build --release -p plinth --bins --example bench_scale && target/release/examples/bench_scale`
//!
//! `TENANTS` (default 10,000), `ROUNDS` (3), `DURATION` (10 s), `CONNS` (32),
//! `WARMUP` (20 s, over all tenants, before the rounds);
//! `SERVER_ENV` compares server settings over the same tenants, one server
//! after the other: `SERVER_ENV="PLINTH_DB_SPILL_AFTER_MS=2;PLINTH_DB_SPILL_AFTER_MS=50"`;
//! `BINARIES` compares builds the same way (space-separated paths of
//! `plinth` binaries; the release binary beside this one if unset).
//! Uses database `plinth_bench_scale` on the zero-configuration server (or
//! `DATABASE_URL`'s), recreated on every run, and needs `wrk`.
//!
//! 1. Provisions `TENANTS` tenants, each with an owner (a session) and one
//!    project, and records the catalog's size and how long `pg_dump` of one
//!    tenant's schema takes. Then settles the database (`VACUUM ANALYZE`
//!    of the catalog and platform tables, and a `CHECKPOINT`), so that
//!    catching up on the mass provisioning does not fall into the rounds.
//! 2. Starts `plinth serve` (the release binary beside this one) with 2
//!    workers, and in alternating rounds runs `wrk` with a Lua script that
//!    picks a random (tenant, token, project) for every request:
//!    `GET /v1/projects/{id}` over the first 20 tenants, then over all of
//!    them. Prints each round's throughput and p99, where the CPU went
//!    (the server's and PostgreSQL's CPU time per request, and the share
//!    of the machine's left idle), and the medians' ratios.
//! 3. After each run, reads the private memory (`Private_Clean +
//!    Private_Dirty` of `/proc/<pid>/smaps_rollup`) of every PostgreSQL
//!    backend serving the benchmark database: what the catalog caches of
//!    the schemas a backend has touched cost, and how the requests found
//!    their connection (`plinth_db_lane_checkouts_total`: a tenant's own
//!    lane, or one that had not served it), with the server's cache misses
//!    and retired connections in each phase.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plinth_tenants::{Db, DbConfig, Slug, registry};

mod common;

use common::Result;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const LUA: &str = r#"
local rows = {}
for line in io.lines(os.getenv("PLINTH_SCALE_ROWS")) do
  local slug, token, id = line:match("(%S+) (%S+) (%S+)")
  rows[#rows + 1] = { slug, token, id }
end
local limit = tonumber(os.getenv("PLINTH_SCALE_LIMIT")) or #rows
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  local r = rows[math.random(limit)]
  return wrk.format("GET", "/v1/projects/" .. r[3], { ["X-Tenant"] = r[1], ["Authorization"] = "Bearer " .. r[2] })
end
"#;

/// (requests per second, p99 in ms) of one wrk run.
fn wrk(port: u16, lua: &str, rows: &str, limit: usize, seconds: u64, conns: u64) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{conns}"), &format!("-d{seconds}s"), "--latency", "-s", lua])
        .arg(format!("http://127.0.0.1:{port}"))
        .env("PLINTH_SCALE_ROWS", rows)
        .env("PLINTH_SCALE_LIMIT", limit.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        return Err(format!("wrk saw errors:\n{text}").into());
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no throughput in wrk's output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .and_then(|v| {
            if let Some(ms) = v.strip_suffix("ms") {
                ms.parse::<f64>().ok()
            } else if let Some(us) = v.strip_suffix("us") {
                us.parse::<f64>().ok().map(|u| u / 1000.0)
            } else {
                v.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()).map(|s| s * 1000.0)
            }
        })
        .ok_or_else(|| format!("no p99 in wrk's output:\n{text}"))?;
    Ok((rps, p99))
}

/// The machine's CPU time so far, in ticks: (idle, all), from `/proc/stat`.
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .ok_or("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user and nice).
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((idle, ticks.iter().take(8).sum()))
}

/// CPU time (ticks) used so far by process `server` and by every process
/// named `postgres` (a backend that exits meanwhile takes its share with
/// it), from `/proc/<pid>/stat`.
fn process_ticks(server: u32) -> Result<(u64, u64)> {
    let ticks = |stat: &str| -> Option<(String, u64)> {
        // comm is in parentheses and may hold spaces; utime and stime are
        // the 12th and 13th fields after it.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some((comm, fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?))
    };
    let (mut own, mut postgres) = (0, 0);
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        match ticks(&stat) {
            Some((_, t)) if pid == server => own += t,
            Some((comm, t)) if comm == "postgres" => postgres += t,
            _ => {}
        }
    }
    Ok((own, postgres))
}

/// One wrk run and where the machine's CPU went meanwhile.
struct Phase {
    rps: f64,
    p99: f64,
    /// Share of the machine's CPU time left idle.
    idle: f64,
    /// CPU time per request, in µs, of the server and of PostgreSQL.
    server_us: f64,
    postgres_us: f64,
}

fn phase(server: u32, port: u16, lua: &str, rows: &str, limit: usize, seconds: u64, conns: u64) -> Result<Phase> {
    let (cpu, procs) = (cpu_ticks()?, process_ticks(server)?);
    let (rps, p99) = wrk(port, lua, rows, limit, seconds, conns)?;
    let (cpu_after, procs_after) = (cpu_ticks()?, process_ticks(server)?);
    let idle = (cpu_after.0 - cpu.0) as f64 / (cpu_after.1 - cpu.1).max(1) as f64;
    // Ticks are 10 ms (USER_HZ 100 on Linux).
    let per_request = |ticks: u64| ticks as f64 * 10_000.0 / (rps * seconds as f64).max(1.0);
    Ok(Phase {
        rps,
        p99,
        idle,
        server_us: per_request(procs_after.0.saturating_sub(procs.0)),
        postgres_us: per_request(procs_after.1.saturating_sub(procs.1)),
    })
}

/// Private memory (MiB) of each backend connected to `database`.
async fn backend_memory(client: &tokio_postgres::Client, database: &str) -> Result<Vec<f64>> {
    let pids = client
        .query("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'", &[&database])
        .await?;
    let mut sizes = Vec::new();
    for row in pids {
        let pid: i32 = row.get(0);
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { continue };
        let kib: u64 = text
            .lines()
            .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
            .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        sizes.push(kib as f64 / 1024.0);
    }
    sizes.sort_by(f64::total_cmp);
    Ok(sizes)
}

/// Counters from the server's `/metrics`, by the prefix of their series:
/// how tenant work found its connection
/// (`plinth_db_lane_checkouts_total{lane="home"}` as `lane="home"`), cache
/// misses (`cache="sessions",result="miss"`) and retired connections
/// (`reason="tenants"`).
type Counters = std::collections::BTreeMap<String, f64>;

const COUNTERS: [&str; 3] =
    ["plinth_db_lane_checkouts_total{", "plinth_cache_requests_total{", "plinth_db_connections_retired_total{"];

fn counters(port: u16) -> Result<Counters> {
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {METRICS_TOKEN}")])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| COUNTERS.iter().find_map(|prefix| l.strip_prefix(prefix)))
        .filter_map(|l| l.split_once("} "))
        .filter_map(|(labels, n)| Some((labels.to_owned(), n.trim().parse().ok()?)))
        .collect())
}

/// The change of the counters whose labels start with `prefix`, between
/// two readings.
fn changes<'a>(before: &Counters, after: &'a Counters, prefix: &str) -> Vec<(&'a str, f64)> {
    after
        .iter()
        .filter(|(labels, _)| labels.starts_with(prefix))
        .map(|(labels, n)| (labels.as_str(), n - before.get(labels).copied().unwrap_or(0.0)))
        .collect()
}

/// How the requests between two readings found their connection, as
/// shares, then the cache misses and retired connections in between.
fn found(before: &Counters, after: &Counters) -> String {
    let lanes = changes(before, after, "lane=");
    let total: f64 = lanes.iter().map(|(_, n)| n).sum();
    let shares = lanes.iter().map(|(lane, n)| {
        format!("{} {:.1} %", lane.trim_start_matches("lane=").trim_matches('"'), 100.0 * n / total.max(1.0))
    });
    let misses = changes(before, after, "cache=")
        .into_iter()
        .filter(|(labels, _)| labels.ends_with("result=\"miss\""))
        .map(|(labels, n)| format!("{n:.0} {} misses", labels.split('"').nth(1).unwrap_or(labels)));
    let retired = changes(before, after, "reason=")
        .into_iter()
        .map(|(labels, n)| format!("{n:.0} retired ({})", labels.split('"').nth(1).unwrap_or(labels)));
    shares.chain(misses).chain(retired).collect::<Vec<_>>().join(", ")
}

const METRICS_TOKEN: &str = "bench-scale-metrics";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Guards a `plinth serve` process: killed however the run ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One server's measurement over the provisioned tenants.
struct Run<'a> {
    url: &'a str,
    lua: &'a str,
    rows: &'a str,
    tenants: usize,
    rounds: u64,
    seconds: u64,
    conns: u64,
    warmup: u64,
    name: &'a str,
    binary: &'a std::path::Path,
}

impl Run<'_> {
    /// Starts `plinth serve` with `settings` on top of the defaults, warms it
    /// over all tenants, then runs the alternating rounds and prints them.
    async fn measure(&self, settings: &[(&str, &str)], client: &tokio_postgres::Client) -> Result {
        let Self { url, lua, rows, tenants, rounds, seconds, conns, name, binary, .. } = *self;
        let port = 18_090;
        let server = Server(
            Command::new(binary)
                .arg("serve")
                .env("DATABASE_URL", url)
                .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
                .env("PLINTH_WORKERS", "2")
                .env("PLINTH_METRICS_TOKEN", METRICS_TOKEN)
                .env("RUST_LOG", "warn")
                .env_remove("PLINTH_CONFIG")
                .envs(settings.iter().copied())
                .stdout(Stdio::null())
                .spawn()?,
        );
        let ready = async {
            for _ in 0..300 {
                let up = Command::new("curl")
                    .args(["-sf", "-o", "/dev/null", &format!("http://127.0.0.1:{port}/health/ready")])
                    .status()
                    .is_ok_and(|s| s.success());
                if up {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        if !ready.await {
            return Err("the server did not start".into());
        }
        // Warm-up over all tenants, so that both sides start from a server
        // that has seen them: long enough for each worker's connections to
        // meet each tenant once.
        wrk(port, lua, rows, tenants, self.warmup, conns)?;
        let (mut few, mut all) = (Vec::new(), Vec::new());
        let (mut mem_few, mut mem_all) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let before = counters(port)?;
            let pid = server.0.id();
            let f = phase(pid, port, lua, rows, 20, seconds, conns)?;
            let after_few = counters(port)?;
            mem_few = backend_memory(client, name).await?;
            let a = phase(pid, port, lua, rows, tenants, seconds, conns)?;
            let after_all = counters(port)?;
            mem_all = backend_memory(client, name).await?;
            println!(
                "round {round}: 20 tenants {:.0} req/s, p99 {:.2} ms; {tenants} tenants {:.0} req/s, p99 {:.2} ms",
                f.rps, f.p99, a.rps, a.p99
            );
            let cpu = |p: &Phase| {
                format!(
                    "server {:.0} µs, PostgreSQL {:.0} µs per request, {:.0} % idle",
                    p.server_us,
                    p.postgres_us,
                    100.0 * p.idle
                )
            };
            println!("  CPU: 20 tenants {}; {tenants} tenants {}", cpu(&f), cpu(&a));
            println!(
                "  connections found: 20 tenants {}; {tenants} tenants {}",
                found(&before, &after_few),
                found(&after_few, &after_all)
            );
            few.push((f.rps, f.p99));
            all.push((a.rps, a.p99));
        }
        let (few_rps, few_p99) = (median(few.iter().map(|r| r.0).collect()), median(few.iter().map(|r| r.1).collect()));
        let (all_rps, all_p99) = (median(all.iter().map(|r| r.0).collect()), median(all.iter().map(|r| r.1).collect()));
        println!("median over {rounds} rounds:");
        println!("  20 tenants:      {few_rps:.0} req/s, p99 {few_p99:.2} ms");
        println!(
            "  {tenants} tenants: {all_rps:.0} req/s ({:.2}x), p99 {all_p99:.2} ms ({:.2}x)",
            all_rps / few_rps,
            all_p99 / few_p99
        );
        let show = |m: &[f64]| {
            m.last().map_or_else(
                || "none".to_owned(),
                |max| format!("{} backends, max {max:.1} MiB, median {:.1} MiB", m.len(), median(m.to_vec())),
            )
        };
        println!("PostgreSQL private memory per backend after the 20-tenant run: {}", show(&mem_few));
        println!("PostgreSQL private memory per backend after the {tenants}-tenant run: {}", show(&mem_all));
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result {
    let tenants = usize::try_from(env_num("TENANTS", 10_000))?;
    let rounds = env_num("ROUNDS", 3);
    let seconds = env_num("DURATION", 10);
    let conns = env_num("CONNS", 32);
    let warmup = env_num("WARMUP", 20);
    let name = "plinth_bench_scale";
    let (url, client, admin) = common::fresh_database(name).await?;
    let db = Db::connect(&DbConfig { pool_size: 4, ..DbConfig::new(&url) })?;

    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("plinth-scale-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let rows_path = dir.join("rows.txt");
    let mut rows = std::io::BufWriter::new(std::fs::File::create(&rows_path)?);
    let (raw, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut made = 0;
    while made < tenants {
        let batch: Vec<usize> = (made..tenants.min(made + 4)).collect();
        let created = futures_util::future::try_join_all(batch.iter().map(|i| {
            let db = db.clone();
            async move {
                let slug = Slug::parse(&format!("scale-{i:05}"))?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(registry::create(&db, &slug, "Scale").await?)
            }
        }))
        .await?;
        for tenant in created {
            let user = uuid::Uuid::now_v7();
            let project = uuid::Uuid::now_v7();
            raw.execute(
                "INSERT INTO public.users (id, email, password_hash) VALUES ($1, $2, 'none')",
                &[&user, &format!("owner-{}@scale.example.com", tenant.slug)],
            )
            .await?;
            raw.execute(
                "INSERT INTO public.memberships (tenant_id, user_id, role) VALUES ($1, $2, 'owner')",
                &[&tenant.id.0, &user],
            )
            .await?;
            raw.execute(
                &format!("INSERT INTO {}.projects (id, name) VALUES ($1, 'Scale')", tenant.schema.quoted()),
                &[&project],
            )
            .await?;
            let (token, _) = db
                .platform(async |c| {
                    plinth_identity::sessions::create_session(
                        c,
                        plinth_tenants::UserId(user),
                        Duration::from_secs(24 * 3600),
                        &plinth_identity::sessions::Device::default(),
                    )
                    .await
                    .map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(format!("{e:#}")))
                })
                .await?;
            writeln!(rows, "{} {token} {project}", tenant.slug)?;
        }
        made += batch.len();
        if made % 1000 == 0 {
            eprintln!("{made} tenants ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    rows.flush()?;
    drop(rows);
    println!("provisioned {tenants} tenants with an owner and a project in {:.0} s", started.elapsed().as_secs_f64());

    let catalog: i64 = raw
        .query_one(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
             WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'r'",
            &[],
        )
        .await?
        .get(0);
    let relations: i64 = raw.query_one("SELECT count(*) FROM pg_class", &[]).await?.get(0);
    println!(
        "catalog: {relations} relations, {:.0} MiB (pg_catalog's tables with their indexes)",
        catalog as f64 / 1048576.0
    );
    let schema: String =
        raw.query_one("SELECT schema_name FROM public.tenants ORDER BY slug LIMIT 1", &[]).await?.get(0);
    let mut dumps = Vec::new();
    for _ in 0..3 {
        let began = Instant::now();
        let status = Command::new("pg_dump")
            .args(["--format=custom", "--no-sync", &format!("--schema={schema}"), "--file=/dev/null"])
            .envs(plinth_tenants::postgres::libpq_env(&url).map_err(|e| format!("{e:#}"))?)
            .status()?;
        if !status.success() {
            return Err("pg_dump failed".into());
        }
        dumps.push(began.elapsed().as_secs_f64());
    }
    println!("pg_dump --schema of one tenant among {tenants}: {:.2} s (median of 3)", median(dumps));

    // Settles the database before measuring: provisioning thousands of
    // schemas in minutes leaves autovacuum (the catalogs' dead rows) and
    // the checkpointer (hundreds of MiB of dirty pages) minutes of catching
    // up, which would fall into the rounds. Tenants that arrive over months
    // leave no such backlog.
    let began = Instant::now();
    let tables: Vec<String> = raw
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname IN ('pg_catalog', 'public')",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Two messages: VACUUM refuses to run in a string of several.
    raw.batch_execute(&format!("VACUUM (ANALYZE) {}", tables.join(", "))).await?;
    raw.batch_execute("CHECKPOINT").await?;
    println!(
        "settled: catalog and platform tables vacuumed and analyzed, then a checkpoint, in {:.0} s",
        began.elapsed().as_secs_f64()
    );

    let lua = dir.join("rotate.lua");
    std::fs::write(&lua, LUA)?;
    let (lua, rows_path) = (lua.display().to_string(), rows_path.display().to_string());
    // SERVER_ENV: settings to compare, one server per `;`-separated set of
    // `NAME=value` pairs (the defaults alone if unset).
    let variants = std::env::var("SERVER_ENV").unwrap_or_default();
    let beside = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|release| release.join("plinth"))
        .ok_or("no plinth binary beside this one")?;
    let binaries: Vec<std::path::PathBuf> = match std::env::var("BINARIES") {
        Ok(list) if !list.trim().is_empty() => list.split_whitespace().map(Into::into).collect(),
        _ => vec![beside],
    };
    for binary in &binaries {
        if binaries.len() > 1 {
            println!("server: {}", binary.display());
        }
        for variant in variants.split(';') {
            let settings: Vec<(&str, &str)> = variant.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
            if !variant.trim().is_empty() {
                println!("server settings: {}", variant.trim());
            }
            let run =
                Run { url: &url, lua: &lua, rows: &rows_path, tenants, rounds, seconds, conns, warmup, name, binary };
            run.measure(&settings, &client).await?;
        }
    }

    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    admin.shutdown();
    Ok(())
}
