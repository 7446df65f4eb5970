//! One immutable-while-read copy of the policy: a casbin enforcer holding
//! every link, and the maps that say which subjects and tenants it knows.
//!
//! A snapshot is changed only by the policy writer, and only while no check
//! can see it (see `super::Access`): `apply` is given the same facts, in the
//! same order, for both copies, so they stay identical.

use std::collections::{HashMap, HashSet};

use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, NullAdapter};

use super::catalog::Catalog;
use super::{Need, Subject};
use crate::auth::Role;
use crate::ids::{TenantId, UserId};

/// The static part of the policy: the model and the role templates.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub model: String,
    /// `p` lines: role, resource, action.
    pub templates: Vec<[String; 3]>,
    /// `g` lines between roles: role, included role.
    pub role_links: Vec<[String; 2]>,
}

impl Rules {
    /// Parses the policy file: `p, role, resource, action` and
    /// `g, role, role` lines; `#` starts a comment.
    pub fn parse(model: &str, policy: &str) -> anyhow::Result<Self> {
        let mut templates = Vec::new();
        let mut role_links = Vec::new();
        for (n, line) in policy.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<String> = line.split(',').map(|f| f.trim().to_owned()).collect();
            match fields.as_slice() {
                [kind, role, obj, act] if kind == "p" => templates.push([role.clone(), obj.clone(), act.clone()]),
                [kind, role, included] if kind == "g" => role_links.push([role.clone(), included.clone()]),
                _ => anyhow::bail!("policy line {}: expected `p, role, resource, action` or `g, role, role`", n + 1),
            }
        }
        Ok(Self { model: model.to_owned(), templates, role_links })
    }
}

/// What the policy says about a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    /// The plan it is treated as (see [`Catalog::effective`]).
    pub plan: String,
    /// Active tenants have their plan's features; others have none.
    pub active: bool,
}

/// A fact read from PostgreSQL, to be made true in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fact {
    Member { tenant: TenantId, user: UserId, role: Option<Role> },
    Key { key: uuid::Uuid, grant: Option<(TenantId, Role)> },
    Tenant { tenant: TenantId, policy: Option<TenantPolicy> },
    PlatformAdmin { user: UserId, granted: bool },
}

/// Negative answers kept at most; past it the set starts over.
const MAX_ABSENT: usize = 100_000;

pub(crate) struct Snapshot {
    enforcer: Enforcer,
    /// Member and API key subjects, with their role.
    roles: HashMap<Subject, Role>,
    /// API key id → its tenant, to find a key's subject from its id.
    keys: HashMap<uuid::Uuid, TenantId>,
    platform_admins: HashSet<UserId>,
    tenants: HashMap<TenantId, TenantPolicy>,
    /// Subjects read from PostgreSQL and found to hold nothing.
    absent: HashSet<Subject>,
}

pub(crate) fn role_node(role: Role) -> String {
    format!("role:{}", role.as_str())
}

pub(crate) const PLATFORM_ADMIN_ROLE: &str = "role:platform_admin";

