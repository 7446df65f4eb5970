//! One tenant's backup and restore, composed from each owner's part: the
//! kernel's schema dump and registry rows (`plinth_tenants::backup`),
//! identity's memberships and billing's subscription links. The archive
//! format is the kernel's.

use anyhow::Context as _;
use plinth_tenants::backup::{
    self, Archive, ArchivedTenant, RestoreError, RestoreTarget, RestoredRegistry, export_snapshot, registry_part,
};
use plinth_tenants::migrate::{self, TENANT_MIGRATIONS};
use plinth_tenants::registry::{self, TenantStatus};
use plinth_tenants::{Db, SchemaName, Slug, TenantId};

/// Takes one tenant's archive from the database of `url` (which `db` pools):
/// its schema and platform rows, all in one snapshot.
pub async fn backup(db: &Db, url: &str, tenant: TenantId) -> anyhow::Result<Archive> {
    db.platform(async |conn| {
        let snapshot = export_snapshot(conn).await?;
        let found = registry::find_by_id(conn, tenant).await?.context("no such tenant")?;
        anyhow::ensure!(found.status != TenantStatus::Deleting, "tenant {} is being deleted", found.slug);
        anyhow::ensure!(
            found.shard.is_primary(),
            "tenant {} lives on shard {}: backups of tenants on other shards are not supported yet",
            found.slug,
            found.shard
        );
        let archived = ArchivedTenant {
            id: found.id.0,
            slug: found.slug.clone(),
            name: found.name.clone(),
            plan: found.plan.clone(),
            status: found.status.as_str().to_owned(),
            created_at: found.created_at,
            schema: found.schema.as_str().to_owned(),
        };
        let versions = migrate::applied_versions(conn, tenant).await?;
        let platform = migrate::newest_platform_version(conn).await?;
        let mut archive = Archive::new(archived, versions, platform)?;
        archive.add_part("registry", registry_part(conn, tenant).await?);
        archive.add_part("identity", plinth_identity::members::archive(conn, tenant).await?);
        archive.add_part("billing", plinth_billing::customers::archive(conn, tenant).await?);
        // pg_dump runs while this transaction holds the snapshot open.
        archive.dump_schema(url, Some(&snapshot)).await.context("dumping the tenant's schema")?;
        Ok::<_, anyhow::Error>(archive)
    })
    .await
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub id: TenantId,
    pub slug: String,
    pub registry: RestoredRegistry,
    pub members: plinth_identity::members::RestoredMembers,
    pub subscriptions: usize,
}

/// Restores an archive into the database of `url`: as the tenant itself
/// (same id, slug and schema; refused while that tenant exists), or with
/// `copy_as` as a copy beside it (a new id and schema, that slug, the same
/// members; no domains, subscriptions, API keys or invitations, which stay
/// the original's).
/// An archive from a newer Plinth is refused; one from an older Plinth is
/// migrated. The schema is loaded first, in one transaction; the platform
/// rows then go in, in another; if that fails, the schema is dropped again.
pub async fn restore(db: &Db, url: &str, archive: &Archive, copy_as: Option<Slug>) -> anyhow::Result<Restored> {
    let pending = archive.pending(TENANT_MIGRATIONS, &migrate::platform_versions())?;
    let archived = &archive.manifest.tenant;
    let target = match copy_as {
        None => {
            let id = TenantId(archived.id);
            let schema = SchemaName::for_tenant(id);
            anyhow::ensure!(
                schema.as_str() == archived.schema,
                "the archive's schema {} does not belong to its tenant",
                archived.schema
            );
            let slug = Slug::parse(&archived.slug).map_err(|e| anyhow::anyhow!("the archived slug: {e}"))?;
            RestoreTarget { id, slug, schema, copy: false }
        }
        Some(slug) => {
            let id = TenantId::new();
            RestoreTarget { id, slug, schema: SchemaName::for_tenant(id), copy: true }
        }
    };
    // Refuse early, before anything is loaded, what the registry would
    // refuse at the end.
    let (by_id, by_slug) = db
        .platform(async |conn| {
            let by_id = registry::find_by_id(conn, target.id).await?;
            let by_slug = registry::find_by_slug(conn, target.slug.as_str()).await?;
            Ok::<_, anyhow::Error>((by_id, by_slug))
        })
        .await?;
    if let Some(existing) = by_id {
        return Err(RestoreError::Exists(existing.slug).into());
    }
    if by_slug.is_some() {
        return Err(RestoreError::SlugTaken(target.slug.as_str().to_owned()).into());
    }

    archive.load_schema(url, &target.schema).await.context("loading the tenant's schema")?;
    let empty = serde_json::Value::Null;
    let rows = db
        .platform(async |conn| {
            let registry = backup::restore_registry(conn, archive, &target, &pending).await?;
            let identity = archive.parts.get("identity").unwrap_or(&empty);
            let members = plinth_identity::members::restore_archive(conn, target.id, identity, target.copy).await?;
            let subscriptions = match (target.copy, archive.parts.get("billing")) {
                (false, Some(billing)) => plinth_billing::customers::restore_archive(conn, target.id, billing).await?,
                _ => 0,
            };
            Ok::<_, anyhow::Error>((registry, members, subscriptions))
        })
        .await;
    let (registry, members, subscriptions) = match rows {
        Ok(rows) => rows,
        Err(err) => {
            let dropped = db
                .platform(async |conn| Ok::<_, anyhow::Error>(backup::drop_schema(conn, &target.schema).await?))
                .await;
            if let Err(drop_err) = dropped {
                tracing::error!(error = %drop_err, schema = %target.schema.as_str(), "dropping the half-restored schema failed");
            }
            return Err(err.context("restoring the tenant's platform rows"));
        }
    };
    Ok(Restored { id: target.id, slug: target.slug.as_str().to_owned(), registry, members, subscriptions })
}
