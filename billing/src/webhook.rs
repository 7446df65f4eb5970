//! `POST /v1/webhooks/stripe`: the webhook inbox.
//!
//! An event is accepted only with a valid `Stripe-Signature` over the raw
//! body (HMAC-SHA256 with an endpoint secret; several `v1=` values and
//! several configured secrets are accepted, for rotation) and a timestamp
//! within 300 s. It is then stored raw in `public.stripe_events`, keyed by
//! its id, and acknowledged (200) only after that row is committed. A
//! second delivery of the same id is acknowledged and counted, nothing
//! more. Every signed event envelope (an id, a type and a `data.object`) is
//! queued for processing, whatever API version it was rendered in; its
//! `api_version` is recorded, and one other than the version Plinth is
//! pinned to is logged and counted (`plinth_stripe_event_version_mismatch_total`).
//! A signed body that is not an event envelope is stored too, parked with
//! the reason: nothing signed is lost. Anything else is 400 and nothing is
//! stored. Each stored event is processed by a job queued in the same
//! transaction (see [`crate::process`]).

use actix_web::{HttpRequest, HttpResponse, post, web};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::ApiError;
use plinth_jobs as jobs;
use plinth_tenants::Db;
use plinth_tenants::crypto::Secret;
use serde::Serialize;
use stripe_webhook::{Webhook, WebhookError};
use utoipa::ToSchema;

use crate::config::StripeConfig;
use crate::error::BillingError;
use crate::schema::stripe_events;

/// Stripe sends events of up to a few hundred kilobytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(receive_route);
}

/// Whether a `Stripe-Signature` header has Stripe's shape: a `t=` of digits
/// and at least one `v1=` of 64 hex digits, among comma-separated pairs.
/// Checked before the body is read, so a delivery that cannot be Stripe's
/// holds no buffer.
pub fn signature_shaped(header: &str) -> bool {
    if header.len() > 4096 {
        return false;
    }
    let (mut t, mut v1) = (false, false);
    for pair in header.split(',') {
        match pair.trim().split_once('=') {
            Some(("t", value)) => t = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()),
            Some(("v1", value)) => v1 |= value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()),
            Some(_) => {}
            None => return false,
        }
    }
    t && v1
}

/// What the inbox made of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Stored for processing.
    Stored { id: String, kind: String },
    /// Stored, parked: signed but not a Stripe event Plinth can read.
    Parked { id: String, reason: String },
    /// This id was stored before; acknowledged again.
    Duplicate { id: String },
}

/// Why a delivery was refused (400, nothing stored).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("the Stripe-Signature header is missing")]
    NoSignature,
    #[error("the Stripe-Signature header is malformed")]
    BadHeader,
    #[error("no signature matches the body")]
    BadSignature,
    #[error("the signature's timestamp is more than 300 s away")]
    Stale,
    #[error("the body is not UTF-8 JSON")]
    NotText,
}

/// Checks the signature against each secret. `Ok(Some(event))` is a
/// verified, parsed event; `Ok(None)` verified but unparseable.
fn verify(payload: &str, header: &str, secrets: &[Secret], now: i64) -> Result<Option<stripe_webhook::Event>, Refused> {
    let mut refused = Refused::BadSignature;
    for secret in secrets {
        match Webhook::construct_event_with_timestamp(payload, header, secret.expose(), now) {
            Ok(event) => return Ok(Some(event)),
            // Parsing comes after the signature and the timestamp passed.
            Err(WebhookError::BadParse(_)) => return Ok(None),
            Err(WebhookError::BadTimestamp(_)) => refused = Refused::Stale,
            Err(WebhookError::BadHeader(_)) => return Err(Refused::BadHeader),
            Err(WebhookError::BadSignature | WebhookError::BadKey) => {}
        }
    }
    Err(refused)
}

/// What the inbox reads of an event body, leniently (for the columns, and
/// for events rendered in another API version than async-stripe's).
#[derive(Default)]
struct Outline {
    id: Option<String>,
    kind: Option<String>,
    object_id: Option<String>,
    created_at: Option<DateTime<Utc>>,
    api_version: Option<String>,
    customer: Option<String>,
    /// An id, a type and a `data.object`: processing can read it.
    envelope: bool,
}

