//! Embeds `migrations/tenant/*/{up,down}.sql` (diesel's folder layout) into the
//! crate, ordered by folder name, so provisioning needs no files at run time.

use std::fmt::Write as _;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `embed_migrations!` (platform migrations) reads its folder at compile
    // time but does not tell cargo; without this a new platform migration
    // would not be embedded until something else rebuilt the crate.
    let platform = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/platform");
    println!("cargo:rerun-if-changed={}", platform.display());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/tenant");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut dirs: Vec<_> = std::fs::read_dir(&root)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("up.sql").is_file())
        .collect();
    dirs.sort();
    let mut out = String::from("pub static TENANT_MIGRATIONS: &[TenantMigration] = &[\n");
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).ok_or("bad migration folder name")?;
        let version = name.split('_').next().unwrap_or(name).replace('-', "");
        println!("cargo:rerun-if-changed={}", dir.display());
        let up = dir.join("up.sql").canonicalize()?;
        let down = dir.join("down.sql").canonicalize()?;
        writeln!(
            out,
            "    TenantMigration {{ version: {version:?}, name: {name:?}, up: include_str!({up:?}), down: include_str!({down:?}) }},",
            up = up.display().to_string(),
            down = down.display().to_string(),
        )?;
    }
    out.push_str("];\n");
    std::fs::write(Path::new(&std::env::var("OUT_DIR")?).join("tenant_migrations.rs"), out)?;
    Ok(())
}
