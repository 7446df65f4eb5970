//! The audit log: an append-only table in each tenant's schema.
//!
//! [`record`] writes through the [`TenantRows`] handle of the tenant whose
//! log it is, inside the transaction of the action it records, so an action
//! and its audit entry commit or roll back together. Flows that are not one
//! tenant's request (the CLI, Stripe, platform admins, a login) use
//! [`record_as_system`], which names the tenant.
//!
//! A tenant whose schema is on another server than the platform tables
//! (`crate::shards`) cannot share a transaction with them: its entries go
//! to `public.audit_outbox` in the action's transaction instead, and
//! [`deliver`] moves them to its log, under the same id, so an entry
//! delivered twice is kept once.

use diesel::sql_types::{Jsonb, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::{Db, PgConn, TenantConn, TenantRows, TenantScope};
use crate::ids::{SchemaName, ShardName, TenantId};

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
    let scope = rows.scope();
    insert(rows.conn(), scope, entry).await
}

/// Appends `entry` to the audit log of `tenant` from a platform
/// transaction, for flows that are not one tenant's request: the CLI,
/// Stripe's events, platform admins, and a login (recorded in every tenant
/// of the user).
pub async fn record_as_system(
    conn: &AsyncPgConnection,
    tenant: TenantScope<'_>,
    entry: Entry,
) -> diesel::QueryResult<()> {
    insert(conn, tenant, entry).await
}

/// Raw SQL: the table is named with its schema, which diesel's `table!`
/// cannot take at run time. On the primary, straight into the tenant's log;
/// for a tenant on another shard, into the outbox.
async fn insert(conn: &AsyncPgConnection, tenant: TenantScope<'_>, entry: Entry) -> diesel::QueryResult<()> {
    let (actor_type, actor_id) = entry.actor.parts();
    let columns = "id, actor_type, actor_id, action, target_type, target_id, ip, request_id, details";
    let sql = if tenant.shard.is_primary() {
        format!(
            "INSERT INTO {}.audit_log ({columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            tenant.schema.quoted()
        )
    } else {
        format!(
            "INSERT INTO public.audit_outbox (tenant_id, {columns}) VALUES ($10, $1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )
    };
    let mut conn = conn;
    let query = diesel::sql_query(sql)
        .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
        .bind::<Text, _>(actor_type)
        .bind::<Nullable<SqlUuid>, _>(actor_id)
        .bind::<Text, _>(entry.action)
        .bind::<Nullable<Text>, _>(entry.target_type)
        .bind::<Nullable<Text>, _>(entry.target_id)
        .bind::<Nullable<Text>, _>(entry.ip)
        .bind::<Nullable<Text>, _>(entry.request_id)
        .bind::<Jsonb, _>(&entry.details);
    if tenant.shard.is_primary() {
        query.execute(&mut conn).await?;
    } else {
        query.bind::<SqlUuid, _>(tenant.id.0).execute(&mut conn).await?;
    }
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Waiting {
    #[diesel(sql_type = SqlUuid)]
    tenant_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    schema_name: String,
    #[diesel(sql_type = Text)]
    shard: String,
    #[diesel(sql_type = Jsonb)]
    entries: serde_json::Value,
    #[diesel(sql_type = diesel::sql_types::Array<SqlUuid>)]
    ids: Vec<uuid::Uuid>,
}

/// Moves waiting entries of the outbox (up to a thousand at a time) to
/// their tenants' logs on their shards; returns how many. Entries are taken
/// with `FOR UPDATE SKIP LOCKED`, so instances deliver side by side; each
/// tenant's batch is committed on its shard before it leaves the outbox, and
/// one delivered again (a crash in between) is the same row, kept once.
/// A tenant whose batch fails stays in the outbox for the next round.
pub async fn deliver(db: &Db) -> anyhow::Result<usize> {
    db.platform(async |conn: &mut PgConn| {
        // Raw SQL: the batch, grouped by tenant, as JSON rows of the log.
        let waiting: Vec<Waiting> = diesel::sql_query(
            "WITH batch AS (SELECT * FROM public.audit_outbox ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) \
             SELECT b.tenant_id, t.schema_name, t.shard, \
                    jsonb_agg(to_jsonb(b) - 'tenant_id' ORDER BY b.id) AS entries, array_agg(b.id) AS ids \
             FROM batch b JOIN public.tenants t ON t.id = b.tenant_id \
             GROUP BY b.tenant_id, t.schema_name, t.shard",
        )
        .load(conn)
        .await?;
        let mut delivered = 0;
        for tenant in waiting {
            let (Ok(schema), Ok(shard)) =
                (SchemaName::from_stored(tenant.schema_name), ShardName::parse(&tenant.shard))
            else {
                continue;
            };
            if shard.is_primary() {
                // Moved back to the primary meanwhile: its log is here.
                copy_into(conn, &schema, &tenant.entries).await?;
            } else {
                let copied = db
                    .on_shard(&shard, async |c: &mut PgConn| Ok::<_, anyhow::Error>(copy_into(c, &schema, &tenant.entries).await?))
                    .await;
                if let Err(err) = copied {
                    let tenant = TenantId(tenant.tenant_id);
                    tracing::warn!(tenant.id = %tenant, error = %format!("{err:#}"), "delivering audit entries failed; trying again");
                    continue;
                }
            }
            diesel::sql_query("DELETE FROM public.audit_outbox WHERE id = ANY($1)")
                .bind::<diesel::sql_types::Array<SqlUuid>, _>(&tenant.ids)
                .execute(conn)
                .await?;
            delivered += tenant.ids.len();
        }
        Ok::<_, anyhow::Error>(delivered)
    })
    .await
}

/// Raw SQL: entries as JSON into a schema's log, those already there kept.
async fn copy_into(conn: &mut PgConn, schema: &SchemaName, entries: &serde_json::Value) -> diesel::QueryResult<()> {
    diesel::sql_query(format!(
        "INSERT INTO {s}.audit_log SELECT * FROM jsonb_populate_recordset(NULL::{s}.audit_log, $1) \
         ON CONFLICT (id) DO NOTHING",
        s = schema.quoted()
    ))
    .bind::<Jsonb, _>(entries)
    .execute(conn)
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

/// Entries of the tenant `conn` is scoped to that are about `user` (by them,
/// or with them as the target), oldest first, at most `limit`: what a
/// user's own export holds.
pub async fn about(conn: &mut TenantConn<'_>, user: uuid::Uuid, limit: i64) -> diesel::QueryResult<Vec<Stored>> {
    use diesel::{BoolExpressionMethods as _, ExpressionMethods as _, QueryDsl as _, SelectableHelper as _};
    audit_log::table
        .filter(
            audit_log::actor_id
                .eq(user)
                .or(audit_log::target_type.eq("user").and(audit_log::target_id.eq(user.to_string()))),
        )
        .order(audit_log::id.asc())
        .limit(limit)
        .select(Stored::as_select())
        .load(conn.pg())
        .await
}
