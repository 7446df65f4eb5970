//! The answer when no route matched: 405 `method_not_allowed` with an
//! `Allow` header naming the methods the path does take, or 404. actix
//! keeps no table of its routes by method, so the table comes from the
//! OpenAPI document, which holds every registered route ([`crate::api`]).

use actix_web::dev::ResourceDef;
use actix_web::{HttpRequest, HttpResponse, ResponseError as _, web};
use plinth_http::ApiError;
use utoipa::openapi::OpenApi;

/// (method, pattern) of every route (app data).
pub struct RouteTable(Vec<(&'static str, ResourceDef)>);

impl RouteTable {
    pub fn new(doc: &OpenApi) -> Self {
        let mut routes = Vec::new();
        for (path, item) in doc.paths.paths.iter() {
            let methods = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ];
            for (method, operation) in methods {
                if operation.is_some() {
                    routes.push((method, ResourceDef::new(path.as_str())));
                }
            }
        }
        Self(routes)
    }

    /// The methods some route takes on `path` (empty: no route has this path).
    pub fn allowed_methods(&self, path: &str) -> Vec<&'static str> {
        let mut methods: Vec<&'static str> =
            self.0.iter().filter(|(_, def)| def.is_match(path)).map(|(method, _)| *method).collect();
        methods.dedup();
        methods
    }
}

/// No route matched. A path that some route serves with another method is
/// 405 with `Allow`; anything else is 404.
pub(crate) async fn not_found(req: HttpRequest, routes: web::Data<RouteTable>) -> Result<HttpResponse, ApiError> {
    let allowed = routes.allowed_methods(req.path());
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
        let routes = RouteTable::new(&crate::api::document());
        assert_eq!(routes.allowed_methods("/v1/projects/abc"), ["GET", "PATCH", "DELETE"]);
        assert_eq!(routes.allowed_methods("/v1/auth/login"), ["POST"]);
        assert!(routes.allowed_methods("/v1/nothing").is_empty());
        assert!(routes.allowed_methods("/v1/projects/abc/nothing").is_empty());
    }
}
