//! `GET /v1/audit-log` (admins): the tenant's audit log, newest first, with
//! cursor pagination and filters (`action`, `actor`).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use plinth_access::{Allowed, requirements};
use plinth_http::request::{Page, PageParams};
use plinth_http::{ApiError, FieldError};
use serde::{Deserialize, Serialize};

requirements! {
    /// Reading the audit log: admins, on plans with `audit_log`.
    ReadAuditLog = "audit_log", Manage, feature: "audit_log";
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/audit-log", web::get().to(list));
}

#[derive(Debug, Deserialize)]
struct Query {
    limit: Option<String>,
    cursor: Option<String>,
    action: Option<String>,
    actor: Option<String>,
}

#[derive(Serialize, QueryableByName)]
struct EntryRow {
    #[diesel(sql_type = SqlUuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    actor_type: String,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    actor_id: Option<uuid::Uuid>,
    #[diesel(sql_type = Text)]
    action: String,
    #[diesel(sql_type = Nullable<Text>)]
    target_type: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    target_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    ip: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
    #[diesel(sql_type = Jsonb)]
    details: serde_json::Value,
}

async fn list(ctx: Allowed<ReadAuditLog>, query: web::Query<Query>) -> Result<HttpResponse, ApiError> {
    let Query { limit, cursor, action, actor } = query.into_inner();
    // The cursor is the id of the last (oldest) entry of the previous page.
    let page = PageParams { limit, cursor }.validate()?;
    let actor = match actor.as_deref() {
        None | Some("") => None,
        Some(a) => Some(uuid::Uuid::parse_str(a).map_err(|_| {
            ApiError::invalid_fields(vec![FieldError::new("actor", "invalid", "is not a user or API key id")])
        })?),
    };
    let rows: Vec<EntryRow> = ctx
        .tx(async |c| {
            Ok::<_, ApiError>(
                diesel::sql_query(
                    "SELECT id, at, actor_type, actor_id, action, target_type, target_id, ip, request_id, details \
                     FROM audit_log WHERE ($1::uuid IS NULL OR id < $1) AND ($2::text IS NULL OR action = $2) \
                     AND ($3::uuid IS NULL OR actor_id = $3) ORDER BY id DESC LIMIT $4",
                )
                .bind::<Nullable<SqlUuid>, _>(page.after)
                .bind::<Nullable<Text>, _>(action.as_deref().filter(|a| !a.is_empty()))
                .bind::<Nullable<SqlUuid>, _>(actor)
                .bind::<BigInt, _>(page.limit + 1)
                .load(c.pg())
                .await?,
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(Page::from_rows(rows, page, |e| e.id)))
}
