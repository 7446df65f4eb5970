//! Calls to Stripe's API (async-stripe), and the routes that make them:
//! `POST /v1/billing/checkout` {plan}, `POST /v1/billing/portal`,
//! `GET /v1/billing/subscription` (owners).
//!
//! - Each call has a 5 s budget per attempt. Idempotent calls (creating the
//!   tenant's customer, keyed by tenant) are tried up to 3 times with
//!   backoff; the others once.
//! - A circuit breaker: after 5 consecutive failures, calls fail at once
//!   with 503 `unavailable` for 30 s, then one call may try again. A Stripe
//!   outage does not tie up the server's workers.
//! - Without `PLINTH_STRIPE_SECRET_KEY`: 503 `billing_not_configured`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, post, web};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::RunQueryDsl;
use plinth_access::Access;
use plinth_access::{Allowed, requirements};
use plinth_http::idempotency::{self, IdempotencyKey, Keyed};
use plinth_http::openapi::{ErrorEnvelope, IdempotencyKeyHeader, KeyReuse, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_tenants::{Db, Tenant, TenantId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{CreateCheckoutSession, CreateCheckoutSessionLineItems};
use stripe_client_core::{RequestStrategy, StripeRequest};
use stripe_core::customer::CreateCustomer;
use utoipa::ToSchema;

use crate::client::{Client, StripeError};
use crate::config::StripeConfig;
use crate::error::BillingError;
use crate::schema::{billing_customers, subscriptions};

requirements! {
    /// Billing is the owners' business, on every plan.
    ManageBilling = "billing", Manage, feature: none;
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(checkout).service(portal).service(subscription);
}

const FAILURES_TO_OPEN: u32 = 5;
const OPEN_FOR: Duration = Duration::from_secs(30);

/// Stripe's API, behind a circuit breaker. Registered as app data when
/// Stripe is configured.
pub struct Stripe {
    client: Client,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    public_url: String,
}

impl Stripe {
    /// `None` without a secret key.
    pub fn new(config: &StripeConfig, public_url: &str) -> anyhow::Result<Option<Self>> {
        let Some(key) = &config.secret_key else { return Ok(None) };
        let client = Client::new(key.expose(), &config.api_base, Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!("configuring the Stripe client: {e}"))?;
        Ok(Some(Self {
            client,
            failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
            public_url: public_url.trim_end_matches('/').to_owned(),
        }))
    }

    fn admit(&self) -> Result<(), BillingError> {
        let mut open = self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        match *open {
            Some(until) if Instant::now() < until => Err(BillingError::StripePaused),
            Some(_) => {
                // Half open: this call may try; the next failure reopens.
                *open = None;
                self.failures.store(FAILURES_TO_OPEN - 1, Ordering::SeqCst);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record<T>(&self, result: Result<T, StripeError>, what: &'static str) -> Result<T, BillingError> {
        match result {
            Ok(value) => {
                self.failures.store(0, Ordering::SeqCst);
                Ok(value)
            }
            Err(StripeError::Api { status, error })
                if status == 409 || error.type_ == stripe_shared::ApiErrorsType::IdempotencyError =>
            {
                self.failures.store(0, Ordering::SeqCst);
                Err(BillingError::StripeIdempotency { status })
            }
            // Stripe answered and refused (4xx): our request, not an outage.
            Err(StripeError::Api { status, error }) if status < 500 => {
                self.failures.store(0, Ordering::SeqCst);
                Err(BillingError::StripeRefused { what, status, message: format!("{:?}", error.message) })
            }
            Err(err) => {
                if self.failures.fetch_add(1, Ordering::SeqCst) + 1 >= FAILURES_TO_OPEN {
                    *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + OPEN_FOR);
                    tracing::warn!("Stripe failed {FAILURES_TO_OPEN} times in a row; pausing calls for 30 s");
                }
                Err(BillingError::StripeFailed { what, source: err })
            }
        }
    }

    /// The subscription as Stripe has it now (retried with backoff: a read).
    pub async fn subscription(&self, id: &str) -> Result<stripe_shared::Subscription, BillingError> {
        self.admit()?;
        let read = stripe_billing::subscription::RetrieveSubscription::new(id)
            .customize()
            .request_strategy(RequestStrategy::ExponentialBackoff(3))
            .send(&self.client)
            .await;
        self.record(read, "reading a subscription")
    }

    /// Every subscription of a customer, newest first (up to 100).
    pub async fn subscriptions_of(&self, customer: &str) -> Result<Vec<stripe_shared::Subscription>, BillingError> {
        self.admit()?;
        let list = stripe_billing::subscription::ListSubscription::new()
            .customer(customer)
            .status(stripe_billing::subscription::ListSubscriptionStatus::All)
            .limit(100)
            .customize()
            .request_strategy(RequestStrategy::ExponentialBackoff(3))
            .send(&self.client)
            .await;
        let mut subs = self.record(list, "listing subscriptions")?.data;
        subs.sort_by_key(|s| std::cmp::Reverse(s.created));
        Ok(subs)
    }

    /// The tenant's Stripe customer, created on first need with the tenant
    /// id in its metadata. The idempotency key is the tenant's, so two
    /// concurrent first requests get the same customer from Stripe.
    pub async fn customer(&self, db: &Db, tenant: TenantId, name: &str) -> Result<String, BillingError> {
        if let Some(id) = customer_of(db, tenant).await? {
            return Ok(id);
        }
        self.admit()?;
        let key = stripe_client_core::IdempotencyKey::new(format!("plinth-customer-{}", tenant.0))
            .map_err(|e| BillingError::Internal(format!("idempotency key: {e}")))?;
        let created = CreateCustomer::new()
            .name(name)
            .metadata([("tenant_id".to_owned(), tenant.0.to_string())])
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await;
        let customer = self.record(created, "creating a customer").map_err(|e| match e {
            // The key is Plinth's own, not a caller's: a 409 here is a
            // concurrent first checkout of the same tenant, not the caller's
            // idempotency_key_in_use.
            BillingError::StripeIdempotency { status } => BillingError::StripeRefused {
                what: "creating a customer",
                status,
                message: "Stripe refused the tenant's customer key".into(),
            },
            other => other,
        })?;
        let id = customer.id.as_str().to_owned();
        db.platform(async |c| {
            diesel::insert_into(billing_customers::table)
                .values((billing_customers::tenant_id.eq(tenant.0), billing_customers::customer_id.eq(&id)))
                .on_conflict_do_nothing()
                .execute(c)
                .await?;
            Ok::<_, BillingError>(())
        })
        .await?;
        // Whoever linked first wins; with the shared idempotency key it is
        // the same customer anyway.
        customer_of(db, tenant).await?.ok_or_else(|| BillingError::Internal("the customer link vanished".into()))
    }

    /// A Checkout session subscribing the tenant's customer (created on
    /// first need) to `price`; its URL. With `once` (a caller's
    /// `Idempotency-Key`), Stripe creates one session for it however often
    /// it is asked, and refuses it with other parameters.
    pub async fn checkout_session(
        &self,
        db: &Db,
        tenant: &Tenant,
        price: String,
        once: Option<&Keyed>,
    ) -> Result<String, BillingError> {
        let customer = self.customer(db, tenant.id, &tenant.name).await?;
        self.admit()?;
        let item = CreateCheckoutSessionLineItems { price: Some(price), quantity: Some(1), ..Default::default() };
        let strategy = match once {
            // Stripe's keys are per account and 255 characters at most: the
            // caller and their key, hashed.
            Some(keyed) => {
                let digest = Sha256::new()
                    .chain_update(keyed.caller().as_bytes())
                    .chain_update([0])
                    .chain_update(keyed.key().as_bytes())
                    .finalize();
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                let key = stripe_client_core::IdempotencyKey::new(format!("plinth-checkout-{hex}"))
                    .map_err(|e| BillingError::Internal(format!("idempotency key: {e}")))?;
                RequestStrategy::Idempotent(key)
            }
            None => RequestStrategy::Once,
        };
        let session = CreateCheckoutSession::new()
            .mode(stripe_shared::CheckoutSessionMode::Subscription)
            .customer(customer)
            .client_reference_id(tenant.id.to_string())
            .line_items(vec![item])
            .success_url(format!("{}/billing/success?session_id={{CHECKOUT_SESSION_ID}}", self.public_url))
            .cancel_url(format!("{}/billing/cancelled", self.public_url))
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await;
        let session = self.record(session, "creating a checkout session")?;
        session.url.ok_or_else(|| BillingError::Internal("Stripe returned no checkout URL".into()))
    }

    /// A Customer Portal session for the tenant's customer; its URL.
    pub async fn portal_session(&self, db: &Db, tenant: &Tenant) -> Result<String, BillingError> {
        let customer = self.customer(db, tenant.id, &tenant.name).await?;
        self.admit()?;
        let session = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(format!("{}/billing", self.public_url))
            .send(&self.client)
            .await;
        Ok(self.record(session, "creating a portal session")?.url)
    }
}

async fn customer_of(db: &Db, tenant: TenantId) -> Result<Option<String>, BillingError> {
    db.platform(async |c| {
        let found =
            billing_customers::table.find(tenant.0).select(billing_customers::customer_id).first(c).await.optional()?;
        Ok::<_, BillingError>(found)
    })
    .await
}

fn stripe(data: Option<web::Data<Stripe>>) -> Result<web::Data<Stripe>, ApiError> {
    data.ok_or(ApiError::BillingNotConfigured)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    /// A plan of the catalog that has a Stripe price.
    plan: String,
}

/// A Stripe page to send the owner to.
#[derive(Serialize, ToSchema)]
struct Redirect {
    /// An https URL on stripe.com.
    url: String,
}

/// `POST /v1/billing/checkout` {plan} → {url}: a Checkout Session in
/// subscription mode for the plan's price, for the tenant's customer.
#[utoipa::path(
    operation_id = "billing_checkout",
    tag = "billing",
    summary = "A Stripe Checkout page that subscribes the organization to a paid plan (owners)",
    params(TenantHeader, IdempotencyKeyHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = CheckoutBody,
    responses(
        (status = 200, body = Redirect),
        (status = 400, description = "Error: invalid_request (not a plan with a price).", body = ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured (this server has no Stripe key), unavailable (Stripe or the database is failing).", body = ErrorEnvelope),
        KeyReuse,
    ),
)]
#[post("/v1/billing/checkout")]
async fn checkout(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    api: Option<web::Data<Stripe>>,
    body: Json<CheckoutBody>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let digest = body.digest();
    let plan = access.catalog().get(&body.0.plan);
    let Some(price) = plan.and_then(|p| p.stripe_price.clone()) else {
        let paid: Vec<_> =
            access.catalog().plans().iter().filter(|p| p.stripe_price.is_some()).map(|p| p.name.as_str()).collect();
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "plan",
            "invalid",
            format!("must be a plan with a price: {}", paid.join(", ")),
        )]));
    };
    let keyed = key.keyed(ctx.principal.idempotency_caller(), digest)?;
    let keyed = keyed.as_ref();
    // No transaction is held across the call to Stripe: Stripe's own key
    // makes the session once; the answer is then recorded under the
    // caller's key, and a concurrent twin that loses the claim replays it.
    idempotency::once(&db, keyed, async || {
        let url = api.checkout_session(&db, &ctx.tenant, price, keyed).await?;
        let json = db
            .platform(async |c| {
                idempotency::claim(c, keyed).await?;
                idempotency::record(c, keyed, StatusCode::OK, &Redirect { url }).await
            })
            .await?;
        Ok(idempotency::answer(StatusCode::OK, json))
    })
    .await
}

