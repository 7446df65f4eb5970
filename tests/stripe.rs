//! Stripe in tests: objects from Stripe's own fixtures (copied into
//! `tests/fixtures/stripe/`), events built from them, signed the way Stripe
//! signs webhooks.

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

const FIXTURES: &str = include_str!("fixtures/stripe/fixtures.json");

/// One of Stripe's example objects (`subscription`, `customer`, ...).
pub fn object(name: &str) -> Value {
    let all: Value = serde_json::from_str(FIXTURES).unwrap_or(Value::Null);
    all["resources"][name].clone()
}

/// A webhook event of `kind` about `data_object`, built on Stripe's example
/// event.
pub fn event(id: &str, kind: &str, created: i64, data_object: Value) -> Value {
    let mut event = object("event");
    event["id"] = json!(id);
    event["type"] = json!(kind);
    event["created"] = json!(created);
    event["data"] = json!({ "object": data_object });
    event
}

/// `Stripe-Signature: t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, as
/// Stripe computes it, written here independently of the crate Plinth uses.
pub fn signature(body: &str, secret: &str, t: i64) -> String {
    format!("t={t},v1={}", v1(body, secret, t))
}

pub fn v1(body: &str, secret: &str, t: i64) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(format!("{t}.{body}").as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Stripe's example subscription, as `id` of `customer` on `price`.
pub fn subscription(id: &str, customer: &str, status: &str, price: &str) -> Value {
    let mut sub = object("subscription");
    sub["id"] = json!(id);
    sub["customer"] = json!(customer);
    sub["status"] = json!(status);
    sub["cancel_at_period_end"] = json!(false);
    sub["items"]["data"][0]["price"]["id"] = json!(price);
    sub
}

/// Stripe's example checkout session, completed by `tenant` as `customer`.
pub fn checkout_session(tenant: &str, customer: &str, subscription: &str) -> Value {
    let mut session = object("checkout.session");
    session["mode"] = json!("subscription");
    session["client_reference_id"] = json!(tenant);
    session["customer"] = json!(customer);
    session["subscription"] = json!(subscription);
    session
}

/// Stripe's example invoice, of `customer`.
pub fn invoice(id: &str, customer: &str) -> Value {
    let mut invoice = object("invoice");
    invoice["id"] = json!(id);
    invoice["customer"] = json!(customer);
    invoice
}

/// One request Plinth made to the stand-in Stripe.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub authorization: Option<String>,
    /// The W3C trace context the call carried.
    pub traceparent: Option<String>,
    pub stripe_version: Option<String>,
    /// The form body, decoded (`line_items[0][price]` → value).
    pub form: Vec<(String, String)>,
}

