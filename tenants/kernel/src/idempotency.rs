//! Safe retries of writes: a request made with an `Idempotency-Key` has its
//! answer stored with the key, in the transaction that does its work, and a
//! retry of the same request within [`TTL`] gets that answer again without
//! the work being done twice.
//!
//! A key belongs to one caller (a user or an API key) and names one request:
//! the hash of its method, path, tenant and body. The claim is an insert in
//! the work's own transaction, so a concurrent request with the same key
//! waits on it; when the first commits, the second finds the key taken,
//! rolls back and replays the first answer. If the first rolls back, the key
//! is free again.

use std::time::Duration;

use diesel::pg::Pg;
use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::{AsyncConnectionCore, RunQueryDsl};

use crate::schema::idempotency_keys;

/// How long a stored answer is replayed.
pub const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A request made with a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    /// `user:<id>` or `api_key:<id>`.
    pub caller: String,
    pub key: String,
    /// SHA-256 of the method, path, tenant and body.
    pub request: [u8; 32],
}

/// What an earlier request with the same key left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Earlier {
    /// The same request: its answer.
    Answered { status: u16, body: Vec<u8> },
    /// The key was used for another request.
    OtherRequest,
}

fn cutoff() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - TTL
}

/// The earlier request with this key, if one finished within [`TTL`].
pub async fn earlier<C>(conn: &mut C, keyed: &Keyed) -> diesel::QueryResult<Option<Earlier>>
where
    C: AsyncConnectionCore<Backend = Pg>,
{
    use diesel::OptionalExtension as _;
    let row: Option<(Vec<u8>, i16, Vec<u8>)> = idempotency_keys::table
        .find((&keyed.caller, &keyed.key))
        .filter(idempotency_keys::created_at.gt(cutoff()))
        .select((idempotency_keys::request_hash, idempotency_keys::status, idempotency_keys::body))
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(|(hash, status, body)| {
        if hash == keyed.request {
            Earlier::Answered { status: u16::try_from(status).unwrap_or(500), body }
        } else {
            Earlier::OtherRequest
        }
    }))
}

/// Claims the key in the transaction that does the request's work (and
/// notes its schema: a tenant's, for a write to its tables): false
/// when another request holds it (committed, or committing while this one
/// waited). A key older than [`TTL`] is taken over. Also deletes up to 100
/// expired keys, so the table holds about a day of keyed writes.
pub async fn claim<C>(conn: &mut C, keyed: &Keyed) -> diesel::QueryResult<bool>
where
    C: AsyncConnectionCore<Backend = Pg>,
{
    use diesel::sql_types::{Bytea, Text};
    // Raw SQL: diesel has no WHERE on ON CONFLICT DO UPDATE. The update takes
    // over an expired key only; a live one leaves the row as it is (0 rows).
    let claimed = diesel::sql_query(
        "INSERT INTO public.idempotency_keys (caller, key, request_hash, status, body, schema_name) \
         VALUES ($1, $2, $3, 0, '', current_schema()) \
         ON CONFLICT (caller, key) DO UPDATE \
         SET request_hash = EXCLUDED.request_hash, status = 0, body = '', created_at = now(), \
             schema_name = EXCLUDED.schema_name \
         WHERE idempotency_keys.created_at <= now() - interval '24 hours'",
    )
    .bind::<Text, _>(&keyed.caller)
    .bind::<Text, _>(&keyed.key)
    .bind::<Bytea, _>(&keyed.request[..])
    .execute(conn)
    .await?;
    // Raw SQL: a bounded delete (by ctid, with LIMIT) has no diesel form.
    diesel::sql_query(
        "DELETE FROM public.idempotency_keys WHERE ctid IN \
         (SELECT ctid FROM public.idempotency_keys WHERE created_at <= now() - interval '24 hours' LIMIT 100)",
    )
    .execute(conn)
    .await?;
    Ok(claimed == 1)
}

/// What a stored answer is sealed to: its caller and key (a sealed answer
/// moved to another row does not open).
pub fn seal_context(caller: &str, key: &str) -> Vec<u8> {
    [&b"idempotency\0"[..], caller.as_bytes(), b"\0", key.as_bytes()].concat()
}

/// Seals every stored answer under the keyring's first key (after a new
/// key was put first: `plinth admin rotate-keys`); answers stored in the
/// clear before sealing began are sealed too. Returns how many.
pub async fn reseal<C>(conn: &mut C, ring: &crate::crypto::Keyring) -> anyhow::Result<usize>
where
    C: AsyncConnectionCore<Backend = Pg>,
{
    let rows: Vec<(String, String, Vec<u8>)> = idempotency_keys::table
        .select((idempotency_keys::caller, idempotency_keys::key, idempotency_keys::body))
        .for_update()
        .load(conn)
        .await?;
    for (caller, key, body) in &rows {
        let context = seal_context(caller, key);
        let plain = if crate::crypto::Keyring::is_sealed(body) { ring.open(body, &context)? } else { body.clone() };
        diesel::update(idempotency_keys::table.find((caller, key)))
            .set(idempotency_keys::body.eq(ring.seal(&plain, &context)?))
            .execute(conn)
            .await?;
    }
    Ok(rows.len())
}

/// Stores the answer of a claimed key, in the same transaction.
pub async fn record<C>(conn: &mut C, keyed: &Keyed, status: u16, body: &[u8]) -> diesel::QueryResult<()>
where
    C: AsyncConnectionCore<Backend = Pg>,
{
    diesel::update(idempotency_keys::table.find((&keyed.caller, &keyed.key)))
        .set((idempotency_keys::status.eq(i16::try_from(status).unwrap_or(500)), idempotency_keys::body.eq(body)))
        .execute(conn)
        .await?;
    Ok(())
}