fn outline(payload: &str) -> Outline {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else { return Outline::default() };
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let object = &value["data"]["object"];
    let kind = text(&value["type"]);
    Outline {
        id: text(&value["id"]),
        object_id: text(&object["id"]),
        created_at: value["created"].as_i64().and_then(|t| DateTime::from_timestamp(t, 0)),
        api_version: text(&value["api_version"]),
        customer: crate::object::customer_of(kind.as_deref(), object),
        envelope: value["id"].is_string() && kind.is_some() && object.is_object(),
        kind,
    }
}

/// Verifies and stores one delivery.
pub async fn receive(
    db: &Db,
    secrets: &[Secret],
    payload: &[u8],
    signature: Option<&str>,
    now: i64,
) -> Result<Received, ReceiveError> {
    let header = signature.ok_or(Refused::NoSignature)?;
    let payload = std::str::from_utf8(payload).map_err(|_| Refused::NotText)?;
    let verified = verify(payload, header, secrets, now)?;
    let Outline { id, kind, object_id, created_at, api_version, customer, envelope } = outline(payload);
    // PostgreSQL text cannot hold NUL: such a body is kept with the byte
    // escaped, and parked (nothing Plinth can process has one).
    let payload_nul = payload.contains('\0');
    let stored_payload =
        if payload_nul { std::borrow::Cow::Owned(payload.replace('\0', "\\u0000")) } else { payload.into() };
    let has_nul = |v: &Option<String>| v.as_deref().is_some_and(|s| s.contains('\0'));
    let unreadable = payload_nul
        || has_nul(&id)
        || has_nul(&kind)
        || has_nul(&object_id)
        || has_nul(&api_version)
        || has_nul(&customer);
    let (kind, object_id, api_version, customer) = if unreadable {
        (kind.map(|k| k.replace('\0', "\u{fffd}")), None, None, None)
    } else {
        (kind, object_id, api_version, customer)
    };
    let (id, parked) = match (&verified, id) {
        _ if unreadable => (body_key(payload), Some("the event's id, type or body holds a NUL character".to_owned())),
        (Some(event), _) => (event.id.as_str().to_owned(), None),
        // Another API version's shapes: processing reads it by field.
        (None, Some(id)) if id.len() <= 255 && envelope => (id, None),
        (None, Some(id)) if id.len() <= 255 => (id, Some("the event does not parse as a Stripe event".to_owned())),
        // Signed, but not even a usable id: keyed by the body's hash so a
        // redelivery is still recognised.
        (None, _) => (body_key(payload), Some("the body is not JSON with an event id".to_owned())),
    };
    let kind = if unreadable { kind } else { verified.as_ref().map(|e| e.type_.as_str().to_owned()).or(kind) };
    // One statement: the event row and, for a new readable event, its
    // processing job; committed before the answer.
    let stored = db
        .statement(async |c| {
            let event = NewEvent {
                id: &id,
                kind: kind.as_deref(),
                object_id: object_id.as_deref(),
                created_at,
                api_version: api_version.as_deref(),
                customer: customer.as_deref(),
                payload: &stored_payload,
                parked: parked.as_deref(),
            };
            let stored = insert(c, &event).await?;
            Ok::<_, BillingError>(stored)
        })
        .await?;
    if stored && parked.is_none() {
        jobs::wake_soon(db);
    }
    // Once per event, not per delivery.
    let pinned = stripe_shared::version::VERSION.as_str();
    if let Some(version) = api_version.as_deref().filter(|v| stored && *v != pinned) {
        tracing::warn!(
            stripe.event = id,
            stripe.api_version = version,
            pinned,
            "a Stripe event in another API version than Plinth's; set the webhook endpoint's version to {pinned}"
        );
        metrics::counter!("plinth_stripe_event_version_mismatch_total").increment(1);
    }
    Ok(match (stored, parked) {
        (false, _) => Received::Duplicate { id },
        (true, Some(reason)) => Received::Parked { id, reason },
        (true, None) => Received::Stored { id, kind: kind.unwrap_or_default() },
    })
}

/// The inbox key of a signed body without a usable id: its hash, so a
/// redelivery is still recognised.
fn body_key(payload: &str) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(payload.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("unparsed_{}", &hex[..32])
}

/// One event as the inbox stores it.
struct NewEvent<'a> {
    id: &'a str,
    kind: Option<&'a str>,
    object_id: Option<&'a str>,
    created_at: Option<DateTime<Utc>>,
    api_version: Option<&'a str>,
    customer: Option<&'a str>,
    payload: &'a str,
    parked: Option<&'a str>,
}

