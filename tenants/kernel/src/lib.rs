//! The tenancy kernel of Plinth: everything that knows what a tenant is and
//! where its data lives, and nothing of HTTP, policy, jobs or mail.
//!
//! - [`ids`]: the id newtypes and parsed names (`TenantId`, `UserId`, `Slug`,
//!   `SchemaName`) and the `uuid_id!` macro for more.
//! - [`db`]: the pool and the transaction kinds: platform, tenant-scoped
//!   through [`TenantConn`], and platform rows of one tenant through
//!   [`TenantRows`].
//! - [`schema`]: diesel's `table!` declarations of the kernel's tables.
//! - [`registry`]: the tenant registry in the public schema and provisioning.
//! - [`shards`]: the servers that hold tenant schemas, and placement.
//! - [`migrate`]: platform migrations and the tenant migration orchestrator.
//! - [`moves`]: moving a tenant to another shard while it is served.
//! - [`replicas`]: reads from streaming replicas, read-your-writes.
//! - [`postgres`]: opening connections, with TLS as `sslmode` asks.
//! - [`notify`]: one LISTEN connection shared by every cache, with reconnects.
//! - [`cache`]: [`cache::NotifiedCache`], a cache trusted only while NOTIFY is
//!   connected.
//! - [`audit`]: the append-only audit log in each tenant's schema.
//! - [`text`]: characters names refuse, addresses kept out of logs.
//! - [`idempotency`]: the stored first answers of requests made with an
//!   `Idempotency-Key`.

pub mod audit;
pub mod backup;
pub mod cache;
pub mod counters;
pub mod crypto;
pub mod db;
pub mod idempotency;
pub mod ids;
pub mod lanes;
pub mod migrate;
pub mod moves;
pub mod notify;
pub mod pool;
pub mod postgres;
pub mod registry;
pub mod replicas;
pub mod schema;
pub mod shards;
pub mod spares;
pub mod template;
pub mod text;
pub mod trace;

pub use db::{Db, DbConfig, PgConn, TenantConn, TenantRows};
pub use ids::{SchemaName, ShardName, Slug, TenantId, UserId};
pub use registry::{Tenant, TenantStatus};
