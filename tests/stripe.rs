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
    event["livemode"] = json!(false);
    // The version Plinth is pinned to (async-stripe's).
    event["api_version"] = json!(API_VERSION);
    event
}

/// The Stripe API version Plinth's requests name and its endpoints should use.
pub const API_VERSION: &str = "2026-09-30.endive";

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
    sub["cancel_at"] = Value::Null;
    sub["pause_collection"] = Value::Null;
    sub["metadata"] = json!({});
    sub["items"]["data"][0]["price"]["id"] = json!(price);
    sub["items"]["data"][0]["id"] = json!(format!("si_{id}"));
    sub["items"]["data"][0]["subscription"] = json!(id);
    // Not in a trial (the example's is long over, and would be shown).
    sub["trial_end"] = Value::Null;
    sub["trial_start"] = Value::Null;
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

/// Stripe's example entitlement summary: `customer`'s active entitlements
/// are the features with these lookup keys.
pub fn entitlement_summary(customer: &str, keys: &[&str]) -> Value {
    let mut summary = object("entitlements.active_entitlement_summary");
    summary["customer"] = json!(customer);
    summary["livemode"] = json!(false);
    let example = summary["entitlements"]["data"][0].clone();
    let data: Vec<Value> = keys
        .iter()
        .map(|key| {
            let mut e = example.clone();
            e["lookup_key"] = json!(key);
            e["feature"]["lookup_key"] = json!(key);
            e
        })
        .collect();
    summary["entitlements"]["data"] = json!(data);
    summary["entitlements"]["has_more"] = json!(false);
    summary
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

/// An error answer to give the next `times` requests to a path.
struct Failure {
    method: String,
    path_prefix: String,
    status: u16,
    times: usize,
}

#[derive(Default)]
struct MockState {
    requests: Vec<Recorded>,
    /// Idempotency key of a customer creation → the customer's id.
    customer_keys: std::collections::HashMap<String, String>,
    customers: std::collections::HashMap<String, Value>,
    subscriptions: std::collections::HashMap<String, Value>,
    invoices: std::collections::HashMap<String, Value>,
    schedules: std::collections::HashMap<String, Value>,
    /// Customer → the lookup keys of its active entitlements.
    entitlements: std::collections::HashMap<String, Vec<String>>,
    /// Meter events accepted, the first of each identifier.
    meter_events: Vec<Value>,
    /// Price id → unit amount in cents (for invoice previews).
    prices: std::collections::HashMap<String, i64>,
    /// Idempotency key → the first request's form and answer.
    idempotent: std::collections::HashMap<String, FirstAnswer>,
    /// Keys whose first request is still being answered.
    in_flight: std::collections::HashSet<String>,
    failures: Vec<Failure>,
    delay: std::time::Duration,
    /// Path → how long its answer, computed when the request arrives, takes
    /// to be sent: a slow read of a state that changes meanwhile.
    slow_answers: std::collections::HashMap<String, std::time::Duration>,
    down: bool,
}

fn stripe_error(kind: &str, code: Option<&str>, message: &str, param: Option<&str>) -> Value {
    json!({ "error": { "type": kind, "code": code, "message": message, "param": param } })
}

/// The answer Stripe gives `status` for a failure injected by a test, in
/// Stripe's own words.
fn failure_body(status: u16, path: &str) -> Value {
    match status {
        400 => stripe_error("invalid_request_error", Some("parameter_invalid"), "Invalid request", None),
        401 => stripe_error("invalid_request_error", None, "Invalid API Key provided: sk_test_****", None),
        403 => {
            stripe_error("invalid_request_error", None, "The provided key does not have access to this resource", None)
        }
        404 => stripe_error(
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such resource: '{}'", path.rsplit('/').next().unwrap_or_default()),
            Some("id"),
        ),
        409 => stripe_error(
            "idempotency_error",
            Some("idempotency_key_in_use"),
            "There is currently another in-progress request using this Idempotent Key. Please try again later.",
            None,
        ),
        429 => stripe_error(
            "invalid_request_error",
            Some("rate_limit"),
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
            None,
        ),
        _ => stripe_error("api_error", None, "An unknown error occurred", None),
    }
}

/// A local HTTP server standing in for Stripe's API: answers with Stripe's
/// own example objects, keeps customers and subscriptions as Stripe would,
/// honours idempotency keys as Stripe does (a repeat replays the first
/// answer; other parameters are 400 `idempotency_error`; a repeat while the
/// first is in flight is 409 `idempotency_key_in_use`), and can answer 404,
/// 401, 403, 429 and 503 on demand. Records every request.
pub struct StripeMock {
    pub url: String,
    state: std::sync::Arc<std::sync::Mutex<MockState>>,
    handle: actix_web::dev::ServerHandle,
}

fn answer(state: &mut MockState, recorded: &Recorded, query: &str, n: usize) -> (u16, Value) {
    let param = |name: &str| -> Option<String> {
        form_urlencoded(query.as_bytes()).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    };
    let missing_customer = |state: &MockState, id: Option<&str>| -> Option<(u16, Value)> {
        let id = id.unwrap_or_default();
        let live = state.customers.get(id).is_some_and(|c| c["deleted"] != true);
        (!live).then(|| {
            (
                400,
                stripe_error(
                    "invalid_request_error",
                    Some("resource_missing"),
                    &format!("No such customer: '{id}'"),
                    Some("customer"),
                ),
            )
        })
    };
    let path = recorded.path.as_str();
    match (recorded.method.as_str(), path) {
        ("POST", "/v1/customers") => {
            let key = recorded.idempotency_key.clone().unwrap_or_else(|| format!("k{n}"));
            let id = state.customer_keys.entry(key).or_insert_with(|| format!("cus_mock_{n}")).clone();
            let mut customer = object("customer");
            customer["id"] = json!(id);
            customer["name"] = json!(recorded.field("name"));
            customer["metadata"] = json!({ "tenant_id": recorded.field("metadata[tenant_id]") });
            state.customers.insert(id, customer.clone());
            (200, customer)
        }
        ("GET", "/v1/customers/search") => {
            // `metadata['tenant_id']:'<id>'`, the one query Plinth makes.
            let query = param("query").unwrap_or_default();
            let wanted = query.split('\'').nth(3).unwrap_or_default().to_owned();
            let data: Vec<Value> = state
                .customers
                .values()
                .filter(|c| c["deleted"] != true && c["metadata"]["tenant_id"] == wanted.as_str())
                .cloned()
                .collect();
            (200, json!({ "object": "search_result", "data": data, "has_more": false, "url": "/v1/customers/search" }))
        }
        ("GET", p) if p.starts_with("/v1/customers/") => match state.customers.get(&p["/v1/customers/".len()..]) {
            Some(c) if c["deleted"] == true => (200, json!({ "id": c["id"], "object": "customer", "deleted": true })),
            Some(c) => (200, c.clone()),
            None => (404, failure_body(404, p)),
        },
        ("POST", "/v1/checkout/sessions") => {
            if let Some(missing) = missing_customer(state, recorded.field("customer")) {
                return missing;
            }
            let mut session = object("checkout.session");
            session["id"] = json!(format!("cs_mock_{n}"));
            session["mode"] = json!("subscription");
            session["url"] = json!(format!("https://checkout.stripe.test/c/pay/cs_mock_{n}"));
            session["customer"] = json!(recorded.field("customer"));
            session["client_reference_id"] = json!(recorded.field("client_reference_id"));
            (200, session)
        }
        ("POST", "/v1/billing_portal/sessions") => {
            if let Some(missing) = missing_customer(state, recorded.field("customer")) {
                return missing;
            }
            let mut session = object("billing_portal.session");
            session["id"] = json!(format!("bps_mock_{n}"));
            session["customer"] = json!(recorded.field("customer"));
            session["url"] = json!(format!("https://billing.stripe.test/p/session/bps_mock_{n}"));
            (200, session)
        }
        ("GET", "/v1/subscriptions") => {
            let customer = param("customer").unwrap_or_default();
            let data: Vec<Value> =
                state.subscriptions.values().filter(|s| s["customer"] == customer.as_str()).cloned().collect();
            (200, json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/subscriptions" }))
        }
        ("GET", p) if p.starts_with("/v1/subscriptions/") => {
            match state.subscriptions.get(&p["/v1/subscriptions/".len()..]) {
                Some(sub) => (200, sub.clone()),
                None => (404, failure_body(404, p)),
            }
        }
        ("DELETE", p) if p.starts_with("/v1/subscriptions/") => {
            match state.subscriptions.get_mut(&p["/v1/subscriptions/".len()..]) {
                Some(sub) => {
                    sub["status"] = json!("canceled");
                    sub["canceled_at"] = json!(now());
                    (200, sub.clone())
                }
                None => (404, failure_body(404, p)),
            }
        }
        ("POST", p) if p.starts_with("/v1/subscription_items/") => {
            let id = &p["/v1/subscription_items/".len()..];
            let quantity = recorded.field("quantity").and_then(|q| q.parse::<u64>().ok());
            let item = state
                .subscriptions
                .values_mut()
                .find_map(|sub| sub["items"]["data"].as_array_mut()?.iter_mut().find(|item| item["id"] == id));
            match (item, quantity) {
                (Some(item), Some(quantity)) => {
                    item["quantity"] = json!(quantity);
                    (200, item.clone())
                }
                (Some(_), None) => (200, json!({ "id": id, "object": "subscription_item" })),
                (None, _) => (404, failure_body(404, p)),
            }
        }
        ("GET", "/v1/entitlements/active_entitlements") => {
            let customer = param("customer").unwrap_or_default();
            let data: Vec<Value> = state
                .entitlements
                .get(&customer)
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(n, key)| {
                    json!({ "object": "entitlements.active_entitlement", "id": format!("ent_mock_{n}"),
                        "livemode": false, "lookup_key": key,
                        "feature": { "object": "entitlements.feature", "id": format!("feat_mock_{n}"),
                            "active": true, "livemode": false, "lookup_key": key, "metadata": {}, "name": key } })
                })
                .collect();
            (
                200,
                json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/entitlements/active_entitlements" }),
            )
        }
        ("POST", "/v1/billing/meter_events") => {
            let identifier = recorded.field("identifier").unwrap_or_default().to_owned();
            if state.meter_events.iter().any(|e| e["identifier"] == identifier.as_str()) {
                let message = format!("An event already exists with identifier {identifier}.");
                return (400, stripe_error("invalid_request_error", Some("resource_already_exists"), &message, None));
            }
            let mut event = object("billing.meter_event");
            event["event_name"] = json!(recorded.field("event_name"));
            event["identifier"] = json!(identifier);
            event["payload"] = json!({
                "stripe_customer_id": recorded.field("payload[stripe_customer_id]"),
                "value": recorded.field("payload[value]"),
            });
            event["timestamp"] = json!(recorded.field("timestamp").and_then(|t| t.parse::<i64>().ok()));
            state.meter_events.push(event.clone());
            (200, event)
        }
        ("POST", "/v1/invoices/create_preview") => {
            let Some(sub) = recorded.field("subscription").and_then(|id| state.subscriptions.get(id)) else {
                return (404, failure_body(404, "/v1/subscriptions/none"));
            };
            let item_id = recorded.field("subscription_details[items][0][id]").unwrap_or_default();
            let items = sub["items"]["data"].as_array().cloned().unwrap_or_default();
            let Some(item) = items.iter().find(|i| i["id"] == item_id) else {
                return (400, stripe_error("invalid_request_error", Some("resource_missing"), "No such item", None));
            };
            let unit = |price: &str| state.prices.get(price).copied().unwrap_or(0);
            let old = unit(item["price"]["id"].as_str().unwrap_or_default()) * item["quantity"].as_i64().unwrap_or(1);
            let new_price = recorded.field("subscription_details[items][0][price]").unwrap_or_default();
            let quantity: i64 =
                recorded.field("subscription_details[items][0][quantity]").and_then(|q| q.parse().ok()).unwrap_or(1);
            let new = unit(new_price) * quantity;
            // The whole difference now (this stand-in does not prorate by
            // time), or the renewal at the new price.
            let due = match recorded.field("subscription_details[proration_behavior]") {
                Some("always_invoice") => (new - old).max(0),
                _ => new,
            };
            let mut preview = object("invoice");
            preview["id"] = json!(format!("upcoming_in_mock_{n}"));
            preview["status"] = json!("draft");
            preview["customer"] = sub["customer"].clone();
            preview["amount_due"] = json!(due);
            preview["currency"] = json!("usd");
            preview["period_end"] = item["current_period_end"].clone();
            preview["next_payment_attempt"] = item["current_period_end"].clone();
            (200, preview)
        }
        ("POST", p) if p.starts_with("/v1/subscriptions/") => {
            let id = &p["/v1/subscriptions/".len()..];
            let form = recorded.form.clone();
            let Some(sub) = state.subscriptions.get_mut(id) else { return (404, failure_body(404, p)) };
            if let Some(cancel) = recorded.field("cancel_at_period_end") {
                sub["cancel_at_period_end"] = json!(cancel == "true");
            }
            if let Some(item_id) = recorded.field("items[0][id]") {
                for item in sub["items"]["data"].as_array_mut().into_iter().flatten() {
                    if item["id"] == item_id {
                        for (key, value) in &form {
                            match key.as_str() {
                                "items[0][price]" => item["price"]["id"] = json!(value),
                                "items[0][quantity]" => item["quantity"] = json!(value.parse::<u64>().unwrap_or(1)),
                                _ => {}
                            }
                        }
                    }
                }
            }
            (200, sub.clone())
        }
        ("POST", "/v1/subscription_schedules") => {
            let id = recorded.field("from_subscription").unwrap_or_default().to_owned();
            let Some(sub) = state.subscriptions.get_mut(&id) else { return (404, failure_body(404, path)) };
            let item = sub["items"]["data"][0].clone();
            let schedule_id = format!("sub_sched_mock_{n}");
            sub["schedule"] = json!(schedule_id);
            let mut schedule = object("subscription_schedule");
            schedule["id"] = json!(schedule_id);
            schedule["subscription"] = json!(id);
            schedule["customer"] = sub["customer"].clone();
            schedule["status"] = json!("active");
            schedule["phases"][0]["start_date"] = item["current_period_start"].clone();
            schedule["phases"][0]["end_date"] = item["current_period_end"].clone();
            schedule["phases"][0]["items"][0]["price"] = item["price"]["id"].clone();
            schedule["phases"][0]["items"][0]["quantity"] = item["quantity"].clone();
            state.schedules.insert(schedule_id, schedule.clone());
            (200, schedule)
        }
        ("GET", p) if p.starts_with("/v1/subscription_schedules/") => {
            match state.schedules.get(&p["/v1/subscription_schedules/".len()..]) {
                Some(schedule) => (200, schedule.clone()),
                None => (404, failure_body(404, p)),
            }
        }
        ("POST", p) if p.starts_with("/v1/subscription_schedules/") => {
            let rest = &p["/v1/subscription_schedules/".len()..];
            let (id, release) = match rest.strip_suffix("/release") {
                Some(id) => (id, true),
                None => (rest, false),
            };
            let Some(schedule) = state.schedules.get_mut(id) else { return (404, failure_body(404, p)) };
            if release {
                schedule["status"] = json!("released");
                let sub = schedule["subscription"].as_str().unwrap_or_default().to_owned();
                if let Some(sub) = state.subscriptions.get_mut(&sub) {
                    sub["schedule"] = Value::Null;
                }
                return (200, state.schedules.get(id).cloned().unwrap_or_default());
            }
            // The phases as sent: `phases[i][field]` and `phases[i][items][0][field]`.
            let mut phases: Vec<Value> = Vec::new();
            for (key, value) in &recorded.form {
                let Some(rest) = key.strip_prefix("phases[") else { continue };
                let Some((index, field)) = rest.split_once(']') else { continue };
                let Ok(index) = index.parse::<usize>() else { continue };
                while phases.len() <= index {
                    phases.push(json!({ "items": [{}] }));
                }
                let value: Value = value.parse::<i64>().map(Value::from).unwrap_or_else(|_| json!(value));
                match field {
                    "[start_date]" => phases[index]["start_date"] = value,
                    "[end_date]" => phases[index]["end_date"] = value,
                    "[items][0][price]" => phases[index]["items"][0]["price"] = value,
                    "[items][0][quantity]" => phases[index]["items"][0]["quantity"] = value,
                    _ => {}
                }
            }
            schedule["phases"] = json!(phases);
            schedule["end_behavior"] = json!(recorded.field("end_behavior"));
            (200, schedule.clone())
        }
        ("GET", "/v1/invoices") => {
            let customer = param("customer").unwrap_or_default();
            let mut data: Vec<Value> =
                state.invoices.values().filter(|i| i["customer"] == customer.as_str()).cloned().collect();
            data.sort_by_key(|i| std::cmp::Reverse(i["created"].as_i64()));
            (200, json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/invoices" }))
        }
        ("GET", p) if p.starts_with("/v1/invoices/") => match state.invoices.get(&p["/v1/invoices/".len()..]) {
            Some(invoice) => (200, invoice.clone()),
            None => (404, failure_body(404, p)),
        },
        (_, p) => (404, stripe_error("invalid_request_error", None, &format!("Unrecognized request URL ({p})"), None)),
    }
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
                    let recorded = Recorded {
                        method: req.method().to_string(),
                        path: req.path().to_owned(),
                        idempotency_key: header("idempotency-key"),
                        authorization: header("authorization"),
                        traceparent: header("traceparent"),
                        stripe_version: header("stripe-version"),
                        form: form_urlencoded(&body),
                    };
                    let reply = |status: u16, body: &Value| {
                        HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default()).json(body)
                    };
                    let key = recorded.idempotency_key.clone().filter(|_| recorded.method != "GET");
                    let (n, delay) = {
                        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                        state.requests.push(recorded.clone());
                        if state.down {
                            return reply(503, &failure_body(503, &recorded.path));
                        }
                        let injected = state.failures.iter_mut().find(|f| {
                            f.times > 0 && f.method == recorded.method && recorded.path.starts_with(&f.path_prefix)
                        });
                        if let Some(failure) = injected {
                            failure.times -= 1;
                            let status = failure.status;
                            return reply(status, &failure_body(status, &recorded.path));
                        }
                        // Stripe's idempotency: a repeat of a key replays its
                        // first answer, or is refused if its parameters
                        // differ, or while the first is still in flight.
                        if let Some(key) = &key {
                            if state.in_flight.contains(key) {
                                return reply(409, &failure_body(409, &recorded.path));
                            }
                            if let Some((form, status, body)) = state.idempotent.get(key) {
                                if *form != recorded.form {
                                    return reply(400, &stripe_error(
                                        "idempotency_error",
                                        None,
                                        "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                                        None,
                                    ));
                                }
                                let mut res = HttpResponse::build(
                                    actix_web::http::StatusCode::from_u16(*status).unwrap_or_default(),
                                );
                                return res.insert_header(("idempotent-replayed", "true")).json(body);
                            }
                            state.in_flight.insert(key.clone());
                        }
                        (state.requests.len(), state.delay)
                    };
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let (status, body, slow) = {
                        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                        let (status, body) = answer(&mut state, &recorded, req.query_string(), n);
                        if let Some(key) = key {
                            state.in_flight.remove(&key);
                            state.idempotent.insert(key, (recorded.form.clone(), status, body.clone()));
                        }
                        (status, body, state.slow_answers.get(&recorded.path).copied())
                    };
                    if let Some(slow) = slow {
                        tokio::time::sleep(slow).await;
                    }
                    reply(status, &body)
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

    fn state(&self) -> std::sync::MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// What `GET /v1/subscriptions/{id}` answers from now on.
    pub fn set_subscription(&self, sub: Value) {
        let id = sub["id"].as_str().unwrap_or_default().to_owned();
        self.state().subscriptions.insert(id, sub);
    }

    /// The subscription as the stand-in has it now.
    pub fn subscription_now(&self, id: &str) -> Option<Value> {
        self.state().subscriptions.get(id).cloned()
    }

    /// What `GET /v1/invoices/{id}` answers from now on.
    pub fn set_invoice(&self, invoice: Value) {
        let id = invoice["id"].as_str().unwrap_or_default().to_owned();
        self.state().invoices.insert(id, invoice);
    }

    /// The unit amount (cents) of `price`, for invoice previews.
    pub fn set_price(&self, price: &str, unit_amount: i64) {
        self.state().prices.insert(price.to_owned(), unit_amount);
    }

    /// The active entitlements (their lookup keys) of `customer` from now on.
    pub fn set_entitlements(&self, customer: &str, keys: &[&str]) {
        self.state().entitlements.insert(customer.to_owned(), keys.iter().map(|k| (*k).to_owned()).collect());
    }

    /// The meter events accepted (one per identifier, as Stripe counts them).
    pub fn meter_events(&self) -> Vec<Value> {
        self.state().meter_events.clone()
    }

    /// The subscription schedule as the stand-in has it now.
    pub fn schedule_now(&self, id: &str) -> Option<Value> {
        self.state().schedules.get(id).cloned()
    }

    /// A customer Stripe has (made elsewhere: the Dashboard, Checkout, an
    /// earlier Plinth), with `metadata.tenant_id` when `tenant` is given.
    pub fn add_customer(&self, id: &str, tenant: Option<&str>) {
        let mut customer = object("customer");
        customer["id"] = json!(id);
        customer["metadata"] = tenant.map_or_else(|| json!({}), |t| json!({ "tenant_id": t }));
        self.state().customers.insert(id.to_owned(), customer);
    }

    /// Deletes a customer as the Dashboard does: its subscriptions are
    /// cancelled with it.
    pub fn delete_customer(&self, id: &str) {
        let mut state = self.state();
        if let Some(c) = state.customers.get_mut(id) {
            c["deleted"] = json!(true);
        }
        for sub in state.subscriptions.values_mut().filter(|s| s["customer"] == id) {
            sub["status"] = json!("canceled");
        }
    }

    /// Answers the next `times` `method` requests under `path_prefix` with
    /// Stripe's error for `status` (400, 401, 403, 404, 409, 429, 5xx).
    pub fn fail(&self, method: &str, path_prefix: &str, status: u16, times: usize) {
        self.state().failures.push(Failure { method: method.into(), path_prefix: path_prefix.into(), status, times });
    }

    /// Every answer takes this long (outside the lock: requests overlap).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.state().delay = delay;
    }

    /// Answers to `path` (exactly) are computed when the request arrives
    /// and sent `delay` later.
    pub fn slow_answers(&self, path: &str, delay: std::time::Duration) {
        self.state().slow_answers.insert(path.to_owned(), delay);
    }

    /// Answer every request with 503 (or normally again).
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
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