#[derive(diesel::QueryableByName)]
struct Inserted {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    inserted: bool,
}

/// Inserts the event and, when it is new and readable, the job that
/// processes it (the same row `jobs::enqueue` writes, deduplicated by event
/// id, with `wake = false`: the inbox wakes the workers itself through
/// `jobs::wake_soon`); a known id only has its duplicates counted.
///
/// Raw SQL and a second writer of `public.jobs` on purpose: one statement
/// is one round trip with no explicit transaction, which is what holds
/// intake at its measured rate (`docs/benchmarks.md`, webhook intake); the
/// jobs crate owns every other statement on that table.
async fn insert(conn: &mut AsyncPgConnection, event: &NewEvent<'_>) -> Result<bool, diesel::result::Error> {
    let job = crate::process::job(event.id);
    let row: Inserted = diesel::sql_query(
        "WITH event AS ( \
           INSERT INTO public.stripe_events \
             (id, type, object_id, created_at, payload, status, parked_reason, api_version, customer_id) \
           VALUES ($1, $2, $3, $4, $5, CASE WHEN $6::text IS NULL THEN 'received' ELSE 'parked' END, $6, $11, $12) \
           ON CONFLICT (id) DO UPDATE SET duplicates = public.stripe_events.duplicates + 1 \
           RETURNING (xmax = 0) AS inserted), \
         job AS ( \
           INSERT INTO public.jobs (id, kind, payload, dedup_key, run_at, max_attempts, wake) \
           SELECT $7, $8, $9, $1, now(), $10, false FROM event WHERE event.inserted AND $6::text IS NULL \
           ON CONFLICT (kind, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING) \
         SELECT inserted FROM event",
    )
    .bind::<Text, _>(event.id)
    .bind::<Nullable<Text>, _>(event.kind)
    .bind::<Nullable<Text>, _>(event.object_id)
    .bind::<Nullable<Timestamptz>, _>(event.created_at)
    .bind::<Text, _>(event.payload)
    .bind::<Nullable<Text>, _>(event.parked)
    .bind::<diesel::sql_types::Uuid, _>(uuid::Uuid::now_v7())
    .bind::<Text, _>(job.kind)
    .bind::<diesel::sql_types::Jsonb, _>(&job.payload)
    .bind::<diesel::sql_types::Integer, _>(job.max_attempts)
    .bind::<Nullable<Text>, _>(event.api_version)
    .bind::<Nullable<Text>, _>(event.customer)
    .get_result(conn)
    .await?;
    Ok(row.inserted)
}

/// A stored event, as `plinth billing events` lists it.
#[derive(Debug, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = stripe_events)]
pub struct StoredEvent {
    pub id: String,
    pub kind: Option<String>,
    pub status: String,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub parked_reason: Option<String>,
}

/// The newest stored events (only the parked ones with `parked`).
pub async fn list_events(
    c: &mut diesel_async::AsyncPgConnection,
    parked: bool,
    limit: i64,
) -> diesel::QueryResult<Vec<StoredEvent>> {
    use diesel::{ExpressionMethods as _, QueryDsl as _, SelectableHelper as _};
    let query =
        stripe_events::table.order(stripe_events::received_at.desc()).limit(limit).select(StoredEvent::as_select());
    if parked { query.filter(stripe_events::status.eq("parked")).load(c).await } else { query.load(c).await }
}

/// How many stored events are parked (the `plinth_stripe_events_parked`
/// gauge).
pub async fn parked_count(c: &mut diesel_async::AsyncPgConnection) -> diesel::QueryResult<i64> {
    use diesel::{ExpressionMethods as _, QueryDsl as _};
    stripe_events::table.filter(stripe_events::status.eq("parked")).count().get_result(c).await
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("storing the event")]
    Store(#[from] BillingError),
}

/// Acknowledged: stored, or known already.
#[derive(Serialize, ToSchema)]
struct Acknowledged {
    /// Always true.
    received: bool,
    /// The event's id.
    id: String,
    /// Whether it had been delivered before.
    duplicate: bool,
}

