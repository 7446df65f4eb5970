//! Mail: a transactional outbox delivered by a job.
//!
//! Sending mail means [`queue`]: an outbox row (recipient, template, data,
//! idempotency key) and a `mail.deliver` job, both written with the caller's
//! connection, in the caller's transaction. The job renders the template and
//! hands the message to SMTP (lettre, pooled connections) or, with no SMTP
//! configured, writes it as an `.eml` file to a folder.
//!
//! - One message per idempotency key: a second `queue` with the same key is
//!   a no-op, and delivery locks the outbox row and skips it once sent.
//! - A temporary failure (connection refused, timeout, 4xx) retries with
//!   backoff; a permanent rejection (5xx) is recorded and not retried.
//! - The one window for a duplicate: SMTP accepted the message and the
//!   process died before recording it. Messages carry a stable Message-ID
//!   (`<outbox id@sender domain>`) so receivers can recognise a duplicate.
//!
//! Templates live in the crates that send them (identity, billing); this
//! module only renders what it is given by name.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use plinth_jobs::{self as jobs, ClaimedJob, JobError, NewJob};
use plinth_tenants::db::Db;
use plinth_tenants::ids::TenantId;
use plinth_tenants::text::redact_addresses;

/// The job kind that delivers one outbox message.
pub const DELIVER: &str = "mail.deliver";

/// An email address that can only be built valid: trimmed, lowercased, at
/// most 254 characters, and accepted by lettre's address parser.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("is not a valid email address")]
pub struct InvalidEmail;

impl EmailAddress {
    pub fn parse(input: &str) -> Result<Self, InvalidEmail> {
        let normalized = input.trim().to_lowercase();
        if normalized.is_empty() || normalized.len() > 254 || normalized.chars().any(char::is_control) {
            return Err(InvalidEmail);
        }
        let address: lettre::Address = normalized.parse().map_err(|_| InvalidEmail)?;
        // A domain needs a dot (no `user@localhost` from the outside world),
        // and a name, not an address: no `[10.0.0.5]` literal and no
        // all-digit top label, which would aim mail at internal hosts through
        // the relay.
        let domain = address.domain();
        if !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') || domain.starts_with('[') {
            return Err(InvalidEmail);
        }
        let top = domain.rsplit('.').next().unwrap_or_default();
        if !top.chars().any(|c| c.is_alphabetic()) || domain.contains("..") {
            return Err(InvalidEmail);
        }
        Ok(Self(normalized))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for EmailAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EmailAddress::parse(&s).map_err(|e| serde::de::Error::custom(e.to_string()))
    }
}

impl std::fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: EmailAddress,
    /// A template name registered with [`Templates`].
    pub template: &'static str,
    pub data: serde_json::Value,
    /// The same key is sent once, however often it is queued.
    pub idempotency_key: String,
    pub tenant: Option<TenantId>,
}

diesel::table! {
    public.mail_outbox (id) {
        id -> Uuid,
        tenant_id -> Nullable<Uuid>,
        idempotency_key -> Text,
        recipient -> Text,
        template -> Text,
        data -> Jsonb,
        status -> Text,
        smtp_response -> Nullable<Text>,
        created_at -> Timestamptz,
        sent_at -> Nullable<Timestamptz>,
    }
}

/// Queues `mail` on `conn`, in the caller's transaction. Returns false if a
/// message with the same idempotency key was queued before.
pub async fn queue(conn: &AsyncPgConnection, mail: Mail) -> diesel::QueryResult<bool> {
    let mut c = conn;
    let inserted: Option<uuid::Uuid> = diesel::insert_into(mail_outbox::table)
        .values((
            mail_outbox::id.eq(uuid::Uuid::now_v7()),
            mail_outbox::tenant_id.eq(mail.tenant.map(|t| t.0)),
            mail_outbox::idempotency_key.eq(&mail.idempotency_key),
            mail_outbox::recipient.eq(mail.to.as_str()),
            mail_outbox::template.eq(mail.template),
            mail_outbox::data.eq(&mail.data),
        ))
        .on_conflict(mail_outbox::idempotency_key)
        .do_nothing()
        .returning(mail_outbox::id)
        .get_result(&mut c)
        .await
        .optional()?;
    let Some(id) = inserted else { return Ok(false) };
    let job = NewJob {
        tenant: mail.tenant,
        dedup_key: Some(id.to_string()),
        max_attempts: 12,
        ..NewJob::new(DELIVER, serde_json::json!({ "outbox_id": id }))
    };
    jobs::enqueue(conn, job).await?;
    Ok(true)
}

