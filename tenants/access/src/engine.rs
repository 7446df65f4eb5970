//! The engine: two casbin copies kept current from PostgreSQL, and the
//! decision for one subject, tenant and need.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::catalog::Catalog;
use crate::model::{Decision, Need, Subject, feature_node};
use crate::snapshot::{self, Fact, Rules, Snapshot, TenantPolicy};

use crate::error::AccessError;
use crate::grants;
use crate::roles::{Role, RoleSource};
use plinth_tenants::db::{Db, PgConn};
use plinth_tenants::ids::{TenantId, UserId};
use plinth_tenants::notify::{Handler, ListenEvent};
use plinth_tenants::registry::{self, PlanStatus};

/// The access model (casbin), with comments.
pub const MODEL: &str = include_str!("../../../config/access/model.conf");
/// Role templates and role inheritance.
pub const POLICY: &str = include_str!("../../../config/access/policy.csv");

/// NOTIFY channel: a tenant's plan or status changed (payload: tenant id).
pub const TENANT_POLICY_CHANNEL: &str = "plinth_tenant_policy";
/// NOTIFY channel: a membership changed (payload: `tenant:user`).
pub const MEMBERSHIPS_CHANNEL: &str = "plinth_memberships";
/// NOTIFY channel: an API key was created or revoked (payload: key id).
pub const API_KEYS_CHANNEL: &str = "plinth_api_keys";
/// NOTIFY channel: a platform admin grant changed (payload: user id).
pub const PLATFORM_ADMINS_CHANNEL: &str = "plinth_platform_admins";

fn uuid(s: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(s).ok()
}

/// What the policy holds for one caller, ready to be checked.
pub struct Asked {
    /// The role in the tenant (tenant subjects).
    pub role: Option<Role>,
    /// The tenant's policy (tenant subjects).
    pub policy: Option<TenantPolicy>,
    /// The names casbin is asked about: the subject and tenant nodes, or,
    /// read directly, the role and plan nodes themselves.
    sub: String,
    ten: String,
    role_node: String,
    snapshot: Arc<Snapshot>,
}

impl Asked {
    fn plan_key(&self) -> PlanKey {
        match &self.policy {
            Some(policy) if policy.active => PlanKey::Plan(policy.plan.clone()),
            Some(_) => PlanKey::Inactive,
            None => PlanKey::Platform,
        }
    }
}

/// A change the writer must re-read from PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    Membership(TenantId, UserId),
    ApiKey(uuid::Uuid),
    Tenant(TenantId),
    PlatformAdmin(UserId),
}

enum Msg {
    Refresh(Vec<Change>, Option<oneshot::Sender<()>>),
    /// Reload everything; with the listener epoch it was asked in, when a
    /// (re)connect asked for it.
    Reload(Option<oneshot::Sender<()>>, Option<u64>),
}

/// Decisions casbin has made, by what decides them: the role node, the
/// plan the tenant is treated as (see [`Asked::plan_key`]) and the need.
type Decisions = HashMap<(String, PlanKey, Need), Decision>;

/// More than roles × plans × needs ever make; past it nothing more is kept.
const MAX_DECISIONS: usize = 10_000;

/// The plan side of a decision: the plan of an active tenant, a tenant
/// with no plan (not active), or a platform route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PlanKey {
    Plan(String),
    Inactive,
    Platform,
}

/// The access engine of one process, shared by every worker.
pub struct Access {
    current: Arc<RwLock<Arc<Snapshot>>>,
    /// What casbin answered, remembered: see [`Access::decide`].
    decisions: parking_lot::RwLock<Decisions>,
    rules: Arc<Rules>,
    catalog: Arc<Catalog>,
    writer: mpsc::UnboundedSender<Msg>,
    db: Db,
    /// Identity's answer to "which role does this member or key hold".
    roles: Arc<dyn RoleSource>,
    /// Loaded while the listener has stayed connected: the engine is current.
    trusted: Arc<AtomicBool>,
    /// Bumped on every disconnect, so a reload that began before one does
    /// not mark the engine current.
    epoch: Arc<AtomicU64>,
}

