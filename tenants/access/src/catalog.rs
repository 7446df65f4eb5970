//! The plan catalog (`config/plans.toml`): plans, cheapest first, the
//! features each grants and the limits each sets.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// The catalog Plinth ships with.
pub const DEFAULT: &str = include_str!("../../../config/plans.toml");

/// The plan every tenant starts on and falls back to.
pub const FREE: &str = "free";

/// A countable resource a plan may limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quota {
    /// Projects in the tenant's schema.
    Projects,
    /// Members plus pending invitations (seats).
    Members,
    /// API keys that are not revoked.
    ApiKeys,
}

impl Quota {
    pub const ALL: [Quota; 3] = [Quota::Projects, Quota::Members, Quota::ApiKeys];

    /// Whether what it counts lives in the tenant's schema (projects),
    /// rather than in the platform tables (members, API keys): the two may
    /// be on different servers (`plinth_tenants::shards`).
    pub fn in_tenant_schema(self) -> bool {
        matches!(self, Self::Projects)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Projects => "projects",
            Self::Members => "members",
            Self::ApiKeys => "api_keys",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    plan: Vec<PlanEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanEntry {
    name: String,
    #[serde(default)]
    includes: Option<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    limits: BTreeMap<Quota, u32>,
    #[serde(default)]
    stripe_price: Option<String>,
    #[serde(default)]
    per_seat: bool,
    #[serde(default)]
    trial_days: Option<u32>,
    #[serde(default)]
    meters: BTreeMap<String, Meter>,
}

/// A usage a plan meters and bills through a Stripe Meter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// The Stripe Meter's `event_name`.
    pub event_name: String,
    /// Usage beyond it is billed (Stripe's price does the arithmetic);
    /// shown beside the use.
    #[serde(default)]
    pub soft_limit: Option<u32>,
    /// Usage stops at it: 402 `quota_exceeded` for the rest of the month.
    #[serde(default)]
    pub hard_limit: Option<u32>,
}

/// The usages Plinth can meter: tasks created.
pub const METERS: [&str; 1] = ["tasks"];

/// One plan, with everything it includes resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    /// The cheaper plan it includes, if any.
    pub includes: Option<String>,
    /// Features granted by this plan itself (not those it includes).
    pub own_features: Vec<String>,
    /// Every feature granted, included plans' too, sorted.
    pub features: Vec<String>,
    /// `None` is unlimited.
    pub limits: BTreeMap<Quota, u32>,
    /// The Stripe price a subscription to this plan is for.
    pub stripe_price: Option<String>,
    /// Priced per seat: the subscription's quantity follows the tenant's
    /// members.
    pub per_seat: bool,
    /// How long a trial of the plan lasts (none: the plan has no trial).
    pub trial_days: Option<u32>,
    /// The usages it meters, by name (not inherited).
    pub meters: BTreeMap<String, Meter>,
}

impl Plan {
    pub fn limit(&self, quota: Quota) -> Option<u32> {
        self.limits.get(&quota).copied()
    }
}

/// All plans, cheapest first.
#[derive(Debug, Clone)]
pub struct Catalog {
    plans: Vec<Plan>,
    index: HashMap<String, usize>,
}