/// `POST /v1/billing/portal` → {url}: the Customer Portal for the tenant's
/// customer.
#[utoipa::path(
    operation_id = "billing_portal",
    tag = "billing",
    summary = "A Stripe Customer Portal page for the organization's subscription and invoices (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Redirect), (status = 503, description = "Error: billing_not_configured (this server has no Stripe key), unavailable (Stripe or the database is failing).", body = ErrorEnvelope)),
)]
#[post("/v1/billing/portal")]
async fn portal(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    api: Option<web::Data<Stripe>>,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let url = api.portal_session(&db, &ctx.tenant).await?;
    Ok(HttpResponse::Ok().json(Redirect { url }))
}

#[derive(Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = subscriptions)]
struct SubscriptionView {
    id: String,
    status: String,
    plan: Option<String>,
    trial_end: Option<chrono::DateTime<chrono::Utc>>,
    current_period_end: Option<chrono::DateTime<chrono::Utc>>,
    cancel_at_period_end: bool,
}

/// The tenant's plan and its newest subscription.
#[derive(Serialize, ToSchema)]
struct Billing {
    plan: String,
    /// Stripe's status of the subscription (`active`, `past_due`, ...); null without one.
    status: Option<String>,
    trial_end: Option<chrono::DateTime<chrono::Utc>>,
    current_period_end: Option<chrono::DateTime<chrono::Utc>>,
    cancel_at_period_end: bool,
    /// Stripe's subscription id.
    subscription: Option<String>,
}

