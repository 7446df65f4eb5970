//! Single-use tokens sent by mail (email verification, password reset):
//! issued, checked and used up. Only a SHA-256 hash is stored
//! (`public.user_tokens`).

use std::time::Duration;

use crate::sessions;
use chrono::Utc;
use diesel::QueryableByName;
use diesel::sql_types::{Bytea, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::{ApiError, FieldError};

/// A single-use token for `purpose`, valid for `ttl`; returns (id, token).
pub(crate) async fn issue_token(
    conn: &AsyncPgConnection,
    user: uuid::Uuid,
    purpose: &str,
    ttl: Duration,
) -> Result<(uuid::Uuid, String), ApiError> {
    let (token, hash) = sessions::new_token().map_err(|e| ApiError::Internal(anyhow::anyhow!("no randomness: {e}")))?;
    let id = uuid::Uuid::now_v7();
    let expires = Utc::now() + chrono::Duration::from_std(ttl).map_err(|e| ApiError::Internal(e.into()))?;
    let mut conn = conn;
    diesel::sql_query(
        "INSERT INTO public.user_tokens (id, user_id, purpose, token_hash, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<SqlUuid, _>(user)
    .bind::<Text, _>(purpose)
    .bind::<Bytea, _>(&hash[..])
    .bind::<Timestamptz, _>(expires)
    .execute(&mut conn)
    .await?;
    Ok((id, token))
}

#[derive(QueryableByName)]
pub(crate) struct UserIdRow {
    #[diesel(sql_type = SqlUuid)]
    pub(crate) user_id: uuid::Uuid,
}

/// Uses up a single-use token: the user it belongs to, if it was valid.
pub(crate) async fn redeem_token(
    conn: &AsyncPgConnection,
    token: &str,
    purpose: &str,
) -> Result<Option<uuid::Uuid>, ApiError> {
    let mut conn = conn;
    let row: Vec<UserIdRow> = diesel::sql_query(
        "UPDATE public.user_tokens SET used_at = now() WHERE token_hash = $1 AND purpose = $2 \
         AND used_at IS NULL AND expires_at > now() RETURNING user_id",
    )
    .bind::<Bytea, _>(&sessions::hash_token(token)[..])
    .bind::<Text, _>(purpose)
    .load(&mut conn)
    .await?;
    Ok(row.into_iter().next().map(|r| r.user_id))
}

pub(crate) fn invalid_token() -> ApiError {
    ApiError::invalid_fields(vec![FieldError::new("token", "invalid", "is invalid, used or expired")])
}

/// Whether `token` is a live token for `purpose`, without using it up: a
/// cheap look before expensive work (hashing a new password) that only a
/// real token deserves.
pub(crate) async fn is_live(conn: &AsyncPgConnection, token: &str, purpose: &str) -> Result<bool, ApiError> {
    let mut conn = conn;
    let rows: Vec<UserIdRow> = diesel::sql_query(
        "SELECT user_id FROM public.user_tokens WHERE token_hash = $1 AND purpose = $2 \
         AND used_at IS NULL AND expires_at > now()",
    )
    .bind::<Bytea, _>(&sessions::hash_token(token)[..])
    .bind::<Text, _>(purpose)
    .load(&mut conn)
    .await?;
    Ok(!rows.is_empty())
}
