//! One immutable-while-read copy of the policy: a casbin enforcer holding
//! every link, and the maps that say which subjects and tenants it knows.
//!
//! A snapshot is changed only by the policy writer, and only while no check
//! can see it (see `crate::Access`): `apply` is given the same facts, in the
//! same order, for both copies, so they stay identical.

use std::collections::{HashMap, HashSet};

use std::sync::Arc;

use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, NullAdapter, RoleManager};
use parking_lot::RwLock;

use crate::catalog::Catalog;
use crate::links::LinkGraph;
use crate::model::{Need, Subject, feature_node};
use crate::roles::Role;
use plinth_tenants::ids::{TenantId, UserId};

/// The static part of the policy: the model, the role templates, role
/// inheritance and resource groups.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub model: String,
    /// `p` lines: role, resource, action.
    pub templates: Vec<[String; 3]>,
    /// `g` lines between roles: role, included role.
    pub role_links: Vec<[String; 2]>,
    /// `g3` lines: resource, the group it belongs to.
    pub resource_groups: Vec<[String; 2]>,
}

impl Rules {
    /// Parses the policy file: `p, role, resource, action`, `g, role, role`
    /// and `g3, resource, group` lines; `#` starts a comment.
    pub fn parse(model: &str, policy: &str) -> anyhow::Result<Self> {
        let mut rules = Self {
            model: model.to_owned(),
            templates: Vec::new(),
            role_links: Vec::new(),
            resource_groups: Vec::new(),
        };
        for (n, line) in policy.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<String> = line.split(',').map(|f| f.trim().to_owned()).collect();
            match fields.as_slice() {
                [kind, role, obj, act] if kind == "p" => rules.templates.push([role.clone(), obj.clone(), act.clone()]),
                [kind, role, included] if kind == "g" => rules.role_links.push([role.clone(), included.clone()]),
                [kind, resource, group] if kind == "g3" => {
                    rules.resource_groups.push([resource.clone(), group.clone()])
                }
                _ => anyhow::bail!(
                    "policy line {}: expected `p, role, resource, action`, `g, role, role` or `g3, resource, group`",
                    n + 1
                ),
            }
        }
        Ok(rules)
    }

    /// The first template allowing `role` (a role node) `need`, in file
    /// order, as casbin stops at the first that matches. For the record.
    pub fn matching_template(&self, role: &str, need: &Need) -> Option<&[String; 3]> {
        let includes = |have: &str, want: &str| self.reaches(&self.role_links, have, want);
        let in_group = |group: &str| self.reaches(&self.resource_groups, need.resource, group);
        self.templates.iter().find(|[r, obj, act]| {
            act == need.action.as_str() && (obj == "*" || obj == need.resource || in_group(obj)) && includes(role, r)
        })
    }

    fn reaches(&self, links: &[[String; 2]], from: &str, to: &str) -> bool {
        let mut at = vec![from];
        for _ in 0..10 {
            if at.contains(&to) {
                return true;
            }
            at = links.iter().filter(|[a, _]| at.contains(&a.as_str())).map(|[_, b]| b.as_str()).collect();
        }
        false
    }
}

/// What the policy says about a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    /// The plan it is treated as (see [`Catalog::effective`]).
    pub plan: String,
    /// Active tenants have their plan's features; others have none.
    pub active: bool,
    /// Billing restricted it (a payment overdue past its grace): reads
    /// only, until it pays.
    pub restricted: bool,
    /// The features it has instead of its plan's: Stripe's entitlements,
    /// with `PLINTH_BILLING_FEATURES=stripe` (`None`: the plan's).
    pub features: Option<Vec<String>>,
}

/// A fact read from PostgreSQL, to be made true in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fact {
    Member { tenant: TenantId, user: UserId, role: Option<Role> },
    Key { key: uuid::Uuid, grant: Option<(TenantId, Role)> },
    Tenant { tenant: TenantId, policy: Option<TenantPolicy> },
    PlatformAdmin { user: UserId, granted: bool },
}

/// Negative answers kept at most; past it the oldest goes.
const MAX_ABSENT: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(100_000) {
    Some(n) => n,
    None => std::num::NonZeroUsize::MIN,
};

pub(crate) struct Snapshot {
    enforcer: Enforcer,
    /// The enforcer's role graph, changed here directly.
    links: Arc<RwLock<LinkGraph>>,
    /// Member and API key subjects, with their role.
    roles: HashMap<Subject, Role>,
    /// API key id → its tenant, to find a key's subject from its id.
    keys: HashMap<uuid::Uuid, TenantId>,
    platform_admins: HashSet<UserId>,
    tenants: HashMap<TenantId, TenantPolicy>,
    /// Subjects read from PostgreSQL and found to hold nothing.
    absent: lru::LruCache<Subject, ()>,
}

pub(crate) fn role_node(role: Role) -> String {
    format!("role:{}", role.as_str())
}

pub(crate) const PLATFORM_ADMIN_ROLE: &str = "role:platform_admin";

pub(crate) fn plan_node(plan: &str) -> String {
    format!("plan:{plan}")
}

pub(crate) fn tenant_node(tenant: TenantId) -> String {
    format!("tenant:{}", tenant.0)
}