/// A template's sources: subject, plain text and HTML (auto-escaped).
#[derive(Debug, Clone, Copy)]
pub struct Template {
    pub name: &'static str,
    pub subject: &'static str,
    pub text: &'static str,
    pub html: &'static str,
}

/// A [`Template`] from `<calling crate>/templates/<name>.{subject,txt,html}`.
#[macro_export]
macro_rules! mail_template {
    ($name:literal) => {
        $crate::Template {
            name: $name,
            subject: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/", $name, ".subject")),
            text: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/", $name, ".txt")),
            html: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/", $name, ".html")),
        }
    };
}

/// A rendered message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The registered templates. Every template sees `public_url` (links are
/// `{{ public_url }}/path?token={{ token | urlencode }}`).
pub struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    /// Compiles every template now, so a broken one fails at start.
    pub fn new(public_url: &str, sets: &[&[Template]]) -> anyhow::Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") { minijinja::AutoEscape::Html } else { minijinja::AutoEscape::None }
        });
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        // Operator configuration, not user input: links stay readable in HTML.
        env.add_global("public_url", minijinja::Value::from_safe_string(public_url.trim_end_matches('/').to_owned()));
        for template in sets.iter().flat_map(|s| s.iter()) {
            for (suffix, source) in [("subject", template.subject), ("txt", template.text), ("html", template.html)] {
                env.add_template_owned(format!("{}.{suffix}", template.name), source)
                    .with_context(|| format!("mail template {}.{suffix}", template.name))?;
            }
        }
        Ok(Self { env })
    }

    pub fn render(&self, name: &str, data: &serde_json::Value) -> anyhow::Result<Rendered> {
        let part = |suffix: &str| -> anyhow::Result<String> {
            let key = format!("{name}.{suffix}");
            let template = self.env.get_template(&key).with_context(|| format!("no mail template {key}"))?;
            template.render(data).with_context(|| format!("rendering {key}"))
        };
        // A subject is one header line: no line breaks or control characters.
        let subject: String = part("subject")?
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Rendered { subject, text: part("txt")?, html: part("html")? })
    }
}

/// Where messages go.
pub enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// No SMTP configured: each message becomes `<folder>/<id>.eml`.
    Folder(PathBuf),
}

impl Transport {
    /// SMTP from a URL (`smtp://`, `smtps://`, `smtp://...?tls=required` for
    /// STARTTLS, optional `user:password@`), else the folder.
    pub fn from_settings(smtp_url: Option<&str>, folder: PathBuf) -> anyhow::Result<Self> {
        match smtp_url {
            Some(url) => {
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .context("PLINTH_SMTP_URL is not a valid SMTP URL")?
                    .timeout(Some(Duration::from_secs(20)))
                    .pool_config(PoolConfig::new().max_size(4).idle_timeout(Duration::from_secs(30)))
                    .build();
                Ok(Self::Smtp(transport))
            }
            None => {
                std::fs::create_dir_all(&folder)
                    .with_context(|| format!("creating the mail folder {}", folder.display()))?;
                Ok(Self::Folder(folder))
            }
        }
    }
}

/// What happened to a message.
#[derive(Clone)]
enum Sent {
    Accepted(String),
    Rejected(String),
}

/// Delivers outbox messages; registered as the `mail.deliver` job handler.
pub struct Mailer {
    db: Db,
    transport: Transport,
    from: Mailbox,
    templates: Templates,
}

impl Mailer {
    pub fn new(db: Db, transport: Transport, from: &str, templates: Templates) -> anyhow::Result<Self> {
        let from: Mailbox = from.parse().context("PLINTH_MAIL_FROM is not a valid mailbox")?;
        Ok(Self { db, transport, from, templates })
    }

    pub fn handler(self: &Arc<Self>) -> jobs::Handler {
        let this = Arc::clone(self);
        Arc::new(move |job| {
            let this = Arc::clone(&this);
            Box::pin(async move { this.deliver(job).await })
        })
    }

