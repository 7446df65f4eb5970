//! The audit log: an append-only table in each tenant's schema.
//!
//! [`record`] writes with the caller's connection, inside the transaction of
//! the action it records (platform or tenant-scoped: the table is named with
//! its schema), so an action and its audit entry commit or roll back
//! together.

use diesel::sql_types::{Jsonb, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

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

/// Appends `entry` to the audit log of the tenant whose schema is `schema`.
pub async fn record(conn: &AsyncPgConnection, schema: &SchemaName, entry: Entry) -> diesel::QueryResult<()> {
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
