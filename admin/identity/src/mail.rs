//! The mail identity flows send: email verification, invitations and
//! password resets. Each constructor fixes the data its template needs; the
//! message is queued with `plinth_mail::queue` in the transaction of
//! the change that causes it.

use plinth_mail::mail_template;
use plinth_mail::{EmailAddress, Mail, Template};
use plinth_tenants::TenantId;
use serde_json::json;

/// The templates of this crate, to register with `mail::Templates`.
pub const TEMPLATES: &[Template] = &[
    mail_template!("verify_email"),
    mail_template!("invitation"),
    mail_template!("password_reset"),
    mail_template!("change_email"),
    mail_template!("email_changed"),
    mail_template!("personal_export"),
    mail_template!("domain_proof"),
];

/// "Confirm your email address", with a link carrying `token`.
pub fn verify_email(to: EmailAddress, tenant: Option<TenantId>, organization: &str, token: &str, key: String) -> Mail {
    Mail {
        to,
        template: "verify_email",
        data: json!({ "organization": organization, "token": token, "valid_hours": 48 }),
        idempotency_key: key,
        tenant,
    }
}

/// An invitation to join `organization` with `role`.
pub fn invitation(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    inviter: &str,
    role: &str,
    token: &str,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "invitation",
        data: json!({ "organization": organization, "inviter": inviter, "role": role, "token": token, "valid_days": 7 }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}

/// A single-use password reset link valid for `valid_minutes`.
pub fn password_reset(to: EmailAddress, token: &str, valid_minutes: u32, key: String) -> Mail {
    Mail {
        to,
        template: "password_reset",
        data: json!({ "token": token, "valid_minutes": valid_minutes }),
        idempotency_key: key,
        tenant: None,
    }
}

/// "Confirm your new address", sent to the new address.
pub fn change_email(to: EmailAddress, token: &str, key: String) -> Mail {
    Mail {
        to,
        template: "change_email",
        data: json!({ "token": token, "valid_hours": 24 }),
        idempotency_key: key,
        tenant: None,
    }
}

/// "Your address was changed", sent to the old address.
pub fn email_changed(to: EmailAddress, new: &str, key: String) -> Mail {
    Mail { to, template: "email_changed", data: json!({ "new_email": new }), idempotency_key: key, tenant: None }
}

/// "Your data is ready", with the download link.
pub fn personal_export(to: EmailAddress, export: uuid::Uuid, token: &str, valid_hours: i64) -> Mail {
    Mail {
        to,
        template: "personal_export",
        data: json!({ "export_id": export, "token": token, "valid_hours": valid_hours }),
        idempotency_key: format!("personal_export:{export}"),
        tenant: None,
    }
}

/// "Prove that `organization` owns `domain`", to an administrative address
/// at the domain.
pub fn domain_proof(
    to: EmailAddress,
    tenant: TenantId,
    organization: &str,
    domain: &str,
    token: &str,
    key: String,
) -> Mail {
    Mail {
        to,
        template: "domain_proof",
        data: json!({ "organization": organization, "domain": domain, "token": token, "valid_hours": 48 }),
        idempotency_key: key,
        tenant: Some(tenant),
    }
}