impl Snapshot {
    /// A snapshot holding the role templates, role inheritance and the plan
    /// catalog, and the given facts.
    pub async fn build(rules: &Rules, catalog: &Catalog, facts: &[Fact]) -> casbin::Result<Self> {
        let model = DefaultModel::from_str(&rules.model).await?;
        let mut enforcer = Enforcer::new(model, NullAdapter).await?;
        let links = Arc::new(RwLock::new(LinkGraph::default()));
        let role_manager: Arc<RwLock<dyn RoleManager>> = links.clone();
        enforcer.set_role_manager(role_manager)?;
        enforcer.add_policies(rules.templates.iter().map(|t| t.to_vec()).collect()).await?;
        {
            let mut graph = links.write();
            for [from, to] in rules.role_links.iter().chain(&rules.resource_groups) {
                graph.link(from, to);
            }
            for plan in catalog.plans() {
                if let Some(included) = &plan.includes {
                    graph.link(&plan_node(&plan.name), &plan_node(included));
                }
                for feature in &plan.own_features {
                    graph.link(&plan_node(&plan.name), &feature_node(feature));
                }
            }
        }
        let mut snapshot = Self {
            enforcer,
            links,
            roles: HashMap::new(),
            keys: HashMap::new(),
            platform_admins: HashSet::new(),
            tenants: HashMap::new(),
            absent: lru::LruCache::new(MAX_ABSENT),
        };
        snapshot.apply(facts);
        Ok(snapshot)
    }

    /// Makes each fact true, one link at a time.
    pub fn apply(&mut self, facts: &[Fact]) {
        let links = Arc::clone(&self.links);
        let mut graph = links.write();
        for fact in facts {
            match fact {
                Fact::Member { tenant, user, role } => {
                    self.set_role(&mut graph, Subject::Member(*tenant, *user), *role)
                }
                Fact::Key { key, grant } => {
                    if let Some(old_tenant) = self.keys.remove(key) {
                        self.set_role(&mut graph, Subject::Key(old_tenant, *key), None);
                    }
                    if let Some((tenant, role)) = grant {
                        self.keys.insert(*key, *tenant);
                        self.set_role(&mut graph, Subject::Key(*tenant, *key), Some(*role));
                    }
                }
                Fact::Tenant { tenant, policy } => {
                    let old = self.tenants.get(tenant).filter(|p| p.active).map(|p| plan_node(&p.plan));
                    let new = policy.as_ref().filter(|p| p.active).map(|p| plan_node(&p.plan));
                    if old != new {
                        if let Some(old) = old {
                            graph.unlink(&tenant_node(*tenant), &old);
                        }
                        if let Some(new) = new {
                            graph.link(&tenant_node(*tenant), &new);
                        }
                    }
                    match policy {
                        Some(policy) => self.tenants.insert(*tenant, policy.clone()),
                        None => self.tenants.remove(tenant),
                    };
                }
                Fact::PlatformAdmin { user, granted } => {
                    let name = Subject::User(*user).to_string();
                    if *granted {
                        graph.link(&name, PLATFORM_ADMIN_ROLE);
                        self.platform_admins.insert(*user);
                    } else {
                        graph.unlink(&name, PLATFORM_ADMIN_ROLE);
                        self.platform_admins.remove(user);
                    }
                    self.note_absent(Subject::User(*user), !*granted);
                }
            }
        }
    }

    fn set_role(&mut self, graph: &mut LinkGraph, subject: Subject, role: Option<Role>) {
        let old = self.roles.get(&subject).copied();
        if old != role {
            let name = subject.to_string();
            if let Some(old) = old {
                graph.unlink(&name, &role_node(old));
                self.roles.remove(&subject);
            }
            if let Some(role) = role {
                graph.link(&name, &role_node(role));
                self.roles.insert(subject, role);
            }
        }
        self.note_absent(subject, role.is_none());
    }

    fn note_absent(&mut self, subject: Subject, absent: bool) {
        if absent {
            self.absent.put(subject, ());
        } else {
            self.absent.pop(&subject);
        }
    }

    /// What the snapshot knows about a subject: `Some(Some(role))` holds a
    /// role, `Some(None)` is known to hold nothing, `None` is not known yet.
    pub fn role(&self, subject: &Subject) -> Option<Option<Role>> {
        if let Some(role) = self.roles.get(subject) {
            return Some(Some(*role));
        }
        self.absent.contains(subject).then_some(None)
    }

    /// Whether a user is known to be (or known not to be) a platform admin.
    pub fn platform_admin(&self, user: UserId) -> Option<bool> {
        if self.platform_admins.contains(&user) {
            return Some(true);
        }
        self.absent.contains(&Subject::User(user)).then_some(false)
    }

    pub fn tenant(&self, tenant: TenantId) -> Option<&TenantPolicy> {
        self.tenants.get(&tenant)
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.tenants.len(), self.roles.len() + self.platform_admins.len())
    }

    /// The casbin check.
    pub fn enforce(&self, subject: &str, tenant: &str, need: &Need, feature: &str) -> casbin::Result<bool> {
        self.enforcer.enforce((subject, tenant, need.resource, need.action.as_str(), feature))
    }

    /// Whether `plan` (a catalog plan) grants `feature`, by the same graph.
    pub fn plan_grants(&self, plan: &str, feature: &str) -> bool {
        self.links.read().reaches(&plan_node(plan), &feature_node(feature))
    }
}
