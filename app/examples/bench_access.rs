//! Access-check benchmark (not a test).
//!
//! `cargo run --release -p plinth --example bench_access`
//!
//! For 10, 10,000 and 100,000 tenants (each with an owner, an admin and a
//! viewer; plans free, pro and enterprise in turn) it loads the access
//! engine from PostgreSQL and measures one check, p50 and p99 over 200,000
//! calls, for four kinds of decision. Beside each it measures the ceiling:
//! the same decision computed directly from hash maps of roles and plans
//! (what any in-memory check must at least do), in the same run. It also
//! reports the load time and the memory the engine takes (both copies).
//!
//! Each size runs in its own child process, so memory figures start from a
//! clean heap. Uses database `plinth_bench_access` on the zero-configuration
//! server (or `DATABASE_URL`'s server), recreated per size.

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use plinth_access::Role;
use plinth_access::{Access, Action, Catalog, Decision, Need, Subject};
use plinth_tenants::{Db, DbConfig, TenantId, UserId};

mod common;

use common::Result;

const SIZES: [usize; 3] = [10, 10_000, 100_000];
const CALLS: usize = 200_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// The ceiling: the same decision from plain maps.
struct Direct {
    roles: HashMap<(TenantId, UserId), Role>,
    plans: HashMap<TenantId, &'static str>,
    features: HashMap<&'static str, HashSet<&'static str>>,
}

impl Direct {
    fn check(&self, tenant: TenantId, user: UserId, need: &Need) -> bool {
        let Some(role) = self.roles.get(&(tenant, user)) else { return false };
        let needed = match (need.resource, need.action) {
            (_, Action::Read) => Role::Viewer,
            (_, Action::Write) => Role::Member,
            ("billing", Action::Manage) => Role::Owner,
            _ => Role::Admin,
        };
        if *role < needed {
            return false;
        }
        match need.feature {
            None => true,
            Some(f) => self.plans.get(&tenant).and_then(|p| self.features.get(p)).is_some_and(|fs| fs.contains(f)),
        }
    }
}

#[tokio::main]
async fn main() -> Result {
    match std::env::args().nth(1) {
        Some(size) => measure(size.parse()?).await,
        None => {
            println!("one access check (allowed and denied), p50 / p99 over {CALLS} calls, beside the ceiling");
            let exe = std::env::current_exe()?;
            for size in SIZES {
                let status = std::process::Command::new(&exe).arg(size.to_string()).status()?;
                if !status.success() {
                    return Err(format!("the {size}-tenant run failed").into());
                }
            }
            Ok(())
        }
    }
}