impl Access {
    /// An engine that knows the templates and the catalog and learns links
    /// as they are used, until the first full load (run when the listener
    /// connects, see [`Access::listen_handlers`]) brings in the rest.
    pub async fn start(db: Db, catalog: Catalog, roles: Arc<dyn RoleSource>) -> anyhow::Result<Arc<Self>> {
        let rules = Arc::new(Rules::parse(MODEL, POLICY)?);
        let catalog = Arc::new(catalog);
        let first = Snapshot::build(&rules, &catalog, &[]).await?;
        let spare = Snapshot::build(&rules, &catalog, &[]).await?;
        let current = Arc::new(RwLock::new(Arc::new(first)));
        let (tx, rx) = mpsc::unbounded_channel();
        let trusted = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            db: db.clone(),
            roles: Arc::clone(&roles),
            rules: Arc::clone(&rules),
            catalog: Arc::clone(&catalog),
            current: Arc::clone(&current),
            spare: Arc::new(spare),
            rx,
            retry: tx.downgrade(),
            trusted: Arc::clone(&trusted),
            epoch: Arc::clone(&epoch),
        };
        tokio::spawn(writer.run());
        Ok(Arc::new(Self {
            current,
            decisions: parking_lot::RwLock::default(),
            rules,
            catalog,
            writer: tx,
            db,
            roles,
            trusted,
            epoch,
        }))
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Asks the writer to re-read `changes` and waits until they are applied.
    async fn refresh(&self, changes: Vec<Change>) -> Result<(), AccessError> {
        let (done, applied) = oneshot::channel();
        self.writer.send(Msg::Refresh(changes, Some(done))).map_err(|_| AccessError::WriterStopped)?;
        applied.await.map_err(|_| AccessError::NotRead)
    }

    /// The snapshot, after reading whatever `missing` says it lacks.
    async fn knowing(&self, missing: impl Fn(&Snapshot) -> Vec<Change>) -> Result<Arc<Snapshot>, AccessError> {
        let snapshot = self.snapshot();
        let changes = missing(&snapshot);
        if changes.is_empty() {
            return Ok(snapshot);
        }
        // Never hold a snapshot across an await: the writer waits for every
        // holder of the old copy before it changes it.
        drop(snapshot);
        self.refresh(changes).await?;
        Ok(self.snapshot())
    }

    /// What the policy holds for `subject` in `tenant`: its role (`None`:
    /// not a member, a 404) and the tenant's policy.
    ///
    /// While the notification listener is connected and the engine loaded,
    /// this comes from the engine (reading only what it has not seen yet).
    /// Otherwise the engine may be behind, so the rows are read directly and
    /// the check names the role and plan themselves instead of the links.
    pub(crate) async fn tenant_subject(&self, subject: Subject, tenant: TenantId) -> Result<Asked, AccessError> {
        self.tenant_subject_on(&self.db, subject, tenant).await
    }

    /// [`Access::tenant_subject`], reading (when it must) on `db`: the
    /// request's own pool, so a listener outage under load does not queue
    /// every request on the engine's small one.
    pub(crate) async fn tenant_subject_on(
        &self,
        db: &Db,
        subject: Subject,
        tenant: TenantId,
    ) -> Result<Asked, AccessError> {
        if !AtomicBool::load(&self.trusted, Ordering::SeqCst) {
            let (role, policy) =
                db.platform(async |c| read_standing(c, &self.catalog, &*self.roles, subject, tenant).await).await?;
            let policy = policy.ok_or(AccessError::TenantNotFound)?;
            let ten = if policy.active { snapshot::plan_node(&policy.plan) } else { "none".to_owned() };
            let role_node = role.map(snapshot::role_node).unwrap_or_default();
            return Ok(Asked {
                sub: role_node.clone(),
                ten,
                role_node,
                role,
                policy: Some(policy),
                snapshot: self.snapshot(),
            });
        }
        let snapshot = self
            .knowing(|s| {
                let mut changes = Vec::new();
                if s.role(&subject).is_none() {
                    changes.push(match subject {
                        Subject::Member(t, u) => Change::Membership(t, u),
                        Subject::Key(_, k) => Change::ApiKey(k),
                        Subject::User(u) => Change::PlatformAdmin(u),
                    });
                }
                if s.tenant(tenant).is_none() {
                    changes.push(Change::Tenant(tenant));
                }
                changes
            })
            .await?;
        let role = snapshot.role(&subject).flatten();
        let policy = snapshot.tenant(tenant).cloned().ok_or(AccessError::TenantNotFound)?;
        Ok(Asked {
            sub: subject.to_string(),
            ten: snapshot::tenant_node(tenant),
            role_node: role.map(snapshot::role_node).unwrap_or_default(),
            role,
            policy: Some(policy),
            snapshot,
        })
    }

