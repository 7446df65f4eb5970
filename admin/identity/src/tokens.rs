//! Single-use tokens sent by mail (email verification, password reset):
//! issued, checked and used up. Only a SHA-256 hash is stored
//! (`public.user_tokens`).

use std::time::Duration;

use crate::sessions;
use chrono::Utc;
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::error::IdentityError;
use crate::schema::user_tokens;

/// A single-use token for `purpose`, valid for `ttl`; returns (id, token).
pub(crate) async fn issue_token(
    conn: &AsyncPgConnection,
    user: uuid::Uuid,
    purpose: &str,
    ttl: Duration,
) -> Result<(uuid::Uuid, String), IdentityError> {
    issue_token_for(conn, user, purpose, ttl, None).await
}

/// [`issue_token`] carrying `detail` (the new address of a `change_email`
/// token), given back by [`redeem_token_for`].
pub(crate) async fn issue_token_for(
    conn: &AsyncPgConnection,
    user: uuid::Uuid,
    purpose: &str,
    ttl: Duration,
    detail: Option<&str>,
) -> Result<(uuid::Uuid, String), IdentityError> {
    let (token, hash) = sessions::new_token()?;
    let id = uuid::Uuid::now_v7();
    let ttl = chrono::Duration::from_std(ttl)
        .map_err(|e| IdentityError::Internal(anyhow::Error::new(e).context("the token lifetime is out of range")))?;
    let expires = Utc::now() + ttl;
    let mut conn = conn;
    diesel::insert_into(user_tokens::table)
        .values((
            user_tokens::id.eq(id),
            user_tokens::user_id.eq(user),
            user_tokens::purpose.eq(purpose),
            user_tokens::token_hash.eq(&hash[..]),
            user_tokens::expires_at.eq(expires),
            user_tokens::detail.eq(detail),
        ))
        .execute(&mut conn)
        .await?;
    Ok((id, token))
}

/// Uses up a single-use token: the user it belongs to, if it was valid.
pub(crate) async fn redeem_token(
    conn: &AsyncPgConnection,
    token: &str,
    purpose: &str,
) -> Result<Option<uuid::Uuid>, diesel::result::Error> {
    let mut conn = conn;
    let hash = sessions::hash_token(token);
    diesel::update(live(&hash, purpose))
        .set(user_tokens::used_at.eq(diesel::dsl::now))
        .returning(user_tokens::user_id)
        .get_result(&mut conn)
        .await
        .optional()
}

/// Uses up a single-use token: the user it belongs to and its detail, if
/// it was valid.
pub(crate) async fn redeem_token_for(
    conn: &AsyncPgConnection,
    token: &str,
    purpose: &str,
) -> Result<Option<(uuid::Uuid, Option<String>)>, diesel::result::Error> {
    let mut conn = conn;
    let hash = sessions::hash_token(token);
    diesel::update(live(&hash, purpose))
        .set(user_tokens::used_at.eq(diesel::dsl::now))
        .returning((user_tokens::user_id, user_tokens::detail))
        .get_result(&mut conn)
        .await
        .optional()
}

/// Whether `token` is a live token for `purpose`, without using it up: a
/// cheap look before expensive work (hashing a new password) that only a
/// real token deserves.
pub(crate) async fn is_live(conn: &AsyncPgConnection, token: &str, purpose: &str) -> diesel::QueryResult<bool> {
    let mut conn = conn;
    let hash = sessions::hash_token(token);
    diesel::select(diesel::dsl::exists(live(&hash, purpose))).get_result(&mut conn).await
}

/// The unused, unexpired token with this hash and purpose.
#[diesel::dsl::auto_type(no_type_alias)]
fn live<'a>(hash: &'a [u8; 32], purpose: &'a str) -> _ {
    let hash: &'a [u8] = &hash[..];
    user_tokens::table
        .filter(user_tokens::token_hash.eq(hash))
        .filter(user_tokens::purpose.eq(purpose))
        .filter(user_tokens::used_at.is_null())
        .filter(user_tokens::expires_at.gt(diesel::dsl::now))
}
