//! The operator log: what platform admins did, through the console or the
//! platform admin routes (`public.operator_log`, append-only). Each action
//! on a tenant is also in that tenant's own audit log; this is the
//! platform's side, which outlives a deleted tenant.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_tenants::{TenantId, UserId};

diesel::table! {
    public.operator_log (id) {
        id -> Uuid,
        at -> Timestamptz,
        operator_id -> Nullable<Uuid>,
        action -> Text,
        tenant_id -> Nullable<Uuid>,
        target -> Nullable<Text>,
        details -> Jsonb,
        ip -> Nullable<Text>,
        request_id -> Nullable<Text>,
    }
}

/// One operator action to record.
#[derive(Debug, Clone)]
pub struct Action {
    pub operator: UserId,
    /// `tenant.suspended`, `tenant.plan_changed`, `impersonation.started`, ...
    pub action: &'static str,
    pub tenant: Option<TenantId>,
    /// What else it was about (a user, an event, a job), as text.
    pub target: Option<String>,
    pub details: serde_json::Value,
    pub ip: Option<String>,
    pub request_id: Option<String>,
}

impl Action {
    pub fn new(operator: UserId, action: &'static str) -> Self {
        Self {
            operator,
            action,
            tenant: None,
            target: None,
            details: serde_json::json!({}),
            ip: None,
            request_id: None,
        }
    }

    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    pub fn target(mut self, target: impl ToString) -> Self {
        self.target = Some(target.to_string());
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// Appends `action`, in the caller's transaction.
pub async fn record(conn: &mut AsyncPgConnection, action: Action) -> QueryResult<()> {
    diesel::insert_into(operator_log::table)
        .values((
            operator_log::id.eq(uuid::Uuid::now_v7()),
            operator_log::operator_id.eq(action.operator.0),
            operator_log::action.eq(action.action),
            operator_log::tenant_id.eq(action.tenant.map(|t| t.0)),
            operator_log::target.eq(action.target),
            operator_log::details.eq(action.details),
            operator_log::ip.eq(action.ip),
            operator_log::request_id.eq(action.request_id),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// A recorded action, with its operator's address (identity's).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recorded {
    pub id: uuid::Uuid,
    pub at: DateTime<Utc>,
    pub operator_email: Option<String>,
    pub action: String,
    pub tenant_id: Option<uuid::Uuid>,
    pub target: Option<String>,
    pub details: serde_json::Value,
    pub ip: Option<String>,
}

/// The newest actions (of `tenant`, if given), older than `before`.
pub async fn recent(
    conn: &mut AsyncPgConnection,
    tenant: Option<TenantId>,
    before: Option<uuid::Uuid>,
    limit: i64,
) -> QueryResult<Vec<Recorded>> {
    type Row = (
        uuid::Uuid,
        DateTime<Utc>,
        Option<uuid::Uuid>,
        String,
        Option<uuid::Uuid>,
        Option<String>,
        serde_json::Value,
        Option<String>,
    );
    let mut query = operator_log::table
        .order(operator_log::id.desc())
        .limit(limit)
        .select((
            operator_log::id,
            operator_log::at,
            operator_log::operator_id,
            operator_log::action,
            operator_log::tenant_id,
            operator_log::target,
            operator_log::details,
            operator_log::ip,
        ))
        .into_boxed();
    if let Some(tenant) = tenant {
        query = query.filter(operator_log::tenant_id.eq(tenant.0));
    }
    if let Some(before) = before {
        query = query.filter(operator_log::id.lt(before));
    }
    let rows: Vec<Row> = query.load(conn).await?;
    let operators: Vec<uuid::Uuid> = rows.iter().filter_map(|r| r.2).collect();
    let emails = plinth_identity::users::emails(conn, &operators).await?;
    Ok(rows
        .into_iter()
        .map(|(id, at, operator, action, tenant_id, target, details, ip)| Recorded {
            id,
            at,
            operator_email: operator.and_then(|o| emails.get(&o).cloned()),
            action,
            tenant_id,
            target,
            details,
            ip,
        })
        .collect())
}