    /// What the policy holds for a caller whose credential itself gives it
    /// `role` in `tenant`, with no membership or key row behind it (a SCIM
    /// token acts as an admin of its tenant's directory): the tenant's
    /// policy, from the engine while it is current, read on `db` otherwise,
    /// and the role and plan nodes named directly for casbin.
    pub(crate) async fn tenant_role_on(&self, db: &Db, role: Role, tenant: TenantId) -> Result<Asked, AccessError> {
        let (policy, snapshot) = if AtomicBool::load(&self.trusted, Ordering::SeqCst) {
            let snapshot = self
                .knowing(|s| if s.tenant(tenant).is_none() { vec![Change::Tenant(tenant)] } else { vec![] })
                .await?;
            (snapshot.tenant(tenant).cloned(), snapshot)
        } else {
            let row = db
                .platform(async |c| Ok::<_, AccessError>(registry::plan_status(c, Some(tenant)).await?))
                .await?
                .into_iter()
                .next();
            let policy = match row.map(|row| tenant_policy(&self.catalog, row)) {
                Some(Fact::Tenant { policy, .. }) => policy,
                _ => None,
            };
            (policy, self.snapshot())
        };
        let policy = policy.ok_or(AccessError::TenantNotFound)?;
        let ten = if policy.active { snapshot::plan_node(&policy.plan) } else { "none".to_owned() };
        let role_node = snapshot::role_node(role);
        Ok(Asked { sub: role_node.clone(), ten, role_node, role: Some(role), policy: Some(policy), snapshot })
    }

    /// Whether `user` holds the platform admin grant (the operator
    /// console asks; routes ask through `PlatformAllowed`).
    pub async fn is_platform_admin(&self, user: UserId) -> Result<bool, AccessError> {
        Ok(self.platform_user(user).await?.0)
    }

    /// Whether `user` holds the platform admin grant (read directly while
    /// the engine may be behind, like [`Access::tenant_subject`]).
    pub(crate) async fn platform_user(&self, user: UserId) -> Result<(bool, Asked), AccessError> {
        let (admin, sub, snapshot) = if AtomicBool::load(&self.trusted, Ordering::SeqCst) {
            let snapshot = self
                .knowing(|s| if s.platform_admin(user).is_none() { vec![Change::PlatformAdmin(user)] } else { vec![] })
                .await?;
            (snapshot.platform_admin(user).unwrap_or(false), Subject::User(user).to_string(), snapshot)
        } else {
            let admin =
                self.db.platform(async |c| Ok::<_, AccessError>(crate::grants::is_admin(c, user).await?)).await?;
            let sub = if admin { snapshot::PLATFORM_ADMIN_ROLE.to_owned() } else { String::new() };
            (admin, sub, self.snapshot())
        };
        let role_node = if admin { snapshot::PLATFORM_ADMIN_ROLE.to_owned() } else { String::new() };
        Ok((admin, Asked { sub, ten: "platform".to_owned(), role_node, role: None, policy: None, snapshot }))
    }

    /// The one check, for a subject [`Access::tenant_subject`] or
    /// [`Access::platform_user`] found holding a role.
    ///
    /// casbin's answer depends on the subject only through its role, and on
    /// the tenant only through its plan while active (the links of the
    /// snapshot say no more than that; the check that reads the database
    /// asks casbin about the role and plan nodes themselves). The role
    /// templates, role inheritance and plan catalog are fixed for the life
    /// of the process. So an answer is remembered by role, plan and need,
    /// and every check after the first of its kind is a map lookup (casbin
    /// evaluating its matcher was a tenth of the read path's instructions,
    /// `docs/benchmarks.md`). The role and plan themselves are read afresh
    /// for every check, so a role or plan change counts at once.
    pub(crate) fn decide(&self, asked: &Asked, need: &Need) -> Result<Decision, AccessError> {
        // Features from Stripe's entitlements: casbin answers for the role,
        // the tenant's own list for the feature.
        if let (Some(feature), Some(features)) = (need.feature, asked.policy.as_ref().and_then(|p| p.features.as_ref()))
        {
            let role = self.decide(asked, &Need { feature: None, ..*need })?;
            return Ok(match role {
                Decision::Allowed { .. } if !features.iter().any(|f| f == feature) => {
                    Decision::PlanRequired { feature, plan: None }
                }
                other => other,
            });
        }
        let key = (asked.role_node.clone(), asked.plan_key(), *need);
        if let Some(decision) = self.decisions.read().get(&key) {
            return Ok(decision.clone());
        }
        let decision = self.enforce(asked, need)?;
        let mut decisions = self.decisions.write();
        if decisions.len() < MAX_DECISIONS {
            decisions.insert(key, decision.clone());
        }
        Ok(decision)
    }

