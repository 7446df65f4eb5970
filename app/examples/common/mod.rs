//! What the benchmarks share (`mod common;` in each): a database of their
//! own on the zero-configuration server, or on `DATABASE_URL`'s.

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Drops and creates database `name`, applies the platform migrations, and
/// returns its URL, a client on the server's `postgres` database, and the
/// server (whose `shutdown` stops a private cluster started for it).
pub async fn fresh_database(name: &str) -> Result<(String, tokio_postgres::Client, plinth::pg::Database)> {
    let admin = plinth::pg::prepare(std::env::var("DATABASE_URL").ok().as_deref(), ".plinth".as_ref(), "postgres")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let (client, conn) = tokio_postgres::connect(&admin.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let url = format!("{}/{name}", admin.url.rsplit_once('/').map_or(admin.url.as_str(), |(b, _)| b));
    plinth_tenants::migrate::run_platform_migrations(&url).await.map_err(|e| format!("{e:#}"))?;
    Ok((url, client, admin))
}
