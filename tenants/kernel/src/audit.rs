//! The audit log: an append-only table in each tenant's schema.
//!
//! [`record`] writes through the [`TenantRows`] handle of the tenant whose
//! log it is, inside the transaction of the action it records, so an action
//! and its audit entry commit or roll back together. Flows that are not one
//! tenant's request (the CLI, Stripe, platform admins, a login) use
//! [`record_as_system`], which names the schema.

use diesel::sql_types::{Jsonb, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::{TenantConn, TenantRows};
use crate::ids::SchemaName;

/// Who did it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    User(uuid::Uuid),
    ApiKey(uuid::Uuid),
    /// An operator through the CLI, or Plinth itself.
    System,
}

impl Actor {
    fn parts(self) -> (&'static str, Option<uuid::Uuid>) {
        match self {
            Self::User(id) => ("user", Some(id)),
            Self::ApiKey(id) => ("api_key", Some(id)),
            Self::System => ("system", None),
        }
    }
}

/// One entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: Actor,
    /// `member.role_changed`, `api_key.created`, `auth.login`, ...
    pub action: &'static str,
    pub target_type: Option<&'static str>,
    pub target_id: Option<String>,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
}

impl Entry {
    /// An entry for `action` by `actor`, with no target, address or request
    /// yet (a tenant request's entries come from
    /// `TenantContext::audit_entry`).
    pub fn new(actor: Actor, action: &'static str) -> Self {
        Self {
            actor,
            action,
            target_type: None,
            target_id: None,
            ip: None,
            request_id: None,
            details: serde_json::json!({}),
        }
    }

    /// The request it happened in: Plinth's own id, and the client's id (if
    /// it sent one) in the details, never in its place.
    pub fn request(mut self, id: &str, client_id: Option<&str>) -> Self {
        self.request_id = Some(id.to_owned());
        if let Some(client) = client_id {
            self = self.details(serde_json::json!({ "client_request_id": client }));
        }
        self
    }

    pub fn target(mut self, kind: &'static str, id: impl ToString) -> Self {
        self.target_type = Some(kind);
        self.target_id = Some(id.to_string());
        self
    }

    /// Adds `details` (an object) to the entry's details.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        match (&mut self.details, details) {
            (serde_json::Value::Object(mine), serde_json::Value::Object(more)) => mine.extend(more),
            (mine, more) => *mine = more,
        }
        self
    }
}

/// Appends `entry` to the audit log of the tenant `rows` is bound to, in
/// the transaction of the change it records. Request paths write the log
/// this way only.
pub async fn record(rows: &mut TenantRows<'_>, entry: Entry) -> diesel::QueryResult<()> {
    let schema = rows.schema().clone();
    insert(rows.conn(), &schema, entry).await
}

/// Appends `entry` to the audit log of the tenant whose schema is `schema`,
/// for flows that are not one tenant's request: the CLI, Stripe's events,
/// platform admins, and a login (recorded in every tenant of the user).
pub async fn record_as_system(conn: &AsyncPgConnection, schema: &SchemaName, entry: Entry) -> diesel::QueryResult<()> {
    insert(conn, schema, entry).await
}

/// Raw SQL: the table is named with its schema, which diesel's `table!`
/// cannot take at run time.
async fn insert(conn: &AsyncPgConnection, schema: &SchemaName, entry: Entry) -> diesel::QueryResult<()> {
    let (actor_type, actor_id) = entry.actor.parts();
    let sql = format!(
        "INSERT INTO {}.audit_log (id, actor_type, actor_id, action, target_type, target_id, ip, request_id, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        schema.quoted()
    );
    let mut conn = conn;
    diesel::sql_query(sql)
        .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
        .bind::<Text, _>(actor_type)
        .bind::<Nullable<SqlUuid>, _>(actor_id)
        .bind::<Text, _>(entry.action)
        .bind::<Nullable<Text>, _>(entry.target_type)
        .bind::<Nullable<Text>, _>(entry.target_id)
        .bind::<Nullable<Text>, _>(entry.ip)
        .bind::<Nullable<Text>, _>(entry.request_id)
        .bind::<Jsonb, _>(&entry.details)
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// The audit log of the tenant a [`TenantConn`] is scoped to (unqualified:
/// found through its `search_path`).
mod log {
    diesel::table! {
        audit_log (id) {
            id -> Uuid,
            at -> Timestamptz,
            actor_type -> Text,
            actor_id -> Nullable<Uuid>,
            action -> Text,
            target_type -> Nullable<Text>,
            target_id -> Nullable<Text>,
            ip -> Nullable<Text>,
            request_id -> Nullable<Text>,
            details -> Jsonb,
        }
    }
}

use log::audit_log;

/// One stored entry, as the audit log route shows it.
#[derive(Debug, Clone, serde::Serialize, diesel::Queryable, diesel::Selectable, utoipa::ToSchema)]
#[diesel(table_name = audit_log)]
#[schema(as = AuditEntry)]
pub struct Stored {
    pub id: uuid::Uuid,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor_type: String,
    pub actor_id: Option<uuid::Uuid>,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
}

/// Which entries to read: older than `before` (a cursor), with `action`,
/// by `actor`, at most `limit`, newest first.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub before: Option<uuid::Uuid>,
    pub action: Option<String>,
    pub actor: Option<uuid::Uuid>,
    pub limit: i64,
}

/// Entries of the tenant `conn` is scoped to, newest first.
pub async fn read(conn: &mut TenantConn<'_>, filter: Filter) -> diesel::QueryResult<Vec<Stored>> {
    use diesel::{ExpressionMethods as _, QueryDsl as _, SelectableHelper as _};
    let mut query =
        audit_log::table.order(audit_log::id.desc()).limit(filter.limit).select(Stored::as_select()).into_boxed();
    if let Some(before) = filter.before {
        query = query.filter(audit_log::id.lt(before));
    }
    if let Some(action) = filter.action {
        query = query.filter(audit_log::action.eq(action));
    }
    if let Some(actor) = filter.actor {
        query = query.filter(audit_log::actor_id.eq(actor));
    }
    query.load(conn.pg()).await
}
