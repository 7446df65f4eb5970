//! The job queue and mail delivery, against a real PostgreSQL and a real SMTP
//! listener: what arrives over the wire is what is asserted.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use plinth::config::Settings;
use plinth_http::ApiError;
use plinth_jobs::{self as jobs, ClaimedJob, Handlers, JobError, NewJob, Worker, WorkerConfig};
use plinth_mail::{self as mail, EmailAddress, Mail};
use plinth_tenants::notify::Listener;
use plinth_tenants::{Db, Slug, registry};
use tokio::sync::watch;

use crate::harness::{TempDir, TestDb, TestResult, eventually};
use crate::smtp::{Mode, SmtpServer};

const PUBLIC_URL: &str = "https://app.plinth.test";

pub fn settings(smtp_url: Option<String>, data_dir: &std::path::Path) -> TestResult<Settings> {
    let mut values = HashMap::new();
    values.insert("PLINTH_PUBLIC_URL".to_owned(), PUBLIC_URL.to_owned());
    values.insert("PLINTH_MAIL_FROM".to_owned(), "Plinth <noreply@plinth.test>".to_owned());
    values.insert("PLINTH_DATA_DIR".to_owned(), data_dir.display().to_string());
    if let Some(url) = smtp_url {
        values.insert("PLINTH_SMTP_URL".to_owned(), url);
    }
    Ok(Settings::from_values(&values)?)
}

pub fn fast() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        lease: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(2),
    }
}

/// A worker running in the background until stopped or dropped.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    listening: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(worker: Worker, listen_url: &str) -> Self {
        let mut listener = Listener::new();
        listener.on(jobs::CHANNEL, worker.listen_handler());
        let listening = listener.spawn(listen_url.to_owned());
        let (stop, stopped) = watch::channel(false);
        Self { stop, task: tokio::spawn(worker.run(stopped)), listening }
    }

    pub fn mail(testdb: &TestDb, settings: &Settings, config: WorkerConfig) -> TestResult<Self> {
        let worker = plinth::background::worker(settings, &plinth_tenants::DbConfig::new(&testdb.url), config)?;
        Ok(Self::start(worker, &testdb.url))
    }

    /// Stops like a shutdown: running jobs may finish within the grace.
    pub async fn stop(self) -> TestResult {
        self.stop.send(true)?;
        self.task.await?;
        self.listening.abort();
        Ok(())
    }

    /// Ends the worker abruptly, as a killed process would.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        self.listening.abort();
    }
}

