//! Cross-origin access for the customers' web apps (`PLINTH_CORS_ORIGINS`).
//!
//! Only the origins listed may call the API from a browser; with none, no
//! cross-origin call is allowed (no CORS middleware runs, a preflight gets
//! 405). Credentials are bearer tokens sent in `Authorization`, never
//! cookies, so `Access-Control-Allow-Credentials` is not sent.

use actix_cors::Cors;
use actix_web::http::{Method, Uri, header};

/// The headers a browser may send cross-origin.
const ALLOWED_HEADERS: [header::HeaderName; 5] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::HeaderName::from_static("x-tenant"),
    header::HeaderName::from_static("x-request-id"),
    header::HeaderName::from_static(plinth_tenants::replicas::WAL_POSITION_HEADER),
];

/// The answer headers a browser lets the web app read.
const EXPOSED_HEADERS: [header::HeaderName; 5] = [
    header::HeaderName::from_static("x-request-id"),
    header::RETRY_AFTER,
    header::ALLOW,
    crate::request::IMPERSONATION_HEADER,
    header::HeaderName::from_static(plinth_tenants::replicas::WAL_POSITION_HEADER),
];

/// Parses `PLINTH_CORS_ORIGINS`: origins (`https://app.example.com`,
/// `http://localhost:3000`) separated by commas or spaces, each a scheme
/// (http or https) and a host with an optional port, nothing more. Returns
/// them as browsers send them (lowercase, no trailing slash).
pub fn parse_origins(list: &str) -> Result<Vec<String>, String> {
    let mut origins = Vec::new();
    for raw in list.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
        let uri: Uri = raw.parse().map_err(|_| format!("{raw:?} is not an origin"))?;
        let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
        let plain = uri.query().is_none() && matches!(uri.path(), "" | "/");
        match (scheme.as_deref(), uri.authority()) {
            (Some(scheme @ ("http" | "https")), Some(authority)) if plain && !authority.as_str().contains('@') => {
                origins.push(format!("{scheme}://{}", authority.as_str().to_ascii_lowercase()));
            }
            _ => {
                return Err(format!(
                    "{raw:?} is not an origin: give a scheme (http or https) and a host, with an optional port and nothing else"
                ));
            }
        }
    }
    Ok(origins)
}

/// The CORS middleware for `origins` (as [`parse_origins`] returns them).
pub fn cors(origins: &[String]) -> Cors {
    let methods = [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    origins
        .iter()
        .fold(Cors::default(), |cors, origin| cors.allowed_origin(origin))
        .allowed_methods(methods)
        .allowed_headers(ALLOWED_HEADERS)
        .expose_headers(EXPOSED_HEADERS)
        .max_age(600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_parsed_strictly() {
        assert_eq!(
            parse_origins("https://App.Example.com, http://localhost:3000/").as_deref(),
            Ok(&["https://app.example.com".to_owned(), "http://localhost:3000".to_owned()][..])
        );
        assert_eq!(parse_origins("  ").as_deref(), Ok(&[][..]));
        for bad in [
            "*",
            "app.example.com",
            "ftp://x.example",
            "https://x.example/app",
            "https://u@x.example",
            "https://x.example?q=1",
        ] {
            assert!(parse_origins(bad).is_err(), "{bad} was accepted");
        }
    }
}