    async fn deliver(&self, job: ClaimedJob) -> Result<(), JobError> {
        let outbox_id = job
            .payload
            .get("outbox_id")
            .and_then(|v| v.as_str())
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
            .ok_or_else(|| JobError::Fatal(anyhow::anyhow!("mail job without an outbox id")))?;
        // The row stays locked while the message is handed over, so a second
        // run of the same job waits and then finds it sent.
        let handed_over = std::sync::Mutex::new(None);
        let result = self
            .db
            .platform(async |conn| {
                let row: Option<OutboxRow> = mail_outbox::table
                    .find(outbox_id)
                    .select(OutboxRow::as_select())
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?;
                let Some(row) = row else {
                    return Err(JobError::Fatal(anyhow::anyhow!("outbox message {outbox_id} does not exist")));
                };
                if row.status != "queued" {
                    tracing::info!(mail.id = %outbox_id, status = row.status, "mail already handled");
                    return Ok(());
                }
                let span = tracing::info_span!(
                    "mail delivery",
                    otel.kind = "client",
                    mail.id = %outbox_id,
                    mail.template = row.template,
                    tenant.id = row.tenant_id.map(tracing::field::display),
                );
                let sent = match self.render(outbox_id, &row) {
                    Ok(message) => self.send(message).instrument(span).await.inspect_err(|_| {
                        metrics::counter!("plinth_mail_total", "outcome" => "error").increment(1);
                    })?,
                    Err(err) => Sent::Rejected(format!("could not build the message: {err:#}")),
                };
                if let Ok(mut handed) = handed_over.lock() {
                    *handed = Some(sent.clone());
                }
                record(conn, outbox_id, &sent).await?;
                let outcome = if matches!(sent, Sent::Accepted(_)) { "sent" } else { "rejected" };
                metrics::counter!("plinth_mail_total", "outcome" => outcome).increment(1);
                match sent {
                    Sent::Accepted(_) => {
                        tracing::info!(mail.id = %outbox_id, mail.template = row.template, "mail sent")
                    }
                    Sent::Rejected(reason) => tracing::warn!(
                        mail.id = %outbox_id,
                        mail.template = row.template,
                        reason = redact_addresses(&reason),
                        "mail rejected for good"
                    ),
                }
                Ok(())
            })
            .await;
        let handed = handed_over.lock().ok().and_then(|mut h| h.take());
        match (result, handed) {
            (Ok(()), _) => Ok(()),
            // The server took (or refused) the message, and then the database
            // went away before that was written down: write it down once the
            // database is back, rather than let the job send it again.
            (Err(err), Some(sent)) => self.record_later(outbox_id, &sent, err).await,
            (Err(err), None) => Err(err),
        }
    }

    /// Records a delivery whose first recording failed, retrying while the
    /// database is away, for up to a minute (the job's lease); past that the
    /// job is retried, and the message may go out twice.
    async fn record_later(&self, outbox_id: uuid::Uuid, sent: &Sent, first: JobError) -> Result<(), JobError> {
        tracing::warn!(mail.id = %outbox_id, "the mail was handed over but recording it failed; retrying the record");
        let started = std::time::Instant::now();
        let mut wait = std::time::Duration::from_millis(100);
        let mut last = first;
        while started.elapsed() < std::time::Duration::from_secs(50) {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
            match self.db.platform(async |conn| record(conn, outbox_id, sent).await).await {
                Ok(()) => {
                    let outcome = if matches!(sent, Sent::Accepted(_)) { "sent" } else { "rejected" };
                    metrics::counter!("plinth_mail_total", "outcome" => outcome).increment(1);
                    tracing::info!(mail.id = %outbox_id, "delivery recorded after the database came back");
                    return Ok(());
                }
                Err(err) => last = err,
            }
        }
        tracing::error!(mail.id = %outbox_id, "a handed-over mail could not be recorded; it may be sent again");
        Err(last)
    }

    fn render(&self, id: uuid::Uuid, row: &OutboxRow) -> anyhow::Result<Message> {
        let rendered = self.templates.render(&row.template, &row.data)?;
        let to: lettre::Address = row.recipient.parse().context("recipient")?;
        let domain = self.from.email.domain().to_owned();
        Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to))
            .subject(rendered.subject)
            .message_id(Some(format!("<{}@{domain}>", id.simple())))
            .multipart(MultiPart::alternative_plain_html(rendered.text, rendered.html))
            .context("building the message")
    }

    async fn send(&self, message: Message) -> Result<Sent, JobError> {
        match &self.transport {
            Transport::Smtp(smtp) => match smtp.send(message).await {
                Ok(response) => Ok(Sent::Accepted(format!(
                    "{} {}",
                    response.code(),
                    response.message().collect::<Vec<_>>().join(" ")
                ))),
                Err(err) if err.is_permanent() => Ok(Sent::Rejected(err.to_string())),
                Err(err) => Err(JobError::Retry(anyhow::Error::new(err).context("SMTP delivery failed"))),
            },
            Transport::Folder(folder) => {
                let files = AsyncFileTransport::<Tokio1Executor>::new(folder);
                let id = files
                    .send(message)
                    .await
                    .map_err(|e| JobError::Retry(anyhow::Error::new(e).context("writing the mail file")))?;
                let path = folder.join(format!("{id}.eml"));
                tracing::info!(path = %path.display(), "mail written to a file (no SMTP configured)");
                Ok(Sent::Accepted(format!("written to {}", path.display())))
            }
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = mail_outbox)]
struct OutboxRow {
    tenant_id: Option<uuid::Uuid>,
    recipient: String,
    template: String,
    data: serde_json::Value,
    status: String,
}