    /// Asks casbin (see [`Access::decide`]).
    fn enforce(&self, asked: &Asked, need: &Need) -> Result<Decision, AccessError> {
        let feature = need.feature.map(feature_node);
        let allowed = asked.snapshot.enforce(&asked.sub, &asked.ten, need, feature.as_deref().unwrap_or("-"));
        if allowed.map_err(AccessError::Policy)? {
            let rule = self.rules.matching_template(&asked.role_node, need).map(|t| format!("p, {}", t.join(", ")));
            return Ok(Decision::Allowed { rule: rule.unwrap_or_default() });
        }
        // Denied: by the role, or only by the plan? The templates alone
        // answer the first (no second casbin check).
        match need.feature {
            Some(feature) if self.rules.matching_template(&asked.role_node, need).is_some() => {
                let plan = self
                    .catalog
                    .plans()
                    .iter()
                    .find(|p| asked.snapshot.plan_grants(&p.name, feature))
                    .map(|p| p.name.clone());
                Ok(Decision::PlanRequired { feature, plan })
            }
            _ => Ok(Decision::Forbidden),
        }
    }

    /// One check, as the gate makes it, for a subject already authenticated
    /// (benchmarks, tests and tools). A subject holding no role is
    /// `Forbidden`.
    pub async fn check(
        &self,
        subject: Subject,
        tenant: Option<TenantId>,
        need: &Need,
    ) -> Result<Decision, AccessError> {
        let (known, asked) = match (subject, tenant) {
            (Subject::User(user), None) => self.platform_user(user).await?,
            (subject, Some(tenant)) => {
                let asked = self.tenant_subject(subject, tenant).await?;
                (asked.role.is_some(), asked)
            }
            (_, None) => return Ok(Decision::Forbidden),
        };
        if !known {
            return Ok(Decision::Forbidden);
        }
        self.decide(&asked, need)
    }