impl Recorded {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A keyed request's form, and the status and body it was answered.
type FirstAnswer = (Vec<(String, String)>, u16, Value);

#[derive(Default)]
struct MockState {
    requests: Vec<Recorded>,
    customers: std::collections::HashMap<String, String>,
    subscriptions: std::collections::HashMap<String, Value>,
    /// Idempotency key → the first request's form and answer.
    idempotent: std::collections::HashMap<String, FirstAnswer>,
    down: bool,
}

/// A local HTTP server standing in for Stripe's API: answers with Stripe's
/// own example objects and records every request.
pub struct StripeMock {
    pub url: String,
    state: std::sync::Arc<std::sync::Mutex<MockState>>,
    handle: actix_web::dev::ServerHandle,
}

impl StripeMock {
    pub async fn start() -> std::io::Result<Self> {
        use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
        let state = std::sync::Arc::new(std::sync::Mutex::new(MockState::default()));
        let shared = std::sync::Arc::clone(&state);
        let server = HttpServer::new(move || {
            let state = std::sync::Arc::clone(&shared);
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let state = std::sync::Arc::clone(&state);
                async move {
                    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let form = form_urlencoded(&body);
                    let recorded = Recorded {
                        method: req.method().to_string(),
                        path: req.path().to_owned(),
                        idempotency_key: header("idempotency-key"),
                        authorization: header("authorization"),
                        traceparent: header("traceparent"),
                        stripe_version: header("stripe-version"),
                        form,
                    };
                    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                    state.requests.push(recorded.clone());
                    if state.down {
                        return HttpResponse::ServiceUnavailable()
                            .json(json!({ "error": { "type": "api_error", "message": "down" } }));
                    }
                    let n = state.requests.len();
                    // Stripe's idempotency: a POST with a key seen before replays
                    // its first answer, or is refused if its parameters differ.
                    let key = recorded.idempotency_key.clone().filter(|_| recorded.method == "POST");
                    if let Some((form, status, body)) = key.as_ref().and_then(|k| state.idempotent.get(k)) {
                        if *form != recorded.form {
                            return HttpResponse::BadRequest().json(json!({ "error": {
                                "type": "idempotency_error",
                                "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."
                            } }));
                        }
                        return HttpResponse::build(actix_web::http::StatusCode::from_u16(*status).unwrap_or_default())
                            .insert_header(("idempotent-replayed", "true"))
                            .json(body);
                    }
                    let (status, body): (u16, Value) = match (recorded.method.as_str(), recorded.path.as_str()) {
                        ("POST", "/v1/customers") => {
                            let key = recorded.idempotency_key.clone().unwrap_or_else(|| format!("k{n}"));
                            let id = state.customers.entry(key).or_insert_with(|| format!("cus_mock_{n}")).clone();
                            let mut customer = object("customer");
                            customer["id"] = json!(id);
                            customer["metadata"] = json!({ "tenant_id": recorded.field("metadata[tenant_id]") });
                            (200, customer)
                        }
                        ("POST", "/v1/checkout/sessions") => {
                            let mut session = object("checkout.session");
                            session["id"] = json!(format!("cs_mock_{n}"));
                            session["mode"] = json!("subscription");
                            session["url"] = json!(format!("https://checkout.stripe.test/c/pay/cs_mock_{n}"));
                            session["customer"] = json!(recorded.field("customer"));
                            session["client_reference_id"] = json!(recorded.field("client_reference_id"));
                            (200, session)
                        }
                        ("POST", "/v1/billing_portal/sessions") => {
                            let mut session = object("billing_portal.session");
                            session["id"] = json!(format!("bps_mock_{n}"));
                            session["customer"] = json!(recorded.field("customer"));
                            session["url"] = json!(format!("https://billing.stripe.test/p/session/bps_mock_{n}"));
                            (200, session)
                        }
                        ("GET", "/v1/subscriptions") => {
                            let customer = req
                                .query_string()
                                .split('&')
                                .find_map(|p| p.strip_prefix("customer="))
                                .unwrap_or_default()
                                .to_owned();
                            let data: Vec<Value> =
                                state.subscriptions.values().filter(|s| s["customer"] == customer).cloned().collect();
                            (200,
                                json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/subscriptions" }),
                            )
                        }
                        ("GET", path) if path.starts_with("/v1/subscriptions/") => {
                            match state.subscriptions.get(&path["/v1/subscriptions/".len()..]) {
                                Some(sub) => (200, sub.clone()),
                                None => (404,
                                    json!({ "error": { "type": "invalid_request_error", "message": "no such subscription" } }),
                                ),
                            }
                        }
                        _ => (404, json!({ "error": { "type": "invalid_request_error", "message": "no such route" } })),
                    };
                    if let Some(key) = key {
                        state.idempotent.insert(key, (recorded.form.clone(), status, body.clone()));
                    }
                    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default()).json(body)
                }
            }))
        })
        .workers(1)
        .bind("127.0.0.1:0")?;
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Ok(Self { url: format!("http://127.0.0.1:{port}"), state, handle })
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).requests.clone()
    }

    /// What `GET /v1/subscriptions/{id}` answers from now on.
    pub fn set_subscription(&self, sub: Value) {
        let id = sub["id"].as_str().unwrap_or_default().to_owned();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).subscriptions.insert(id, sub);
    }

    /// Answer every request with 503 (or normally again).
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).down = down;
    }
}

impl Drop for StripeMock {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

fn form_urlencoded(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}
