//! Talking to an organization's identity provider: the issuer a
//! connection may name, and Plinth's HTTP client for discovery, keys and
//! the token endpoint.

use std::time::Duration;

use openidconnect::core::{CoreClient, CoreProviderMetadata};
use openidconnect::{ClientId, ClientSecret, IssuerUrl, RedirectUrl};
use plinth_http::{ApiError, FieldError};

use super::Connection;

/// The most a provider's discovery, keys or token answer may take.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// The client of a provider, its endpoints as discovery found them.
pub(super) type Client = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// The issuer, checked: `https`, or `http` on a loopback address.
pub(super) fn issuer_url(issuer: &str) -> Result<IssuerUrl, ApiError> {
    let invalid = |why: &str| ApiError::invalid_fields(vec![FieldError::new("issuer", "invalid", why)]);
    let url = IssuerUrl::new(issuer.trim_end_matches('/').to_owned()).map_err(|_| invalid("must be a URL"))?;
    let parsed = url.url();
    let loopback = match parsed.host() {
        Some(openidconnect::url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(openidconnect::url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(openidconnect::url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(invalid("must be an https URL")),
    }
}

/// Plinth's HTTP client for a provider: no redirects followed (a provider
/// answering with one is an error, not a hop to wherever it points), a
/// time limit.
pub(super) async fn send(request: openidconnect::HttpRequest) -> Result<openidconnect::HttpResponse, ProviderError> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(PROVIDER_TIMEOUT)
        .build()
        .map_err(|e| ProviderError(format!("building the HTTP client: {e}")))?;
    let (parts, body) = request.into_parts();
    let answer = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| ProviderError(format!("asking the provider: {e}")))?;
    let mut response = openidconnect::http::Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    let body = answer.bytes().await.map_err(|e| ProviderError(format!("reading the provider's answer: {e}")))?;
    response.body(body.to_vec()).map_err(|e| ProviderError(format!("the provider's answer: {e}")))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct ProviderError(String);

/// The provider's client for a connection: its discovery document and keys
/// read now.
pub(super) async fn provider(connection: &Connection, secret: String, redirect: &str) -> Result<Client, ApiError> {
    let issuer = issuer_url(&connection.issuer)?;
    let metadata = CoreProviderMetadata::discover_async(issuer, &send).await.map_err(|e| {
        ApiError::Unavailable(anyhow::anyhow!("{e}").context("reading the identity provider's discovery document"))
    })?;
    let redirect = RedirectUrl::new(redirect.to_owned()).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(connection.client_id.clone()),
        Some(ClientSecret::new(secret)),
    )
    .set_redirect_uri(redirect))
}

#[cfg(test)]
mod tests {
    use super::issuer_url;

    #[test]
    fn issuers_are_https_except_on_loopback() {
        for good in [
            "https://idp.example.com",
            "https://login.example.com/tenant/v2.0/",
            "http://127.0.0.1:8080",
            "http://localhost:9000",
            "http://[::1]:9000",
        ] {
            assert!(issuer_url(good).is_ok(), "{good}");
        }
        for bad in ["http://idp.example.com", "http://10.0.0.5", "ftp://idp.example.com", "idp.example.com", ""] {
            assert!(issuer_url(bad).is_err(), "{bad}");
        }
        // A trailing slash is not part of the issuer (ID tokens name it without).
        assert_eq!(
            issuer_url("https://idp.example.com/").ok().map(|u| u.as_str().to_owned()),
            Some("https://idp.example.com".into())
        );
    }
}
