//! Traces: a real `plinth serve` exports its spans over OTLP/HTTP to a
//! collector running in this test, and a caller's `traceparent` ties a
//! request, its tenant transactions, its Stripe calls, the job it queued and
//! the mail that job delivered into one trace.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use plinth_access::Role;
use plinth_tenants::{Slug, registry};
use prost::Message as _;
use serde_json::json;

use crate::harness::{TempDir, TestDb, TestResult, eventually, member};
use crate::smtp::SmtpServer;
use crate::stripe::StripeMock;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    /// OTLP's `SpanKind`: 2 server, 3 client, 5 consumer.
    kind: i32,
    attributes: Vec<(String, String)>,
    service: Option<String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    handle: actix_web::dev::ServerHandle,
}

impl Collector {
    async fn start() -> std::io::Result<Self> {
        use actix_web::{App, HttpResponse, HttpServer, web};
        let spans = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&spans);
        let server = HttpServer::new(move || {
            let spans = Arc::clone(&shared);
            App::new().route(
                "/v1/traces",
                web::post().to(move |body: web::Bytes| {
                    let spans = Arc::clone(&spans);
                    async move {
                        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                            return HttpResponse::BadRequest().finish();
                        };
                        spans.lock().unwrap_or_else(|p| p.into_inner()).extend(flatten(request));
                        // An empty ExportTraceServiceResponse.
                        HttpResponse::Ok().content_type("application/x-protobuf").finish()
                    }
                }),
            )
        })
        .workers(1)
        .bind("127.0.0.1:0")?;
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Ok(Self { url: format!("http://127.0.0.1:{port}"), spans, handle })
    }

    fn trace(&self, trace: &str) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|s| s.trace == trace).cloned().collect()
    }

    fn all(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let text = |value: Option<AnyValue>| match value {
        Some(AnyValue::StringValue(s)) => s,
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    let mut out = Vec::new();
    for resource in request.resource_spans {
        let service = resource.resource.and_then(|r| {
            r.attributes.into_iter().find(|kv| kv.key == "service.name").map(|kv| text(kv.value.and_then(|v| v.value)))
        });
        for scope in resource.scope_spans {
            for span in scope.spans {
                out.push(Span {
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: span
                        .attributes
                        .into_iter()
                        .map(|kv| (kv.key, text(kv.value.and_then(|v| v.value))))
                        .collect(),
                    service: service.clone(),
                });
            }
        }
    }
    out
}

/// Whether `span` is `ancestor` or below it.
fn descends(spans: &[Span], span: &Span, ancestor: &Span) -> bool {
    let mut at = span;
    for _ in 0..spans.len() + 1 {
        if at.id == ancestor.id {
            return true;
        }
        match spans.iter().find(|s| s.id == at.parent) {
            Some(parent) => at = parent,
            None => return false,
        }
    }
    false
}

/// A new trace id and a caller's span id in it, and the `traceparent` naming them.
fn caller_trace() -> (String, String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let header = format!("00-{trace}-{span}-01");
    (trace, span, header)
}

#[tokio::test]
async fn a_request_its_transactions_stripe_calls_job_and_mail_are_exported_as_one_trace() -> TestResult {
    let collector = Collector::start().await?;
    let stripe = StripeMock::start().await?;
    let smtp = SmtpServer::start().await?;
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(1)?;
    let acme = registry::create(&db, &Slug::parse("acme")?, "Acme").await?;
    let bravo = registry::create(&db, &Slug::parse("bravo")?, "Bravo").await?;
    let owner = member(&db, &acme, Role::Owner).await?;
    let bravo_owner = member(&db, &bravo, Role::Owner).await?;
    let data = TempDir::new("traces")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("serve")
        .env("DATABASE_URL", &testdb.url)
        .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("PLINTH_WORKERS", "1")
        .env("PLINTH_DATA_DIR", &data.path)
        .env("PLINTH_OTLP_ENDPOINT", &collector.url)
        // Export every 50 ms instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env_remove("OTEL_SERVICE_NAME")
        .env("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth")
        .env("PLINTH_STRIPE_API_BASE", &stripe.url)
        .env("PLINTH_STRIPE_PRICE_PRO", "price_pro_traces")
        .env("PLINTH_SMTP_URL", smtp.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let http = crate::harness::http_client().build()?;
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), || async {
        Ok(http.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status() == 200))
    })
    .await?;
    let call = |method: reqwest::Method, path: &str, token: &str, slug: &str, traceparent: &str| {
        http.request(method, format!("{base}{path}"))
            .header("x-tenant", slug)
            .bearer_auth(token)
            .header("traceparent", traceparent)
    };

    // A read: the request continues the caller's trace; its tenant
    // transaction is below it and names the tenant.
    let (read_trace, caller_span, traceparent) = caller_trace();
    let res = call(reqwest::Method::GET, "/v1/projects", &owner, "acme", &traceparent).send().await?;
    assert_eq!(res.status(), 200);
    // Another tenant's request in its own trace, at the same time.
    let (bravo_trace, _, bravo_parent) = caller_trace();
    let res = call(reqwest::Method::GET, "/v1/projects", &bravo_owner, "bravo", &bravo_parent).send().await?;
    assert_eq!(res.status(), 200);
    let request_done = |trace: &str| {
        let spans = collector.trace(trace);
        spans.iter().any(|s| s.kind == 2) && spans.iter().any(|s| s.name == "tenant transaction")
    };
    eventually(Duration::from_secs(20), || async { Ok(request_done(&read_trace) && request_done(&bravo_trace)) })
        .await?;
    let spans = collector.trace(&read_trace);
    let request = spans.iter().find(|s| s.kind == 2).ok_or("no server span")?;
    assert_eq!(request.parent, caller_span, "the request span's parent is the caller's span");
    assert_eq!(request.name, "GET /v1/projects", "{request:#?}");
    assert_eq!(request.attr("http.route"), Some("/v1/projects"));
    assert_eq!(request.attr("http.status"), Some("200"));
    assert_eq!(request.attr("tenant.id"), Some(acme.id.to_string().as_str()));
    assert_eq!(request.service.as_deref(), Some("plinth"));
    let tx = spans.iter().find(|s| s.name == "tenant transaction").ok_or("no tenant transaction span")?;
    assert!(descends(&spans, tx, request), "the transaction belongs to the request: {spans:#?}");
    assert_eq!(tx.attr("tenant.id"), Some(acme.id.to_string().as_str()));
    assert_eq!(tx.attr("tx.outcome"), Some("commit"));
    // Nothing in acme's trace is about bravo, and the other way round.
    let bravo_id = bravo.id.to_string();
    assert!(spans.iter().all(|s| s.attributes.iter().all(|(_, v)| !v.contains(&bravo_id))), "{spans:#?}");
    let bravo_spans = collector.trace(&bravo_trace);
    let acme_id = acme.id.to_string();
    assert!(bravo_spans.iter().any(|s| s.attr("tenant.id") == Some(bravo_id.as_str())));
    assert!(bravo_spans.iter().all(|s| s.attributes.iter().all(|(_, v)| !v.contains(&acme_id))));

    // Stripe calls carry the trace on, naming their own span as the parent.
    let (billing_trace, _, traceparent) = caller_trace();
    let res = call(reqwest::Method::POST, "/v1/billing/checkout", &owner, "acme", &traceparent)
        .json(&json!({ "plan": "pro" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200, "{}", res.text().await?);
    let calls = stripe.requests();
    // A search for the tenant's customer, its creation, a look for a live
    // subscription, then the checkout session.
    assert_eq!(calls.len(), 4, "{calls:?}");
    // Spans are exported as they end, in batches: the request's own span
    // ends last, after its answer is written.
    eventually(Duration::from_secs(20), || async {
        let spans = collector.trace(&billing_trace);
        Ok(spans.iter().any(|s| s.kind == 2) && spans.iter().filter(|s| s.name.starts_with("Stripe ")).count() == 4)
    })
    .await?;
    let spans = collector.trace(&billing_trace);
    let request = spans.iter().find(|s| s.kind == 2).ok_or("no server span")?;
    for call in &calls {
        let header = call.traceparent.as_deref().ok_or("a Stripe call without traceparent")?;
        let parts: Vec<&str> = header.split('-').collect();
        assert_eq!((parts.len(), parts[1]), (4, billing_trace.as_str()), "{header}");
        let span = spans.iter().find(|s| s.id == parts[2]).ok_or("the Stripe call's parent span was not exported")?;
        assert_eq!((span.kind, span.name.as_str()), (3, format!("Stripe {} {}", call.method, call.path).as_str()));
        assert!(descends(&spans, span, request));
    }

    // An invitation: the request queues a mail job; the job and its
    // delivery continue the request's trace.
    let invitee = "traced.invitee@example.com";
    let (invite_trace, _, traceparent) = caller_trace();
    let res = call(reqwest::Method::POST, "/v1/invitations", &owner, "acme", &traceparent)
        .json(&json!({ "email": invitee, "role": "member" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201, "{}", res.text().await?);
    // Each span is exported when it ends, maybe in another batch: the job
    // may deliver before the request's span has ended, and the job's span
    // ends after the delivery's.
    eventually(Duration::from_secs(30), || async {
        let spans = collector.trace(&invite_trace);
        Ok(spans.iter().any(|s| s.kind == 2)
            && spans.iter().any(|s| s.name == "job mail.deliver")
            && spans.iter().any(|s| s.name == "mail delivery"))
    })
    .await?;
    let spans = collector.trace(&invite_trace);
    let request = spans.iter().find(|s| s.kind == 2).ok_or("no server span")?;
    let job = spans.iter().find(|s| s.name == "job mail.deliver").ok_or("no job span")?;
    assert_eq!(job.kind, 5);
    assert!(descends(&spans, job, request), "the job continues the request's trace: {spans:#?}");
    assert_eq!(job.attr("tenant.id"), Some(acme_id.as_str()));
    let mail = spans.iter().find(|s| s.name == "mail delivery").ok_or("no mail span")?;
    assert!(descends(&spans, mail, job));
    assert_eq!(mail.attr("tenant.id"), Some(acme_id.as_str()));
    assert_eq!(smtp.accepted().len(), 1);

    // No span anywhere carries an address or a token.
    for span in collector.all() {
        for (key, value) in &span.attributes {
            for secret in [invitee, owner.as_str(), bravo_owner.as_str(), "sk_test_plinth"] {
                assert!(!value.contains(secret), "span {:?} attribute {key} holds a secret", span.name);
            }
        }
    }

    server.start_kill()?;
    server.wait().await?;
    Ok(())
}