impl Catalog {
    /// Parses and checks a catalog: unique names made of `a-z0-9_`, `free`
    /// present, `includes` naming an earlier (cheaper) plan, features named
    /// like plans.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: File = toml::from_str(text).map_err(|e| anyhow::anyhow!("the plan catalog does not parse: {e}"))?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let mut plans: Vec<Plan> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for entry in file.plan {
            anyhow::ensure!(valid(&entry.name), "plan name {:?} must be 1-64 of a-z, 0-9 and _", entry.name);
            anyhow::ensure!(!index.contains_key(&entry.name), "plan {:?} is listed twice", entry.name);
            for feature in &entry.features {
                anyhow::ensure!(
                    valid(feature),
                    "feature name {feature:?} (plan {}) must be 1-64 of a-z, 0-9 and _",
                    entry.name
                );
            }
            let mut features = entry.features.clone();
            if let Some(included) = &entry.includes {
                let Some(&i) = index.get(included) else {
                    anyhow::bail!("plan {:?} includes {included:?}, which is not listed before it", entry.name);
                };
                features.extend(plans[i].features.iter().cloned());
            }
            features.sort();
            features.dedup();
            for (name, meter) in &entry.meters {
                anyhow::ensure!(
                    METERS.contains(&name.as_str()),
                    "plan {:?} meters {name:?}; the usages Plinth meters are {}",
                    entry.name,
                    METERS.join(", ")
                );
                anyhow::ensure!(
                    !meter.event_name.is_empty(),
                    "plan {:?}: meter {name:?} needs an event_name",
                    entry.name
                );
            }
            if let Some(days) = entry.trial_days {
                // Stripe's own bounds for `trial_period_days`.
                anyhow::ensure!(
                    (1..=730).contains(&days),
                    "plan {:?}: trial_days must be 1 to 730 (Stripe's bounds)",
                    entry.name
                );
            }
            index.insert(entry.name.clone(), plans.len());
            plans.push(Plan {
                name: entry.name,
                includes: entry.includes,
                own_features: entry.features,
                features,
                limits: entry.limits,
                stripe_price: entry.stripe_price,
                per_seat: entry.per_seat,
                trial_days: entry.trial_days,
                meters: entry.meters,
            });
        }
        anyhow::ensure!(index.contains_key(FREE), "the plan catalog must have a plan named \"free\"");
        Ok(Self { plans, index })
    }

    /// The catalog Plinth ships with.
    pub fn default_catalog() -> anyhow::Result<Self> {
        Self::parse(DEFAULT)
    }

    /// Reads the catalog at `path`, or the default one.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        match path {
            None => Self::default_catalog(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the plan catalog {}: {e}", path.display()))?;
                Self::parse(&text).map_err(|e| e.context(format!("in {}", path.display())))
            }
        }
    }

    /// Sets the Stripe price of `plan` (`PLINTH_STRIPE_PRICE_<PLAN>`).
    pub fn set_price(&mut self, plan: &str, price: &str) -> anyhow::Result<()> {
        let i = *self.index.get(plan).ok_or_else(|| anyhow::anyhow!("no plan {plan:?} in the catalog"))?;
        self.plans[i].stripe_price = Some(price.to_owned());
        Ok(())
    }

    /// The plan a Stripe price is for; `None` for a price Plinth does not know.
    pub fn plan_for_price(&self, price: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.stripe_price.as_deref() == Some(price))
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub fn get(&self, name: &str) -> Option<&Plan> {
        self.index.get(name).map(|&i| &self.plans[i])
    }

    /// The plan a tenant on `name` is treated as: that plan, or free when the
    /// catalog does not know it.
    pub fn effective(&self, name: &str) -> &Plan {
        self.get(name).or_else(|| self.get(FREE)).unwrap_or(&self.plans[0])
    }

    /// The cheapest plan granting `feature`, if any does.
    pub fn cheapest_with(&self, feature: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.features.iter().any(|f| f == feature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_catalog_is_the_documented_one() {
        let c = Catalog::default_catalog().unwrap();
        let names: Vec<_> = c.plans().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["free", "pro", "enterprise"]);
        assert_eq!(c.get("free").unwrap().limit(Quota::Projects), Some(3));
        assert_eq!(c.get("free").unwrap().limit(Quota::Members), Some(3));
        assert_eq!(c.get("pro").unwrap().limit(Quota::Projects), None);
        assert_eq!(c.get("pro").unwrap().limit(Quota::Members), Some(25));
        assert_eq!(c.get("pro").unwrap().features, ["api_keys", "audit_log"]);
        assert_eq!(
            c.get("enterprise").unwrap().features,
            ["api_keys", "audit_log", "custom_domains", "data_export", "sso"]
        );
        assert!(c.get("enterprise").unwrap().limits.is_empty());
        assert_eq!(c.cheapest_with("audit_log").unwrap().name, "pro");
        assert_eq!(c.cheapest_with("data_export").unwrap().name, "enterprise");
        assert_eq!(c.cheapest_with("sso").unwrap().name, "enterprise");
        assert_eq!(c.effective("gold").name, "free");
        let priced: Vec<_> = c.plans().iter().map(|p| (p.name.as_str(), p.per_seat, p.trial_days)).collect();
        assert_eq!(priced, [("free", false, None), ("pro", true, Some(14)), ("enterprise", true, None)]);
    }

    #[test]
    fn bad_catalogs_are_refused_with_a_reason() {
        for (text, reason) in [
            ("[[plan]]\nname = \"pro\"", "must have a plan named \"free\""),
            ("[[plan]]\nname = \"free\"\n[[plan]]\nname = \"free\"", "listed twice"),
            ("[[plan]]\nname = \"pro\"\nincludes = \"free\"\n[[plan]]\nname = \"free\"", "not listed before it"),
            ("[[plan]]\nname = \"Free\"", "must be 1-64"),
            ("[[plan]]\nname = \"free\"\nlimits = { seats = 3 }", "unknown variant"),
            ("[[plan]]\nname = \"free\"\nprice = 3", "unknown field"),
            ("[[plan]]\nname = \"free\"\ntrial_days = 0", "trial_days must be 1 to 730"),
            (
                "[[plan]]\nname = \"free\"\nmeters = { calls = { event_name = \"c\" } }",
                "the usages Plinth meters are tasks",
            ),
        ] {
            let err = format!("{:#}", Catalog::parse(text).unwrap_err());
            assert!(err.contains(reason), "{err}");
        }
    }
}
