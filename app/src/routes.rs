//! Every route Plinth serves, by method and pattern, for the answer to a
//! wrong method: 405 `method_not_allowed` with an `Allow` header naming the
//! methods the path does take. actix registers routes one method at a time
//! and keeps no table of them, so this one is written down beside the
//! crates' `configure` functions; `tests/security.rs` checks each entry is
//! served and that every other method on its path is 405.

use std::sync::LazyLock;

use actix_web::dev::ResourceDef;
use actix_web::{HttpRequest, HttpResponse, ResponseError as _};
use plinth_http::ApiError;

/// (method, pattern) of every route.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
    ("POST", "/v1/signup"),
    ("POST", "/v1/tenants"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/logout"),
    ("POST", "/v1/auth/verify-email"),
    ("POST", "/v1/auth/password-reset"),
    ("POST", "/v1/auth/password-reset/confirm"),
    ("POST", "/v1/auth/totp/enroll"),
    ("POST", "/v1/auth/totp/confirm"),
    ("POST", "/v1/auth/totp/disable"),
    ("GET", "/v1/me"),
    ("GET", "/v1/tenant"),
    ("GET", "/v1/members"),
    ("PATCH", "/v1/members/{user_id}"),
    ("DELETE", "/v1/members/{user_id}"),
    ("POST", "/v1/invitations"),
    ("POST", "/v1/invitations/accept"),
    ("GET", "/v1/api-keys"),
    ("POST", "/v1/api-keys"),
    ("DELETE", "/v1/api-keys/{id}"),
    ("GET", "/v1/audit-log"),
    ("GET", "/v1/export"),
    ("GET", "/v1/projects"),
    ("POST", "/v1/projects"),
    ("GET", "/v1/projects/{id}"),
    ("PATCH", "/v1/projects/{id}"),
    ("DELETE", "/v1/projects/{id}"),
    ("GET", "/v1/projects/{id}/tasks"),
    ("POST", "/v1/projects/{id}/tasks"),
    ("PATCH", "/v1/tasks/{id}"),
    ("DELETE", "/v1/tasks/{id}"),
    ("POST", "/v1/webhooks/stripe"),
    ("POST", "/v1/billing/checkout"),
    ("POST", "/v1/billing/portal"),
    ("GET", "/v1/billing/subscription"),
    ("GET", "/v1/admin/tenants"),
    ("GET", "/v1/admin/tenants/{id}"),
    ("DELETE", "/v1/admin/tenants/{id}"),
    ("POST", "/v1/admin/tenants/{id}/suspend"),
    ("POST", "/v1/admin/tenants/{id}/reactivate"),
    ("PUT", "/v1/admin/tenants/{id}/plan"),
];

static DEFS: LazyLock<Vec<(&'static str, ResourceDef)>> =
    LazyLock::new(|| ROUTES.iter().map(|(method, pattern)| (*method, ResourceDef::new(*pattern))).collect());

/// The methods some route takes on `path` (empty: no route has this path).
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let mut methods: Vec<&'static str> =
        DEFS.iter().filter(|(_, def)| def.is_match(path)).map(|(method, _)| *method).collect();
    methods.dedup();
    methods
}

/// No route matched. A path that some route serves with another method is
/// 405 with `Allow`; anything else is 404.
pub(crate) async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let allowed = allowed_methods(req.path());
    if allowed.is_empty() {
        return Err(ApiError::NotFound("route"));
    }
    let mut res = ApiError::MethodNotAllowed.error_response();
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&allowed.join(", ")) {
        res.headers_mut().insert(actix_web::http::header::ALLOW, value);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_by_path() {
        assert_eq!(allowed_methods("/v1/projects/abc"), ["GET", "PATCH", "DELETE"]);
        assert_eq!(allowed_methods("/v1/auth/login"), ["POST"]);
        assert!(allowed_methods("/v1/nothing").is_empty());
        assert!(allowed_methods("/v1/projects/abc/nothing").is_empty());
    }
}