    /// The listener handlers that keep the engine current, by channel.
    pub fn listen_handlers(self: &Arc<Self>) -> Vec<(&'static str, Handler)> {
        // Every handler hears (dis)connects; the first one acts on them.
        let on = |parse: fn(&str) -> Option<Change>, connection: bool| -> Handler {
            let (writer, trusted, epoch) = (self.writer.clone(), Arc::clone(&self.trusted), Arc::clone(&self.epoch));
            Arc::new(move |event| {
                let msg = match event {
                    ListenEvent::Notified(payload) => match parse(payload) {
                        Some(change) => Msg::Refresh(vec![change], None),
                        None => Msg::Reload(None, None),
                    },
                    ListenEvent::Connected if connection => {
                        Msg::Reload(None, Some(AtomicU64::load(&epoch, Ordering::SeqCst)))
                    }
                    ListenEvent::Disconnected if connection => {
                        trusted.store(false, Ordering::SeqCst);
                        epoch.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    ListenEvent::Connected | ListenEvent::Disconnected => return,
                };
                let _ = writer.send(msg);
            })
        };
        vec![
            (
                MEMBERSHIPS_CHANNEL,
                on(
                    |p| {
                        let (t, u) = p.split_once(':')?;
                        Some(Change::Membership(TenantId(uuid(t)?), UserId(uuid(u)?)))
                    },
                    true,
                ),
            ),
            (API_KEYS_CHANNEL, on(|p| Some(Change::ApiKey(uuid(p)?)), false)),
            (TENANT_POLICY_CHANNEL, on(|p| Some(Change::Tenant(TenantId(uuid(p)?))), false)),
            (PLATFORM_ADMINS_CHANNEL, on(|p| Some(Change::PlatformAdmin(UserId(uuid(p)?))), false)),
        ]
    }

    /// Reads every link again and waits until both copies have them (the
    /// listener does this on every connect; tools and tests call it).
    pub async fn reload(&self) -> Result<(), AccessError> {
        let (done, loaded) = oneshot::channel();
        self.writer.send(Msg::Reload(Some(done), None)).map_err(|_| AccessError::WriterStopped)?;
        loaded.await.map_err(|_| AccessError::NotRead)
    }

    /// Whether checks are answered from the engine (loaded, listener
    /// connected) rather than read from the database.
    pub fn is_current(&self) -> bool {
        AtomicBool::load(&self.trusted, Ordering::SeqCst)
    }

    /// How many tenants and subjects the engine holds.
    pub fn counts(&self) -> (usize, usize) {
        self.snapshot().counts()
    }
}

/// The one task that changes snapshots.
struct Writer {
    db: Db,
    roles: Arc<dyn RoleSource>,
    rules: Arc<Rules>,
    catalog: Arc<Catalog>,
    current: Arc<RwLock<Arc<Snapshot>>>,
    spare: Arc<Snapshot>,
    rx: mpsc::UnboundedReceiver<Msg>,
    retry: mpsc::WeakUnboundedSender<Msg>,
    trusted: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        while let Some(first) = self.rx.recv().await {
            // Everything queued is handled as one batch.
            let mut reload = false;
            let mut connected_epoch = None;
            let mut changes = Vec::new();
            let mut waiters = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take().or_else(|| self.rx.try_recv().ok()) {
                match msg {
                    Msg::Reload(waiter, epoch) => {
                        reload = true;
                        waiters.extend(waiter);
                        connected_epoch = epoch.or(connected_epoch);
                    }
                    Msg::Refresh(c, waiter) => {
                        changes.extend(c);
                        waiters.extend(waiter);
                    }
                }
            }
            let result = if reload { self.reload().await } else { self.update(changes).await };
            match result {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    // Current only if the listener stayed connected since it asked.
                    if connected_epoch.is_some_and(|e| e == AtomicU64::load(&self.epoch, Ordering::SeqCst)) {
                        self.trusted.store(true, Ordering::SeqCst);
                    }
                    for waiter in waiters {
                        let _ = waiter.send(());
                    }
                }
                Err(err) => {
                    // Waiters are dropped (their requests answer 503); the
                    // policy may now be behind, so reload once we can.
                    tracing::warn!(error = format!("{err:#}"), "updating the access policy failed; reloading");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if let Some(tx) = self.retry.upgrade() {
                        let _ = tx.send(Msg::Reload(None, connected_epoch));
                    }
                }
            }
        }
    }

    /// Re-reads the changed rows and applies them to both copies.
    async fn update(&mut self, mut changes: Vec<Change>) -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        changes.retain(|c| seen.insert(*c));
        let catalog = Arc::clone(&self.catalog);
        let roles = Arc::clone(&self.roles);
        let facts = self.db.platform(async |c| read_changes(c, &catalog, &*roles, &changes).await).await?;
        exclusive(&mut self.spare).await?.apply(&facts);
        self.swap();
        exclusive(&mut self.spare).await?.apply(&facts);
        Ok(())
    }

    /// Reads every link and rebuilds both copies, off the async threads.
    async fn reload(&mut self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let catalog = Arc::clone(&self.catalog);
        let roles = Arc::clone(&self.roles);
        let facts = Arc::new(self.db.platform(async |c| read_all(c, &catalog, &*roles).await).await?);
        let (rules, catalog) = (Arc::clone(&self.rules), Arc::clone(&self.catalog));
        let build = |facts: Arc<Vec<Fact>>| {
            let (rules, catalog) = (Arc::clone(&rules), Arc::clone(&catalog));
            tokio::task::spawn_blocking(move || {
                tokio::runtime::Handle::current().block_on(Snapshot::build(&rules, &catalog, &facts))
            })
        };
        let fresh = build(Arc::clone(&facts)).await??;
        self.spare = Arc::new(fresh);
        self.swap();
        // Drop the old copy before building its replacement.
        exclusive(&mut self.spare).await?;
        self.spare = Arc::new(build(Arc::clone(&facts)).await??);
        let (tenants, subjects) = self.current.read().unwrap_or_else(|p| p.into_inner()).counts();
        tracing::info!(tenants, subjects, elapsed_ms = started.elapsed().as_millis() as u64, "access policy loaded");
        Ok(())
    }

    fn swap(&mut self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *current, &mut self.spare);
    }
}

