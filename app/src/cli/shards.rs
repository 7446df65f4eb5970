//! `plinth shards …`: declare the PostgreSQL servers that hold tenant
//! schemas and their streaming replicas, list them, and stop placing new
//! tenants on one.

use std::process::ExitCode;

use clap::Subcommand;
use plinth_tenants::replicas;
use plinth_tenants::shards::{self, AddError, ShardState};
use plinth_tenants::{Db, ShardName};

#[derive(Debug, Subcommand)]
pub enum ShardsCommand {
    /// Declare a PostgreSQL database as a shard: new tenants may be placed there. It must be a
    /// database of its own (not the platform database); Plinth creates its bookkeeping there.
    Add {
        /// 1-40 characters of a-z, 0-9, '-' and '_', starting with a letter.
        name: String,
        /// How every Plinth instance reaches it (a libpq URL; kept in the platform database).
        #[arg(long)]
        url: String,
    },
    /// List the shards (the platform database is `primary`), their state and tenants, and their replicas.
    List,
    /// Place no more new tenants on a shard; its tenants stay and are served.
    Drain { name: String },
    /// Declare a streaming replica of a shard's server (`primary` included): GET routes' reads may go there
    /// while it keeps up. It must be in recovery, a copy of that server, and the URL must name the same database.
    AddReplica {
        /// The shard it replicates.
        shard: String,
        /// How every Plinth instance reaches it (a libpq URL; kept in the platform database).
        #[arg(long)]
        url: String,
    },
    /// Stop reading from a replica (by the id `plinth shards list` shows).
    RemoveReplica { shard: String, id: i64 },
}

fn shard_name(name: &str) -> anyhow::Result<ShardName> {
    ShardName::parse(name).map_err(|e| anyhow::anyhow!("{name:?}: {e}"))
}

pub async fn run(command: ShardsCommand, db: &Db) -> anyhow::Result<ExitCode> {
    match command {
        ShardsCommand::Add { name, url } => {
            let name = shard_name(&name)?;
            match shards::add(db, &name, &url).await {
                Ok(()) => println!("shard {name} added at {} (open)", shards::server(&url)),
                Err(AddError::NameTaken(taken)) => anyhow::bail!("a shard named {taken} exists"),
                Err(err) => return Err(anyhow::Error::new(err).context(format!("adding shard {name}"))),
            }
        }
        ShardsCommand::List => {
            let (all, replicas) = db
                .platform(async |c| Ok::<_, anyhow::Error>((shards::list(c).await?, replicas::list(c).await?)))
                .await?;
            println!("{:<20} {:<10} {:>8}  server", "name", "state", "tenants");
            for shard in all {
                let server = shard.url.as_deref().map_or_else(|| "DATABASE_URL".to_owned(), shards::server);
                println!("{:<20} {:<10} {:>8}  {server}", shard.name.as_str(), shard.state, shard.tenants);
                for replica in replicas.iter().filter(|r| r.shard == shard.name) {
                    println!("  replica {:<10} {:>10}  {}", replica.id, "", shards::server(&replica.url));
                }
            }
        }
        ShardsCommand::AddReplica { shard, url } => {
            let shard = shard_name(&shard)?;
            let id = replicas::add(db, &shard, &url).await.map_err(|e| match e {
                replicas::AddError::Other(e) => e.context(format!("adding a replica of shard {shard}")),
                refused => anyhow::Error::new(refused),
            })?;
            println!(
                "replica {id} of shard {shard} added at {}: instances read from it once it keeps up",
                shards::server(&url)
            );
        }
        ShardsCommand::RemoveReplica { shard, id } => {
            let shard = shard_name(&shard)?;
            let found = db.platform(async |c| Ok::<_, anyhow::Error>(replicas::remove(c, &shard, id).await?)).await?;
            anyhow::ensure!(found, "shard {shard} has no replica {id}");
            println!(
                "replica {id} of shard {shard} removed: instances stop reading from it when they next read the list (every 20 checks, 10 s by default)"
            );
        }
        ShardsCommand::Drain { name } => {
            let name = shard_name(&name)?;
            let found = db
                .platform(async |c| Ok::<_, anyhow::Error>(shards::set_state(c, &name, ShardState::Draining).await?))
                .await?;
            anyhow::ensure!(found, "no shard named {name}");
            println!("shard {name} is draining: no new tenants go there");
        }
    }
    Ok(ExitCode::SUCCESS)
}