fn plan_node(plan: &str) -> String {
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
        enforcer.add_policies(rules.templates.iter().map(|t| t.to_vec()).collect()).await?;
        enforcer.add_named_grouping_policies("g", rules.role_links.iter().map(|l| l.to_vec()).collect()).await?;
        let mut plan_links = Vec::new();
        for plan in catalog.plans() {
            if let Some(included) = &plan.includes {
                plan_links.push(vec![plan_node(&plan.name), plan_node(included)]);
            }
            for feature in &plan.own_features {
                plan_links.push(vec![plan_node(&plan.name), super::feature_node(feature)]);
            }
        }
        if !plan_links.is_empty() {
            enforcer.add_named_grouping_policies("g2", plan_links).await?;
        }
        let mut snapshot = Self {
            enforcer,
            roles: HashMap::new(),
            keys: HashMap::new(),
            platform_admins: HashSet::new(),
            tenants: HashMap::new(),
            absent: HashSet::new(),
        };
        snapshot.load(facts).await?;
        Ok(snapshot)
    }

    /// Bulk-loads facts into a fresh snapshot (one call per link kind).
    async fn load(&mut self, facts: &[Fact]) -> casbin::Result<()> {
        let mut g = Vec::new();
        let mut g2 = Vec::new();
        for fact in facts {
            match fact {
                Fact::Member { tenant, user, role: Some(role) } => {
                    let subject = Subject::Member(*tenant, *user);
                    g.push(vec![subject.to_string(), role_node(*role)]);
                    self.roles.insert(subject, *role);
                }
                Fact::Key { key, grant: Some((tenant, role)) } => {
                    let subject = Subject::Key(*tenant, *key);
                    g.push(vec![subject.to_string(), role_node(*role)]);
                    self.roles.insert(subject, *role);
                    self.keys.insert(*key, *tenant);
                }
                Fact::Tenant { tenant, policy: Some(policy) } => {
                    if policy.active {
                        g2.push(vec![tenant_node(*tenant), plan_node(&policy.plan)]);
                    }
                    self.tenants.insert(*tenant, policy.clone());
                }
                Fact::PlatformAdmin { user, granted: true } => {
                    g.push(vec![Subject::User(*user).to_string(), PLATFORM_ADMIN_ROLE.to_owned()]);
                    self.platform_admins.insert(*user);
                }
                _ => {}
            }
        }
        if !g.is_empty() {
            self.enforcer.add_named_grouping_policies("g", g).await?;
        }
        if !g2.is_empty() {
            self.enforcer.add_named_grouping_policies("g2", g2).await?;
        }
        Ok(())
    }

    /// Makes each fact true, one link at a time.
    pub async fn apply(&mut self, facts: &[Fact]) -> casbin::Result<()> {
        for fact in facts {
            match fact {
                Fact::Member { tenant, user, role } => self.set_role(Subject::Member(*tenant, *user), *role).await?,
                Fact::Key { key, grant } => {
                    if let Some(old_tenant) = self.keys.remove(key) {
                        self.set_role(Subject::Key(old_tenant, *key), None).await?;
                    }
                    if let Some((tenant, role)) = grant {
                        self.keys.insert(*key, *tenant);
                        self.set_role(Subject::Key(*tenant, *key), Some(*role)).await?;
                    }
                }
                Fact::Tenant { tenant, policy } => {
                    let old = self.tenants.get(tenant).filter(|p| p.active).map(|p| plan_node(&p.plan));
                    let new = policy.as_ref().filter(|p| p.active).map(|p| plan_node(&p.plan));
                    if old != new {
                        if let Some(old) = old {
                            self.enforcer.remove_named_grouping_policy("g2", vec![tenant_node(*tenant), old]).await?;
                        }
                        if let Some(new) = new {
                            self.enforcer.add_named_grouping_policy("g2", vec![tenant_node(*tenant), new]).await?;
                        }
                    }
                    match policy {
                        Some(policy) => self.tenants.insert(*tenant, policy.clone()),
                        None => self.tenants.remove(tenant),
                    };
                }
                Fact::PlatformAdmin { user, granted } => {
                    let link = vec![Subject::User(*user).to_string(), PLATFORM_ADMIN_ROLE.to_owned()];
                    let had = self.platform_admins.contains(user);
                    if *granted && !had {
                        self.enforcer.add_named_grouping_policy("g", link).await?;
                        self.platform_admins.insert(*user);
                    } else if !*granted && had {
                        self.enforcer.remove_named_grouping_policy("g", link).await?;
                        self.platform_admins.remove(user);
                    }
                    self.note_absent(Subject::User(*user), !*granted);
                }
            }
        }
        Ok(())
    }

    async fn set_role(&mut self, subject: Subject, role: Option<Role>) -> casbin::Result<()> {
        let old = self.roles.get(&subject).copied();
        if old != role {
            let name = subject.to_string();
            if let Some(old) = old {
                self.enforcer.remove_named_grouping_policy("g", vec![name.clone(), role_node(old)]).await?;
                self.roles.remove(&subject);
            }
            if let Some(role) = role {
                self.enforcer.add_named_grouping_policy("g", vec![name, role_node(role)]).await?;
                self.roles.insert(subject, role);
            }
        }
        self.note_absent(subject, role.is_none());
        Ok(())
    }

    fn note_absent(&mut self, subject: Subject, absent: bool) {
        if absent {
            if self.absent.len() >= MAX_ABSENT {
                self.absent.clear();
            }
            self.absent.insert(subject);
        } else {
            self.absent.remove(&subject);
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

    /// The casbin check. `subject` must be known to the snapshot (an unknown
    /// name makes casbin's role graph search every node).
    pub fn enforce(&self, subject: &str, tenant: &str, need: &Need, feature: &str) -> casbin::Result<bool> {
        self.enforcer.enforce((subject, tenant, need.resource, need.action.as_str(), feature))
    }

    /// The first template that allows the request, for the record (casbin
    /// stops at the first one that matches, in file order).
    pub fn matching_template(&self, rules: &Rules, subject: &str, need: &Need) -> Option<usize> {
        let roles = self.enforcer.get_role_manager();
        let roles = roles.read();
        rules.templates.iter().position(|[role, obj, act]| {
            act == need.action.as_str() && (obj == "*" || obj == need.resource) && roles.has_link(subject, role, None)
        })
    }

    /// Whether `plan` (a catalog plan) grants `feature`, by the same graph.
    pub fn plan_grants(&self, plan: &str, feature: &str) -> bool {
        self.enforcer.get_role_manager().read().has_link(&plan_node(plan), &super::feature_node(feature), None)
    }
}
