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
use plinth_tenants::{Db, SchemaName, ShardName, Slug, TenantId};

/// Takes one tenant's archive from the database of `url` (which `db` pools):
/// its schema and platform rows, all in one snapshot. For a tenant on
/// another shard, the schema's snapshot is that server's, taken while the
/// platform rows' is held: two servers share no instant, and nothing ties
/// a tenant's rows there to its platform rows but ids.
pub async fn backup(db: &Db, url: &str, tenant: TenantId) -> anyhow::Result<Archive> {
    db.platform(async |conn| {
        let snapshot = export_snapshot(conn).await?;
        let found = registry::find_by_id(conn, tenant).await?.context("no such tenant")?;
        anyhow::ensure!(found.status != TenantStatus::Deleting, "tenant {} is being deleted", found.slug);
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
        if found.shard.is_primary() {
            archive.dump_schema(url, Some(&snapshot)).await.context("dumping the tenant's schema")?;
        } else {
            let shard_url = db.shard_url(&found.shard).await?;
            db.on_shard(&found.shard, async |c| {
                let snapshot = export_snapshot(c).await?;
                archive.dump_schema(&shard_url, Some(&snapshot)).await.context("dumping the tenant's schema")
            })
            .await
            .with_context(|| format!("on shard {}", found.shard))?;
        }
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

/// Restores an archive into the database of `url`, or onto `shard`: as the tenant itself
/// (same id, slug and schema; refused while that tenant exists), or with
/// `copy_as` as a copy beside it (a new id and schema, that slug, the same
/// members; no domains, subscriptions, API keys or invitations, which stay
/// the original's).
/// An archive from a newer Plinth is refused; one from an older Plinth is
/// migrated. The schema is loaded first, in one transaction; the platform
/// rows then go in, in another; if that fails, the schema is dropped again.
pub async fn restore(
    db: &Db,
    url: &str,
    archive: &Archive,
    copy_as: Option<Slug>,
    shard: Option<ShardName>,
) -> anyhow::Result<Restored> {
    let shard = shard.unwrap_or_else(ShardName::primary);
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
            RestoreTarget { id, slug, schema, copy: false, shard: shard.clone() }
        }
        Some(slug) => {
            let id = TenantId::new();
            RestoreTarget { id, slug, schema: SchemaName::for_tenant(id), copy: true, shard: shard.clone() }
        }
    };
    // Refuse early, before anything is loaded, what the registry would
    // refuse at the end.
    let (by_id, by_slug, open) = db
        .platform(async |conn| {
            let by_id = registry::find_by_id(conn, target.id).await?;
            let by_slug = registry::find_by_slug(conn, target.slug.as_str()).await?;
            let open = plinth_tenants::shards::open(conn, &target.shard).await?;
            Ok::<_, anyhow::Error>((by_id, by_slug, open))
        })
        .await?;
    // The primary takes restores even while draining: it is where a
    // restore has always gone.
    anyhow::ensure!(open.is_some() || target.shard.is_primary(), "there is no open shard named {}", target.shard);
    if let Some(existing) = by_id {
        return Err(RestoreError::Exists(existing.slug).into());
    }
    if by_slug.is_some() {
        return Err(RestoreError::SlugTaken(target.slug.as_str().to_owned()).into());
    }

    let on_shard = !target.shard.is_primary();
    let schema_url = if on_shard { db.shard_url(&target.shard).await? } else { url.to_owned() };
    archive.load_schema(&schema_url, &target.schema).await.context("loading the tenant's schema")?;
    let empty = serde_json::Value::Null;
    let rows = async {
        if on_shard {
            db.on_shard(&target.shard, async |c| {
                Ok::<_, anyhow::Error>(backup::restore_on_shard(c, archive, &target, &pending).await?)
            })
            .await
            .with_context(|| format!("on shard {}", target.shard))?;
        }
        db.platform(async |conn| {
            let registry = backup::restore_registry(conn, archive, &target, &pending).await?;
            let identity = archive.parts.get("identity").unwrap_or(&empty);
            let members = plinth_identity::members::restore_archive(conn, target.id, identity, target.copy).await?;
            let subscriptions = match (target.copy, archive.parts.get("billing")) {
                (false, Some(billing)) => plinth_billing::customers::restore_archive(conn, target.id, billing).await?,
                _ => 0,
            };
            Ok::<_, anyhow::Error>((registry, members, subscriptions))
        })
        .await
    }
    .await;
    let (registry, members, subscriptions) = match rows {
        Ok(rows) => rows,
        Err(err) => {
            let drop = async |conn: &mut plinth_tenants::db::PgConn| {
                backup::drop_schema(conn, &target.schema).await?;
                if on_shard {
                    migrate::forget(conn, target.id).await?;
                }
                Ok::<_, anyhow::Error>(())
            };
            let dropped = if on_shard { db.on_shard(&target.shard, drop).await } else { db.platform(drop).await };
            if let Err(drop_err) = dropped {
                tracing::error!(error = %drop_err, schema = %target.schema.as_str(), "dropping the half-restored schema failed");
            }
            return Err(err.context("restoring the tenant's platform rows"));
        }
    };
    Ok(Restored { id: target.id, slug: target.slug.as_str().to_owned(), registry, members, subscriptions })
}
