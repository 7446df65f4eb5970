//! Finding the tenant of a request: the `Host` subdomain of the base domain, a
//! verified custom domain, or the `X-Tenant` header.
//!
//! Lookups are cached in memory, including "no such tenant", in a
//! [`NotifiedCache`]. Any change to the registry (tenant or domain rows) sends
//! a NOTIFY from a trigger; every instance then drops its whole cache.

use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header::HOST;

use plinth_http::error::ApiError;
use plinth_tenants::cache::NotifiedCache;
use plinth_tenants::db::Db;
use plinth_tenants::ids::Slug;
use plinth_tenants::notify::{Handler, ListenEvent};
use plinth_tenants::registry::{self, Tenant, TenantStatus};

use crate::error::AccessError;

/// The NOTIFY channel the registry triggers publish on.
pub const CHANNEL: &str = "plinth_tenants";
/// The header naming a tenant explicitly.
pub const TENANT_HEADER: &str = "x-tenant";
/// Entries kept before the cache starts over (bounds memory under random hosts).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Slug(String),
    Domain(String),
}

/// Resolves and caches tenants. Shared by all workers of an instance.
pub struct TenantResolver {
    db: Db,
    base_domain: String,
    cache: NotifiedCache<Key, Option<Arc<Tenant>>>,
}

impl TenantResolver {
    pub fn new(db: Db, base_domain: &str) -> Arc<Self> {
        Arc::new(Self {
            db,
            base_domain: base_domain.trim_matches('.').to_ascii_lowercase(),
            cache: NotifiedCache::new("tenants", None, MAX_ENTRIES),
        })
    }

    /// The listener handler that keeps this cache honest.
    pub fn listen_handler(self: &Arc<Self>) -> Handler {
        let this = Arc::clone(self);
        Arc::new(move |event| match event {
            ListenEvent::Notified(_) => this.cache.clear(),
            ListenEvent::Connected => this.cache.set_trusted(true),
            ListenEvent::Disconnected => this.cache.set_trusted(false),
        })
    }

    /// The tenant a request names: active or suspended (a tenant being
    /// deleted is 404 like an unknown one).
    pub async fn resolve(&self, req: &HttpRequest) -> Result<Arc<Tenant>, ApiError> {
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(strip_port);
        let header = req.headers().get(TENANT_HEADER).map(|h| h.to_str().unwrap_or("\u{fffd}"));

        let from_host = match host.as_deref().and_then(|h| self.host_key(h)) {
            Some(key @ Key::Slug(_)) => Some(self.lookup(key).await?.ok_or(ApiError::NotFound("tenant"))?),
            // An unknown custom domain is not an error on its own: the host may
            // simply be the API's own name, with the tenant in the header.
            Some(key @ Key::Domain(_)) => self.lookup(key).await?,
            None => None,
        };
        let tenant = match (from_host, header) {
            (Some(t), Some(h)) if t.slug != h => {
                return Err(ApiError::invalid("the X-Tenant header names a different tenant than the host"));
            }
            (Some(t), _) => t,
            (None, Some(h)) => {
                let slug = Slug::parse(h).map_err(|_| ApiError::NotFound("tenant"))?;
                self.lookup(Key::Slug(slug.as_str().to_owned())).await?.ok_or(ApiError::NotFound("tenant"))?
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "no tenant given: use the tenant's subdomain, a custom domain or the X-Tenant header",
                ));
            }
        };
        match tenant.status {
            // Whether a suspension is revealed is the caller's decision (only
            // to members): see `TenantContext`.
            TenantStatus::Active | TenantStatus::Suspended => Ok(tenant),
            TenantStatus::Deleting => Err(ApiError::NotFound("tenant")),
        }
    }

    fn host_key(&self, host: &str) -> Option<Key> {
        if host == self.base_domain || host.parse::<std::net::IpAddr>().is_ok() || host.is_empty() {
            return None;
        }
        if let Some(label) = host.strip_suffix(&self.base_domain).and_then(|p| p.strip_suffix('.')) {
            // Only a single label directly under the base domain names a tenant.
            return Some(Key::Slug(match Slug::parse(label) {
                Ok(slug) if !label.contains('.') => slug.as_str().to_owned(),
                _ => String::new(), // never a slug: resolves to "not found"
            }));
        }
        if host == "localhost" {
            return None;
        }
        Some(Key::Domain(host.to_owned()))
    }

    async fn lookup(&self, key: Key) -> Result<Option<Arc<Tenant>>, AccessError> {
        let ticket = match self.cache.get(&key) {
            Ok(hit) => return Ok(hit),
            Err(ticket) => ticket,
        };
        let found = match &key {
            Key::Slug(s) if s.is_empty() => None,
            Key::Slug(s) => {
                self.db.platform(async |c| Ok::<_, AccessError>(registry::find_by_slug(c, s).await?)).await?
            }
            Key::Domain(d) => {
                self.db.platform(async |c| Ok::<_, AccessError>(registry::find_by_domain(c, d).await?)).await?
            }
        }
        .map(Arc::new);
        self.cache.insert(ticket, key, found.clone());
        Ok(found)
    }
}

/// `Host` without its port or a trailing dot, lowercased (`[::1]:8080` →
/// `[::1]`).
fn strip_port(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if host.starts_with('[') {
        return host.split(']').next().map(|h| format!("{h}]")).unwrap_or(host);
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => host,
    };
    // `acme.example.com.` (fully qualified) is the same host.
    name.strip_suffix('.').map(str::to_owned).unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("Acme.Example.com:8080"), "acme.example.com");
        assert_eq!(strip_port("acme.example.com"), "acme.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("acme.example.com.:8080"), "acme.example.com");
        assert_eq!(strip_port("acme.example.com."), "acme.example.com");
    }
}