/// The spare copy, once no check holds it any more (checks hold a snapshot
/// for microseconds and never across an await).
async fn exclusive(spare: &mut Arc<Snapshot>) -> anyhow::Result<&mut Snapshot> {
    while Arc::get_mut(spare).is_none() {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Arc::get_mut(spare).ok_or_else(|| anyhow::anyhow!("the spare policy copy is still shared"))
}

fn tenant_policy(catalog: &Catalog, row: PlanStatus) -> Fact {
    let plan = catalog.effective(&row.plan);
    if plan.name != row.plan {
        tracing::warn!(tenant.id = %row.id, plan = row.plan, "tenant is on a plan the catalog does not list; treated as free");
    }
    Fact::Tenant {
        tenant: TenantId(row.id),
        // A tenant being deleted is no longer served: no policy at all.
        policy: (row.status != "deleting").then(|| TenantPolicy {
            plan: plan.name.clone(),
            active: row.status == "active",
            restricted: row.restricted_at.is_some(),
            features: row.features,
        }),
    }
}

/// Every link, read in one repeatable-read transaction so they agree:
/// tenants from the registry, roles from `roles` (identity), platform
/// admins from [`grants`].
async fn read_all(conn: &mut PgConn, catalog: &Catalog, roles: &dyn RoleSource) -> anyhow::Result<Vec<Fact>> {
    plinth_tenants::db::batch(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    let mut facts = Vec::new();
    let tenants = registry::plan_status(conn, None).await?;
    facts.extend(tenants.into_iter().map(|row| tenant_policy(catalog, row)));
    let all = roles.all(conn).await?;
    for (tenant, user, role) in all.members {
        facts.push(Fact::Member { tenant, user, role: Some(role) });
    }
    for (key, tenant, role) in all.keys {
        facts.push(Fact::Key { key, grant: Some((tenant, role)) });
    }
    let admins = grants::all(conn).await?;
    facts.extend(admins.into_iter().map(|user| Fact::PlatformAdmin { user, granted: true }));
    Ok(facts)
}

/// A subject's role and its tenant's policy, read directly.
async fn read_standing(
    conn: &mut PgConn,
    catalog: &Catalog,
    roles: &dyn RoleSource,
    subject: Subject,
    tenant: TenantId,
) -> Result<(Option<Role>, Option<TenantPolicy>), AccessError> {
    let role = match subject {
        Subject::Member(_, user) => roles.member(conn, tenant, user).await?,
        Subject::Key(_, key) => match roles.key(conn, key).await? {
            Some((of, role)) if of == tenant => Some(role),
            _ => None,
        },
        Subject::User(_) => return Ok((None, None)),
    };
    let Some(row) = registry::plan_status(conn, Some(tenant)).await?.into_iter().next() else {
        return Ok((None, None));
    };
    let Fact::Tenant { policy, .. } = tenant_policy(catalog, row) else { return Ok((role, None)) };
    Ok((role, policy))
}

/// The current rows behind each change; a missing row is a fact too.
async fn read_changes(
    conn: &mut PgConn,
    catalog: &Catalog,
    roles: &dyn RoleSource,
    changes: &[Change],
) -> anyhow::Result<Vec<Fact>> {
    let mut facts = Vec::with_capacity(changes.len());
    for change in changes {
        match *change {
            Change::Membership(tenant, user) => {
                let role = roles.member(conn, tenant, user).await?;
                facts.push(Fact::Member { tenant, user, role });
            }
            Change::ApiKey(key) => {
                let grant = roles.key(conn, key).await?;
                facts.push(Fact::Key { key, grant });
            }
            Change::Tenant(tenant) => match registry::plan_status(conn, Some(tenant)).await?.into_iter().next() {
                Some(row) => facts.push(tenant_policy(catalog, row)),
                None => facts.push(Fact::Tenant { tenant, policy: None }),
            },
            Change::PlatformAdmin(user) => {
                facts.push(Fact::PlatformAdmin { user, granted: grants::is_admin(conn, user).await? });
            }
        }
    }
    Ok(facts)
}
