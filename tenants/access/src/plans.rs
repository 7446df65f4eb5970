//! Changing a tenant's plan: the registry row, the audit entry, and (through
//! the trigger on `tenants`) every instance's policy.

use plinth_http::{ApiError, FieldError};
use plinth_tenants::db::PgConn;
use plinth_tenants::ids::TenantId;

use crate::catalog::Catalog;

/// Why a plan could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("unknown plan {plan:?}; the catalog has {}", known.join(", "))]
    UnknownPlan { plan: String, known: Vec<String> },
    #[error("changing the plan in the database")]
    Db(#[from] diesel::result::Error),
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::UnknownPlan { known, .. } => ApiError::invalid_fields(vec![FieldError::new(
                "plan",
                "invalid",
                format!("must be one of {}", known.join(", ")),
            )]),
            PlanError::Db(e) => e.into(),
        }
    }
}

/// Moves a tenant to `plan` (a plan of `catalog`, from `source`) and, if it
/// changed, records `plan.changed` in the tenant's audit log with `from`,
/// `to` and `details`. The trigger on `tenants` tells every instance's
/// policy. Returns the tenant and whether the plan changed; `None` if there
/// is no such tenant (or it is being deleted).
pub async fn change_plan(
    conn: &mut PgConn,
    catalog: &Catalog,
    id: TenantId,
    plan: &str,
    source: plinth_tenants::registry::PlanSource,
    actor: plinth_tenants::audit::Actor,
    details: serde_json::Value,
) -> Result<Option<(plinth_tenants::registry::Tenant, bool)>, PlanError> {
    if catalog.get(plan).is_none() {
        let known = catalog.plans().iter().map(|p| p.name.clone()).collect();
        return Err(PlanError::UnknownPlan { plan: plan.to_owned(), known });
    }
    let Some((tenant, before)) = plinth_tenants::registry::set_plan(conn, id, plan, source).await? else {
        return Ok(None);
    };
    let changed = before != plan;
    if changed {
        let mut all = serde_json::json!({ "from": before, "to": plan });
        if let (Some(all), serde_json::Value::Object(more)) = (all.as_object_mut(), details) {
            all.extend(more);
        }
        let entry = plinth_tenants::audit::Entry {
            actor,
            action: "plan.changed",
            target_type: Some("tenant"),
            target_id: Some(tenant.id.to_string()),
            ip: None,
            request_id: None,
            details: all,
        };
        plinth_tenants::audit::record_as_system(conn, tenant.scope(), entry).await?;
    }
    Ok(Some((tenant, changed)))
}