/// Writes down what the SMTP server said of a message (only while the row is
/// still queued); the data (tokens in links) does not outlive the delivery.
async fn record(conn: &mut AsyncPgConnection, outbox_id: uuid::Uuid, sent: &Sent) -> Result<(), JobError> {
    let (status, response) = match sent {
        Sent::Accepted(r) => ("sent", r.as_str()),
        Sent::Rejected(r) => ("failed", r.as_str()),
    };
    let sent_at = (status == "sent").then(chrono::Utc::now);
    diesel::update(mail_outbox::table.find(outbox_id).filter(mail_outbox::status.eq("queued")))
        .set((
            mail_outbox::status.eq(status),
            mail_outbox::smtp_response.eq(response),
            mail_outbox::data.eq(serde_json::json!({})),
            mail_outbox::sent_at.eq(sent_at),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_are_parsed_and_normalized() {
        assert_eq!(EmailAddress::parse("  Ada@Example.COM ").map(|e| e.0), Ok("ada@example.com".to_owned()));
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@localhost",
            "a b@example.com",
            "ada@example.com\r\nBcc: x@y.z",
            &format!("{}@example.com", "a".repeat(250)),
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_redacted_from_loggable_text() {
        let reply = "permanent error (550): 5.1.1 <grace@example.com>: Recipient address rejected";
        assert_eq!(redact_addresses(reply), "permanent error (550): 5.1.1 [address] Recipient address rejected");
        assert_eq!(redact_addresses("no address here"), "no address here");
    }

    #[test]
    fn html_is_escaped_and_subjects_stay_one_line() -> anyhow::Result<()> {
        let templates = Templates::new(
            "https://app.example.com/",
            &[&[Template {
                name: "t",
                subject: "Join {{ org }}",
                text: "{{ org }} {{ public_url }}/x?token={{ token | urlencode }}",
                html: "<p>{{ org }}</p>",
            }]],
        )?;
        let data = serde_json::json!({ "org": "<b>A&B</b>\r\nBcc: evil@example.com", "token": "a b/c" });
        let r = templates.render("t", &data)?;
        assert_eq!(r.subject, "Join <b>A&B</b> Bcc: evil@example.com");
        assert!(r.text.ends_with("https://app.example.com/x?token=a%20b/c"), "{}", r.text);
        assert!(r.html.contains("&lt;b&gt;A&amp;B&lt;&#x2f;b&gt;"), "{}", r.html);
        assert!(templates.render("t", &serde_json::json!({})).is_err(), "missing data is an error, not blank");
        Ok(())
    }
}

/// One message of the outbox, as the operator console lists it.
#[derive(Debug, Clone, serde::Serialize, diesel::Queryable)]
pub struct Delivery {
    pub id: uuid::Uuid,
    pub tenant_id: Option<uuid::Uuid>,
    pub recipient: String,
    pub template: String,
    /// `queued`, `sent` or `failed` (the server refused it for good).
    pub status: String,
    /// What the mail server answered.
    pub smtp_response: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The newest `limit` messages, only those in `status` if given; and the
/// count of every message by status.
pub async fn recent(
    conn: &mut AsyncPgConnection,
    status: Option<&str>,
    limit: i64,
) -> diesel::QueryResult<(Vec<Delivery>, Vec<(String, i64)>)> {
    use diesel::QueryDsl as _;
    let mut query = mail_outbox::table
        .order(mail_outbox::id.desc())
        .limit(limit)
        .select((
            mail_outbox::id,
            mail_outbox::tenant_id,
            mail_outbox::recipient,
            mail_outbox::template,
            mail_outbox::status,
            mail_outbox::smtp_response,
            mail_outbox::created_at,
            mail_outbox::sent_at,
        ))
        .into_boxed();
    if let Some(status) = status {
        query = query.filter(mail_outbox::status.eq(status.to_owned()));
    }
    let rows = query.load(conn).await?;
    let counts = mail_outbox::table
        .group_by(mail_outbox::status)
        .select((mail_outbox::status, diesel::dsl::count_star()))
        .order(mail_outbox::status.asc())
        .load(conn)
        .await?;
    Ok((rows, counts))
}