/// A Stripe event: `POST /v1/webhooks/stripe`.
#[utoipa::path(
    operation_id = "receive_stripe_webhook",
    tag = "billing",
    summary = "Receives Stripe's webhook events",
    description = "For Stripe only: the body is an event as Stripe sends it, signed in `Stripe-Signature` with the \
                   endpoint's secret. A signed event is stored before it is acknowledged, so nothing is lost; \
                   a delivery again is acknowledged as a duplicate.",
    params(("Stripe-Signature" = String, Header, description = "`t=<unix time>,v1=<HMAC-SHA256 hex>`, as Stripe signs.")),
    request_body(content = Object, content_type = "application/json", description = "A Stripe event."),
    responses(
        (status = 200, body = Acknowledged),
        (status = 400, description = "Error: invalid_request (no or a wrong signature, too old, not an event).", body = plinth_http::openapi::ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured (no webhook secret), unavailable.", body = plinth_http::openapi::ErrorEnvelope),
    ),
)]
#[post("/v1/webhooks/stripe")]
async fn receive_route(
    req: HttpRequest,
    mut payload: web::Payload,
    db: web::Data<Db>,
    config: Option<web::Data<StripeConfig>>,
) -> Result<HttpResponse, ApiError> {
    let secrets = config.as_ref().map(|c| c.webhook_secrets.as_slice()).unwrap_or_default();
    if secrets.is_empty() {
        return Err(ApiError::BillingNotConfigured);
    }
    let signature = req.headers().get("stripe-signature").and_then(|v| v.to_str().ok());
    // Refused before a byte of the body is read: no header, or not Stripe's shape.
    let refused = match signature {
        None => Some(Refused::NoSignature),
        Some(header) if !signature_shaped(header) => Some(Refused::BadHeader),
        Some(_) => None,
    };
    if let Some(why) = refused {
        tracing::info!(reason = %why, "Stripe webhook refused");
        metrics::counter!("plinth_stripe_webhooks_total", "outcome" => "refused").increment(1);
        return Err(ApiError::invalid(why.to_string()));
    }
    let body = plinth_http::request::read_body(&req, &mut payload, MAX_EVENT_BYTES).await?;
    match receive(&db, secrets, &body, signature, Utc::now().timestamp()).await {
        Ok(received) => {
            let (id, duplicate, outcome) = match &received {
                Received::Stored { id, kind } => {
                    tracing::info!(stripe.event = id, stripe.type = kind, "Stripe event stored");
                    (id, false, "stored")
                }
                Received::Parked { id, reason } => {
                    tracing::warn!(stripe.event = id, reason, "Stripe event stored, parked");
                    (id, false, "parked")
                }
                Received::Duplicate { id } => {
                    tracing::info!(stripe.event = id, "Stripe event delivered again; acknowledged");
                    (id, true, "duplicate")
                }
            };
            metrics::counter!("plinth_stripe_webhooks_total", "outcome" => outcome).increment(1);
            Ok(HttpResponse::Ok().json(Acknowledged { received: true, id: id.clone(), duplicate }))
        }
        Err(ReceiveError::Refused(why)) => {
            tracing::info!(reason = %why, "Stripe webhook refused");
            metrics::counter!("plinth_stripe_webhooks_total", "outcome" => "refused").increment(1);
            Err(ApiError::invalid(why.to_string()))
        }
        Err(ReceiveError::Store(err)) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use hmac::{KeyInit as _, Mac as _};

    use super::*;

    /// `Stripe-Signature` as Stripe makes it, written independently of the
    /// crate that checks it.
    fn signed(body: &str, secret: &str, t: i64) -> String {
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(format!("{t}.{body}").as_bytes());
        let v1: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={t},v1={v1}")
    }

    /// The tolerance is 300 s either way, to the second: checked against a
    /// fixed clock (the HTTP tests use wide margins, as a loaded machine
    /// may take a second between signing and receiving).
    #[test]
    fn timestamps_are_accepted_within_300_seconds_either_way() {
        let secrets = vec![Secret::new("whsec_plinth_unit")];
        let now = 1_800_000_000;
        for skew in [-300, -299, 0, 299, 300] {
            let header = signed("{}", secrets[0].expose(), now + skew);
            assert!(verify("{}", &header, &secrets, now).is_ok(), "{skew} s refused");
        }
        for skew in [-301, 301, -3600] {
            let header = signed("{}", secrets[0].expose(), now + skew);
            assert!(matches!(verify("{}", &header, &secrets, now), Err(Refused::Stale)), "{skew} s accepted");
        }
    }
}