async fn measure(size: usize) -> Result {
    let (url, _client, admin) = common::fresh_database("plinth_bench_access").await?;
    let (bulk, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    bulk.batch_execute(&format!(
        "INSERT INTO public.tenants (id, slug, name, schema_name, plan) \
         SELECT gen_random_uuid(), 'bulk-' || i, 'Bulk ' || i, 't_' || lpad(to_hex(i), 32, '0'), \
                (ARRAY['free', 'pro', 'enterprise'])[1 + i % 3] FROM generate_series(1, {size}) AS i;
         INSERT INTO public.users (id, email, password_hash) \
         SELECT gen_random_uuid(), 'bulk-' || i || '@example.com', 'none' FROM generate_series(1, {users}) AS i;
         INSERT INTO public.memberships (tenant_id, user_id, role) \
         SELECT t.id, u.id, (ARRAY['owner', 'admin', 'viewer'])[1 + (u.n - 1) % 3] \
         FROM (SELECT id, row_number() OVER (ORDER BY slug) AS n FROM public.tenants) t \
         JOIN (SELECT id, row_number() OVER (ORDER BY email) AS n FROM public.users) u ON (u.n - 1) / 3 + 1 = t.n;",
        users = size * 3
    ))
    .await?;
    // Every link, for the ceiling's maps; the checks use 3,000 of them.
    let rows = bulk
        .query(
            "SELECT m.tenant_id, m.user_id, m.role, t.plan FROM public.memberships m \
             JOIN public.tenants t ON t.id = m.tenant_id ORDER BY random()",
            &[],
        )
        .await?;

    let db = Db::connect(&DbConfig { pool_size: 2, ..DbConfig::new(&url) })?;
    let catalog = Catalog::default_catalog()?;
    let before = rss_kib();
    let access = Access::start(db, catalog, std::sync::Arc::new(plinth_identity::links::MembershipRoles)).await?;
    let started = Instant::now();
    // No listener here: play its connect, whose full load makes the engine
    // current, and wait for that one load. (Asking for a reload as well
    // raced it: when the writer woke between the two, it loaded twice.)
    (access.listen_handlers()[0].1)(plinth_tenants::notify::ListenEvent::Connected);
    while !access.is_current() {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("the engine did not become current".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let load = started.elapsed();
    let after = rss_kib();
    let (tenants, links) = access.counts();

    // The subjects to check, spread over the whole population.
    let mut direct = Direct {
        roles: HashMap::new(),
        plans: HashMap::new(),
        features: HashMap::from([
            ("free", HashSet::new()),
            ("pro", HashSet::from(["audit_log", "api_keys"])),
            ("enterprise", HashSet::from(["audit_log", "api_keys", "custom_domains", "data_export"])),
        ]),
    };
    let mut population = Vec::new();
    for row in &rows {
        let (tenant, user) = (TenantId(row.get(0)), UserId(row.get(1)));
        let role = Role::parse(row.get(2)).ok_or("role")?;
        let plan: &str = row.get(3);
        let plan = ["free", "pro", "enterprise"].into_iter().find(|p| *p == plan).ok_or("plan")?;
        direct.roles.insert((tenant, user), role);
        direct.plans.insert(tenant, plan);
        population.push((tenant, user, role, plan));
    }
    type Pick = fn(Role, &str) -> bool;
    let cases: [(&str, Need, Pick, bool); 4] = [
        (
            "allowed: read projects",
            Need { resource: "projects", action: Action::Read, feature: None },
            |_, _| true,
            true,
        ),
        (
            "allowed: admin reads audit log",
            Need { resource: "audit_log", action: Action::Manage, feature: Some("audit_log") },
            |r, p| r >= Role::Admin && p != "free",
            true,
        ),
        (
            "403: viewer manages members",
            Need { resource: "members", action: Action::Manage, feature: None },
            |r, _| r == Role::Viewer,
            false,
        ),
        (
            "402: audit log on free",
            Need { resource: "audit_log", action: Action::Manage, feature: Some("audit_log") },
            |r, p| r >= Role::Admin && p == "free",
            false,
        ),
    ];
    println!(
        "\n{size} tenants: {tenants} tenants and {links} role links loaded in {:.0} ms; engine memory (two copies) {:.1} MiB",
        load.as_secs_f64() * 1000.0,
        (after.saturating_sub(before)) as f64 / 1024.0
    );
    for (name, need, pick, allow) in &cases {
        let subjects: Vec<_> =
            population.iter().filter(|(_, _, r, p)| pick(*r, p)).take(3000).map(|(t, u, _, _)| (*t, *u)).collect();
        // Warm every subject into the engine first (no reads during timing).
        for (t, u) in &subjects {
            access.check(Subject::Member(*t, *u), Some(*t), need).await?;
        }
        let mut times = Vec::with_capacity(CALLS);
        let mut ceiling = Vec::with_capacity(CALLS);
        for i in 0..CALLS {
            let (t, u) = subjects[i % subjects.len()];
            let started = Instant::now();
            let decision = access.check(Subject::Member(t, u), Some(t), black_box(need)).await?;
            times.push(started.elapsed());
            let started = Instant::now();
            let direct = direct.check(t, u, black_box(need));
            ceiling.push(started.elapsed());
            if matches!(decision, Decision::Allowed { .. }) != *allow || direct != *allow {
                return Err(format!("{name}: casbin said {decision:?}, the direct check {direct}").into());
            }
        }
        times.sort();
        ceiling.sort();
        println!(
            "  {name:<32} casbin p50 {:>6.0} ns  p99 {:>6.0} ns | ceiling p50 {:>4.0} ns  p99 {:>4.0} ns",
            ns(percentile(&times, 0.5)),
            ns(percentile(&times, 0.99)),
            ns(percentile(&ceiling, 0.5)),
            ns(percentile(&ceiling, 0.99)),
        );
    }
    admin.shutdown();
    Ok(())
}