/// `GET /v1/billing/subscription`: the tenant's plan and its newest
/// subscription as Stripe last reported it.
#[utoipa::path(
    operation_id = "billing_subscription",
    tag = "billing",
    summary = "The organization's plan and its subscription as Stripe last reported it (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Billing)),
)]
#[get("/v1/billing/subscription")]
async fn subscription(ctx: Allowed<ManageBilling>, db: web::Data<Db>) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id;
    let rows: Vec<SubscriptionView> = db
        .platform(async |c| {
            let rows = subscriptions::table
                .filter(subscriptions::tenant_id.eq(tenant.0))
                .order(subscriptions::last_event_at.desc())
                .limit(1)
                .select(SubscriptionView::as_select())
                .load(c)
                .await?;
            Ok::<_, ApiError>(rows)
        })
        .await?;
    let sub = rows.into_iter().next();
    Ok(HttpResponse::Ok().json(Billing {
        plan: ctx.plan().name.clone(),
        status: sub.as_ref().map(|s| s.status.clone()),
        trial_end: sub.as_ref().and_then(|s| s.trial_end),
        current_period_end: sub.as_ref().and_then(|s| s.current_period_end),
        cancel_at_period_end: sub.as_ref().is_some_and(|s| s.cancel_at_period_end),
        subscription: sub.map(|s| s.id),
    }))
}
