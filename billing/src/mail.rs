//! The mail billing sends when a subscription changes state: a failed
//! payment (a renewal's, or a new subscription's first), a payment that
//! needs the customer to authenticate, a reminder before the grace ends,
//! a trial about to end, a cancelled subscription.

use plinth_mail::mail_template;
use plinth_mail::{EmailAddress, Mail, Template};
use plinth_tenants::TenantId;
use serde_json::json;

/// The templates of this crate, to register with `mail::Templates`.
pub const TEMPLATES: &[Template] = &[
    mail_template!("payment_failed"),
    mail_template!("first_payment_failed"),
    mail_template!("payment_action_required"),
    mail_template!("payment_reminder"),
    mail_template!("trial_ending"),
    mail_template!("subscription_cancelled"),
];

/// A renewal's payment failed; the plan holds until `grace_until` (a
/// date). `invoice_url` is Stripe's page for the invoice (may be empty).
pub fn payment_failed(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    grace_until: &str,
    invoice_url: &str,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "payment_failed",
        data: json!({ "organization": organization, "grace_until": grace_until, "invoice_url": invoice_url }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}

/// A new subscription's first payment failed: it has not started.
pub fn first_payment_failed(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    invoice_url: &str,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "first_payment_failed",
        data: json!({ "organization": organization, "invoice_url": invoice_url }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}

/// The bank asks the customer to confirm a payment on Stripe's invoice
/// page; for a running subscription, the plan holds until `grace_until`.
pub fn payment_action_required(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    invoice_url: &str,
    grace_until: Option<&str>,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "payment_action_required",
        data: json!({ "organization": organization, "invoice_url": invoice_url, "grace_until": grace_until }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}

/// A payment is still overdue; the grace ends on `grace_until` (a date),
/// and then the organization is restricted (read-only).
pub fn payment_reminder(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    grace_until: &str,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "payment_reminder",
        data: json!({ "organization": organization, "grace_until": grace_until }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}

/// The `plan` trial ends on `trial_end` (a date).
pub fn trial_ending(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    plan: &str,
    trial_end: &str,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "trial_ending",
        data: json!({ "organization": organization, "plan": plan, "trial_end": trial_end }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}

/// The `plan` subscription was cancelled; the tenant is on the free plan.
pub fn subscription_cancelled(to: EmailAddress, tenant: TenantId, organization: &str, plan: &str, key: String) -> Mail {
    Mail {
        to,
        template: "subscription_cancelled",
        data: json!({ "organization": organization, "plan": plan }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}