async fn acme(db: &Db) -> TestResult<plinth_tenants::Tenant> {
    Ok(registry::create(db, &Slug::parse("acme")?, r#"Acme <b>&</b> "Co""#).await?)
}

fn invitation(tenant: &plinth_tenants::Tenant, to: &str, key: &str) -> TestResult<Mail> {
    Ok(plinth_identity::mail::invitation(
        EmailAddress::parse(to)?,
        tenant.id,
        &tenant.name,
        "Ada Lovelace",
        "member",
        "tok+en=1",
        key.to_owned(),
    ))
}

async fn queue(db: &Db, mail: Mail) -> TestResult<bool> {
    Ok(db.platform(async |c| Ok::<_, ApiError>(mail::queue(c, mail).await?)).await?)
}

async fn outbox(client: &tokio_postgres::Client) -> TestResult<Vec<(String, Option<String>, String)>> {
    let rows = client
        .query("SELECT status, smtp_response, data::text FROM public.mail_outbox ORDER BY created_at", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

async fn job_states(client: &tokio_postgres::Client) -> TestResult<Vec<(String, i32, Option<String>)>> {
    let rows = client.query("SELECT status, attempts, last_error FROM public.jobs ORDER BY created_at", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_arrives_over_smtp_with_both_bodies_and_the_link() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let smtp = SmtpServer::start().await?;
    let dir = TempDir::new("mail")?;
    let tenant = acme(&db).await?;
    assert!(queue(&db, invitation(&tenant, " Grace@Example.COM ", "invite-1")?).await?);
    let worker = Running::mail(&testdb, &settings(Some(smtp.url()), &dir.path)?, fast())?;

    eventually(Duration::from_secs(10), || async { Ok(smtp.accepted().len() == 1) }).await?;
    let raw = smtp.accepted().remove(0);
    let message = mail_parser::MessageParser::default().parse(raw.as_bytes()).ok_or("unparsable message")?;
    assert_eq!(message.subject(), Some(r#"Ada Lovelace invited you to join Acme <b>&</b> "Co" on Plinth"#));
    assert_eq!(message.from().and_then(|a| a.first()).and_then(|a| a.address()), Some("noreply@plinth.test"));
    assert_eq!(message.to().and_then(|a| a.first()).and_then(|a| a.address()), Some("grace@example.com"));
    assert!(message.message_id().is_some_and(|id| id.ends_with("@plinth.test")));
    let text = message.body_text(0).ok_or("no text body")?;
    let html = message.body_html(0).ok_or("no html body")?;
    let link = "https://app.plinth.test/invitations/accept?token=tok%2Ben%3D1";
    assert!(text.contains(link) && text.contains(r#"Acme <b>&</b> "Co""#), "{text}");
    assert!(html.contains(link), "{html}");
    assert!(html.contains("Acme &lt;b&gt;&amp;&lt;&#x2f;b&gt; &quot;Co&quot;"), "organization escaped in HTML: {html}");

    let client = testdb.client().await?;
    eventually(Duration::from_secs(5), || async { Ok(job_states(&client).await?[0].0 == "done") }).await?;
    let rows = outbox(&client).await?;
    assert_eq!(rows[0].0, "sent");
    assert!(rows[0].1.as_deref().is_some_and(|r| r.starts_with("250")));
    assert_eq!(rows[0].2, "{}", "the token does not outlive delivery");
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_then_back_delivers_exactly_once() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let mut smtp = SmtpServer::start().await?;
    let port = smtp.port;
    smtp.stop();
    let dir = TempDir::new("mail")?;
    let tenant = acme(&db).await?;
    queue(&db, invitation(&tenant, "grace@example.com", "invite-1")?).await?;
    let worker = Running::mail(&testdb, &settings(Some(format!("smtp://127.0.0.1:{port}")), &dir.path)?, fast())?;

    let client = testdb.client().await?;
    eventually(Duration::from_secs(10), || async {
        let jobs = job_states(&client).await?;
        Ok(jobs[0].1 >= 2 && jobs[0].2.is_some())
    })
    .await?;
    let (status, _, error) = job_states(&client).await?.remove(0);
    assert!(status == "queued" || status == "running", "{status}");
    assert!(error.unwrap_or_default().contains("SMTP delivery failed"));
    assert_eq!(outbox(&client).await?[0].0, "queued", "nothing recorded as sent");

    let smtp = SmtpServer::start_on(port).await?;
    eventually(Duration::from_secs(10), || async { Ok(smtp.accepted().len() == 1) }).await?;
    eventually(Duration::from_secs(5), || async { Ok(job_states(&client).await?[0].0 == "done") }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.accepted().len(), 1, "delivered once");
    assert_eq!(outbox(&client).await?[0].0, "sent");
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_refusals_retry_and_permanent_rejections_do_not() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let smtp = SmtpServer::start().await?;
    smtp.set_mode(Mode::TempFail);
    let dir = TempDir::new("mail")?;
    let tenant = acme(&db).await?;
    queue(&db, invitation(&tenant, "grace@example.com", "invite-1")?).await?;
    let worker = Running::mail(&testdb, &settings(Some(smtp.url()), &dir.path)?, fast())?;
    let client = testdb.client().await?;
    eventually(Duration::from_secs(10), || async { Ok(job_states(&client).await?[0].1 >= 2) }).await?;
    assert_eq!(outbox(&client).await?[0].0, "queued");

    smtp.set_mode(Mode::Reject);
    eventually(Duration::from_secs(10), || async { Ok(outbox(&client).await?[0].0 == "failed") }).await?;
    let (_, response, data) = outbox(&client).await?.remove(0);
    assert!(response.unwrap_or_default().contains("550"));
    assert_eq!(data, "{}");
    eventually(Duration::from_secs(5), || async { Ok(job_states(&client).await?[0].0 == "done") }).await?;
    let attempts = job_states(&client).await?[0].1;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(job_states(&client).await?[0].1, attempts, "a rejection is not retried");
    assert!(smtp.accepted().is_empty());
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_deliver_each_message_once() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(4)?;
    let smtp = SmtpServer::start().await?;
    let dir = TempDir::new("mail")?;
    let tenant = acme(&db).await?;
    for i in 0..30 {
        queue(&db, invitation(&tenant, &format!("user{i}@example.com"), &format!("invite-{i}"))?).await?;
    }
    let settings = settings(Some(smtp.url()), &dir.path)?;
    let first = Running::mail(&testdb, &settings, fast())?;
    let second = Running::mail(&testdb, &settings, fast())?;
    eventually(Duration::from_secs(20), || async { Ok(smtp.accepted().len() >= 30) }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = smtp.accepted();
    let recipients: HashSet<String> = accepted
        .iter()
        .filter_map(|raw| mail_parser::MessageParser::default().parse(raw.as_bytes()))
        .filter_map(|m| m.to().and_then(|a| a.first()).and_then(|a| a.address()).map(str::to_owned))
        .collect();
    assert_eq!((accepted.len(), recipients.len()), (30, 30), "each message exactly once");
    let client = testdb.client().await?;
    let by_worker: i64 = client.query_one("SELECT count(DISTINCT locked_by) FROM public.jobs", &[]).await?.get(0);
    assert_eq!(by_worker, 0, "no job is left held");
    assert!(job_states(&client).await?.iter().all(|j| j.0 == "done" && j.1 == 1), "every job ran once");
    first.stop().await?;
    second.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_job_is_taken_over_after_its_lease_and_completes_once() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let smtp = SmtpServer::start().await?;
    smtp.set_mode(Mode::Stall);
    let dir = TempDir::new("mail")?;
    let tenant = acme(&db).await?;
    queue(&db, invitation(&tenant, "grace@example.com", "invite-1")?).await?;
    let settings = settings(Some(smtp.url()), &dir.path)?;
    // A lease long enough that the rescuer's own heartbeats (every third of
    // it) keep it on a loaded machine: with 600 ms, a heartbeat late by
    // 400 ms let the rescuer take its own job over again (a third attempt).
    let lease = WorkerConfig { lease: Duration::from_secs(2), ..fast() };
    let doomed = Running::mail(&testdb, &settings, lease.clone())?;
    let client = testdb.client().await?;
    // Killed only once the server holds its whole message, unanswered: a
    // fixed wait here let a loaded machine kill it mid-message, and the
    // server, reading the rest after the switch to Accept, took it.
    eventually(Duration::from_secs(10), || async { Ok(smtp.stalled() == 1) }).await?;
    doomed.kill().await;

    smtp.set_mode(Mode::Accept);
    let rescuer = Running::mail(&testdb, &settings, lease)?;
    eventually(Duration::from_secs(10), || async { Ok(smtp.accepted().len() == 1) }).await?;
    eventually(Duration::from_secs(5), || async { Ok(job_states(&client).await?[0].0 == "done") }).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(smtp.accepted().len(), 1, "completed once");
    assert_eq!(job_states(&client).await?[0].1, 2, "the killed run counted as an attempt");
    rescuer.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_smtp_mail_is_written_to_the_folder() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let dir = TempDir::new("mail")?;
    let tenant = acme(&db).await?;
    queue(
        &db,
        plinth_billing::mail::payment_failed(
            EmailAddress::parse("owner@example.com")?,
            tenant.id,
            &tenant.name,
            "2026-12-01",
            "",
            "pf-1".into(),
        ),
    )
    .await?;
    let worker = Running::mail(&testdb, &settings(None, &dir.path)?, fast())?;
    let folder = dir.path.join("mail");
    eventually(Duration::from_secs(10), || async {
        Ok(std::fs::read_dir(&folder)?.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "eml")))
    })
    .await?;
    let file = std::fs::read_dir(&folder)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "eml"))
        .ok_or("no file")?;
    let message = std::fs::read(&file)?;
    let parsed = mail_parser::MessageParser::default().parse(&message).ok_or("unparsable")?;
    assert_eq!(parsed.subject(), Some(r#"Payment failed for Acme <b>&</b> "Co""#));
    assert!(
        parsed.body_text(0).is_some_and(|t| t.contains("https://app.plinth.test/billing") && t.contains("2026-12-01"))
    );
    let client = testdb.client().await?;
    eventually(Duration::from_secs(5), || async { Ok(outbox(&client).await?[0].0 == "sent") }).await?;
    assert!(outbox(&client).await?[0].1.as_deref().is_some_and(|r| r.contains(".eml")));
    worker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn mail_is_queued_with_the_transaction_and_once_per_key() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let tenant = acme(&db).await?;
    let rolled_back: Result<(), ApiError> = db
        .platform(async |c| {
            mail::queue(
                c,
                invitation(&tenant, "a@example.com", "k-rollback").map_err(|e| ApiError::invalid(e.to_string()))?,
            )
            .await?;
            Err(ApiError::Conflict("the change that caused the mail failed".into()))
        })
        .await;
    assert!(rolled_back.is_err());
    let client = testdb.client().await?;
    assert!(outbox(&client).await?.is_empty() && job_states(&client).await?.is_empty(), "nothing outlives a rollback");

    assert!(queue(&db, invitation(&tenant, "a@example.com", "k-1")?).await?);
    assert!(!queue(&db, invitation(&tenant, "a@example.com", "k-1")?).await?, "same key: not queued again");
    assert_eq!((outbox(&client).await?.len(), job_states(&client).await?.len()), (1, 1));

    // Jobs deduplicate by kind and key too.
    let job = || NewJob {
        dedup_key: Some("nightly-2026-11-23".into()),
        ..NewJob::new("test.nightly", serde_json::json!({}))
    };
    let first = db.platform(async |c| Ok::<_, ApiError>(jobs::enqueue(c, job()).await?)).await?;
    let second = db.platform(async |c| Ok::<_, ApiError>(jobs::enqueue(c, job()).await?)).await?;
    assert!(first.is_some() && second.is_none());
    Ok(())
}

/// A worker with test handlers: `test.sleep` sleeps `ms`, `test.flaky` fails
/// until its attempt reaches `succeed_on`.
fn test_worker(testdb: &TestDb, config: WorkerConfig) -> TestResult<Worker> {
    let mut handlers = Handlers::new();
    handlers.on(
        "test.sleep",
        std::sync::Arc::new(|job: ClaimedJob| {
            Box::pin(async move {
                let ms = job.payload["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            })
        }),
    );
    handlers.on(
        "test.flaky",
        std::sync::Arc::new(|job: ClaimedJob| {
            Box::pin(async move {
                let succeed_on = job.payload["succeed_on"].as_i64().unwrap_or(i64::MAX);
                if i64::from(job.attempts) >= succeed_on {
                    Ok(())
                } else {
                    Err(JobError::Retry(anyhow::anyhow!("flaky failure {}", job.attempts)))
                }
            })
        }),
    );
    Ok(Worker::new(testdb.db(4)?, handlers, config))
}

async fn enqueue(db: &Db, job: NewJob) -> TestResult<jobs::JobId> {
    Ok(db.platform(async |c| Ok::<_, ApiError>(jobs::enqueue(c, job).await?)).await?.ok_or("deduplicated")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_back_off_until_dead_and_the_cli_retries_them() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let flaky =
        enqueue(&db, NewJob { max_attempts: 3, ..NewJob::new("test.flaky", serde_json::json!({ "succeed_on": 5 })) })
            .await?;
    let unknown = enqueue(&db, NewJob::new("test.unknown", serde_json::json!({}))).await?;
    let recovers = enqueue(&db, NewJob::new("test.flaky", serde_json::json!({ "succeed_on": 3 }))).await?;
    let worker = Running::start(test_worker(&testdb, fast())?, &testdb.url);
    let client = testdb.client().await?;
    let state = |id: jobs::JobId| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT status, attempts, last_error FROM public.jobs WHERE id = $1", &[&id.0])
                .await?;
            Ok::<(String, i32, Option<String>), tokio_postgres::Error>((row.get(0), row.get(1), row.get(2)))
        }
    };
    eventually(Duration::from_secs(10), || async { Ok(state(flaky).await?.0 == "dead") }).await?;
    let (_, attempts, error) = state(flaky).await?;
    assert_eq!((attempts, error.as_deref()), (3, Some("flaky failure 3")));
    eventually(Duration::from_secs(5), || async { Ok(state(unknown).await?.0 == "dead") }).await?;
    assert_eq!(state(unknown).await?.1, 1, "no handler: dead at once");
    eventually(Duration::from_secs(10), || async { Ok(state(recovers).await?.0 == "done") }).await?;
    assert_eq!(state(recovers).await?.1, 3);
    let counts = jobs::counts(&db).await?;
    assert_eq!((counts.dead, counts.done), (2, 1));
    worker.stop().await?;

    let run = |args: &'static [&'static str]| {
        let url = testdb.url.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
                .args(args)
                .env("DATABASE_URL", url)
                .env("RUST_LOG", "warn")
                .output()
                .await?;
            Ok::<_, std::io::Error>((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
        }
    };
    let (ok, out) = run(&["jobs", "list", "--status", "dead"]).await?;
    assert!(
        ok && out.contains("dead 2") && out.contains(&flaky.to_string()) && out.contains("flaky failure 3"),
        "{out}"
    );
    let id = flaky.to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["jobs", "retry", &id])
        .env("DATABASE_URL", &testdb.url)
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(state(flaky).await?.0, "queued");
    assert_eq!(state(flaky).await?.1, 0, "fresh attempts");
    let (ok, _) = run(&["jobs", "retry", "not-an-id"]).await?;
    assert!(!ok);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_jobs_finish_or_releases_them() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let client = testdb.client().await?;
    let status = |id: jobs::JobId| {
        let client = &client;
        async move {
            let row = client.query_one("SELECT status, attempts FROM public.jobs WHERE id = $1", &[&id.0]).await?;
            Ok::<(String, i32), tokio_postgres::Error>((row.get(0), row.get(1)))
        }
    };

    // Within the grace: the job finishes.
    let short = enqueue(&db, NewJob::new("test.sleep", serde_json::json!({ "ms": 300 }))).await?;
    let worker = Running::start(test_worker(&testdb, fast())?, &testdb.url);
    eventually(Duration::from_secs(5), || async { Ok(status(short).await?.0 == "running") }).await?;
    worker.stop().await?;
    assert_eq!(status(short).await?.0, "done");

    // Past the grace: the job goes back to the queue, not counted as an attempt.
    let long = enqueue(&db, NewJob::new("test.sleep", serde_json::json!({ "ms": 60_000 }))).await?;
    let config = WorkerConfig { shutdown_grace: Duration::from_millis(200), ..fast() };
    let worker = Running::start(test_worker(&testdb, config)?, &testdb.url);
    eventually(Duration::from_secs(5), || async { Ok(status(long).await?.0 == "running") }).await?;
    let started = std::time::Instant::now();
    worker.stop().await?;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status(long).await?, ("queued".to_owned(), 0));
    Ok(())
}

/// Dropping the stop handle stops the worker instead of leaving it spinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_stop_handle_is_dropped_stops() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(test_worker(&testdb, fast())?.run(stopped));
    drop(stop);
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}

/// Every template renders with exactly the data its constructor gives it,
/// and every link points at PLINTH_PUBLIC_URL.
#[test]
fn every_template_renders_with_its_constructor_data() -> TestResult {
    let templates = plinth::background::templates(PUBLIC_URL)?;
    let to = || EmailAddress::parse("someone@example.com");
    let tenant = plinth_tenants::TenantId::new();
    let mails = [
        plinth_identity::mail::verify_email(to()?, Some(tenant), "Acme", "tok1", "k1".into()),
        plinth_identity::mail::invitation(to()?, tenant, "Acme", "Ada", "admin", "tok2", "k2".into()),
        plinth_identity::mail::password_reset(to()?, "tok3", 30, "k3".into()),
        plinth_billing::mail::payment_failed(to()?, tenant, "Acme", "2026-12-01", "", "k4".into()),
        plinth_billing::mail::trial_ending(to()?, tenant, "Acme", "pro", "2026-12-01", "k5".into()),
        plinth_billing::mail::subscription_cancelled(to()?, tenant, "Acme", "pro", "k6".into()),
        plinth_billing::mail::payment_reminder(to()?, tenant, "Acme", "2026-12-01", "k7".into()),
    ];
    let names: HashSet<&str> = mails.iter().map(|m| m.template).collect();
    assert_eq!(names.len(), 7);
    for mail in &mails {
        let rendered = templates.render(mail.template, &mail.data)?;
        assert!(!rendered.subject.is_empty() && !rendered.subject.contains('\n'), "{}", mail.template);
        for body in [&rendered.text, &rendered.html] {
            assert!(body.contains(&format!("{PUBLIC_URL}/")), "{}: {body}", mail.template);
            if let Some(token) = mail.data.get("token").and_then(|t| t.as_str()) {
                assert!(body.contains(&format!("?token={token}")), "{}: {body}", mail.template);
            }
        }
    }
    Ok(())
}

/// Counts notifications on the jobs channel, from the moment `start` returns
/// (its LISTEN is acknowledged by then).
struct JobNotifications {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    driver: tokio::task::JoinHandle<()>,
    _client: tokio_postgres::Client,
}

impl JobNotifications {
    async fn start(url: &str) -> TestResult<Self> {
        let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&count);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
                if matches!(message, tokio_postgres::AsyncMessage::Notification(_)) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        client.batch_execute(&format!("LISTEN {}", jobs::CHANNEL)).await?;
        Ok(Self { count, driver, _client: client })
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for JobNotifications {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An idle worker polls quietly: its empty claims must not notify (and so
/// wake) the workers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_does_not_wake_itself() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let listening = JobNotifications::start(&testdb.url).await?;
    let worker = Running::start(test_worker(&testdb, fast())?, &testdb.url);
    // A second of idle polling (twenty claims at 50 ms) notifies nobody. (A
    // window for what must not happen: a slow machine can only make it pass
    // more easily, never fail.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(listening.count(), 0, "idle claims sent notifications");

    let db = testdb.db(1)?;
    enqueue(&db, NewJob::new("test.sleep", serde_json::json!({ "ms": 0 }))).await?;
    eventually(Duration::from_secs(10), || async { Ok(listening.count() >= 1) }).await?;
    // Once done, the worker goes back to quiet polling: no storm follows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let woken = listening.count();
    assert!((1..=3).contains(&woken), "queueing a job notifies ({woken})");
    worker.stop().await?;
    Ok(())
}

/// A job whose worker vanished on its last attempt is given up, not taken
/// over forever (a job that crashes its worker would otherwise loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expires_on_the_last_attempt_makes_the_job_dead() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let id =
        enqueue(&db, NewJob { max_attempts: 1, ..NewJob::new("test.sleep", serde_json::json!({ "ms": 0 })) }).await?;
    // A worker claims it and dies without a trace.
    let claimed = jobs::claim(&db, "ghost", 10, Duration::from_millis(200)).await?;
    assert_eq!(claimed.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worker = Running::start(test_worker(&testdb, fast())?, &testdb.url);
    let client = testdb.client().await?;
    eventually(Duration::from_secs(5), || async {
        let row = client.query_one("SELECT status FROM public.jobs WHERE id = $1", &[&id.0]).await?;
        Ok(row.get::<_, String>(0) == "dead")
    })
    .await?;
    let row = client.query_one("SELECT attempts, last_error FROM public.jobs WHERE id = $1", &[&id.0]).await?;
    assert_eq!(row.get::<_, i32>(0), 1);
    assert!(row.get::<_, Option<String>>(1).is_some_and(|e| e.contains("stopped responding")));
    worker.stop().await?;
    Ok(())
}

/// A job that fails keeps the real cause in `last_error` (and so in
/// `plinth jobs list --status dead`), not a bare "internal error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_keeps_its_cause_in_last_error() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let client = testdb.client().await?;
    // The known cause: a table the billing grace job reads is gone.
    client.batch_execute("ALTER TABLE public.subscriptions RENAME TO subscriptions_elsewhere").await?;
    let db = testdb.db(2)?;
    let job = NewJob::new("billing.grace", serde_json::json!({ "subscription": "sub_1", "since": 1 }));
    db.platform(async |c| Ok::<_, ApiError>(jobs::enqueue(c, job).await?)).await?.ok_or("not queued")?;
    let dir = TempDir::new("cause")?;
    let worker = Running::mail(&testdb, &settings(None, &dir.path)?, fast())?;
    eventually(Duration::from_secs(10), || async { Ok(job_states(&client).await?[0].2.is_some()) }).await?;
    let last_error = job_states(&client).await?.remove(0).2.ok_or("no error")?;
    assert!(last_error.contains(r#"relation "public.subscriptions" does not exist"#), "last_error: {last_error}");
    worker.stop().await?;
    Ok(())
}

/// A CLI failure says why: an unknown plan names the plans there are, and a
/// database failure under a command keeps the database's own message.
#[tokio::test]
async fn a_cli_failure_keeps_its_cause() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    registry::create(&db, &Slug::parse("acme")?, "Acme").await?;
    let plinth = async |args: &[&str]| -> TestResult<(bool, String)> {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(args)
            .env("DATABASE_URL", &testdb.url)
            .output()
            .await?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (ok, err) = plinth(&["tenants", "set-plan", "acme", "gold"]).await?;
    assert!(!ok);
    assert!(err.contains(r#"no plan "gold""#) && err.contains("free, pro"), "{err}");
    // The known cause: the audit log a plan change writes is gone.
    let client = testdb.client().await?;
    let schema: String =
        client.query_one("SELECT schema_name FROM public.tenants WHERE slug = 'acme'", &[]).await?.get(0);
    client.batch_execute(&format!(r#"DROP TABLE "{schema}".audit_log"#)).await?;
    let (ok, err) = plinth(&["tenants", "set-plan", "acme", "pro"]).await?;
    assert!(!ok);
    assert!(err.contains("changing the plan") && err.contains("audit_log\" does not exist"), "{err}");
    Ok(())
}

/// A worker whose heartbeat is late (a loaded machine) is alive: its own
/// job with an expired lease is not taken over by itself, which would run
/// the job twice at once; another worker does take it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_takes_over_its_own_job() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let id = enqueue(&db, NewJob::new("test.sleep", serde_json::json!({ "ms": 0 }))).await?;
    // A lease of nothing: expired as soon as it is taken.
    let claimed = jobs::claim(&db, "busy", 10, Duration::ZERO).await?;
    assert_eq!(claimed.len(), 1);
    let client = testdb.client().await?;
    eventually(Duration::from_secs(5), || async {
        let row = client.query_one("SELECT locked_until < now() FROM public.jobs WHERE id = $1", &[&id.0]).await?;
        Ok(row.get::<_, bool>(0))
    })
    .await?;
    assert!(jobs::claim(&db, "busy", 10, Duration::from_secs(30)).await?.is_empty(), "not its own job");
    let taken = jobs::claim(&db, "rescuer", 10, Duration::from_secs(30)).await?;
    assert_eq!(
        taken.iter().map(|j| (j.id, j.attempts)).collect::<Vec<_>>(),
        [(id.0, 2)],
        "another worker takes it over"
    );
    Ok(())
}
