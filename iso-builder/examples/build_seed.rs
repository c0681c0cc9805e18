//! Builds a seed ISO without the admin CLI: `cargo run -p failback-iso --example build_seed
//! -- SEED.TOML OUT [--partial]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, out, rest @ ..] = &args[..] else {
        return Err("usage: build_seed SEED.TOML OUT [--partial]".into());
    };
    let seed = failback_config::seed::SeedConfig::from_toml(&std::fs::read_to_string(config)?)?;
    let completeness = if rest.iter().any(|a| a == "--partial") {
        failback_config::seed::Completeness::Partial
    } else {
        failback_config::seed::Completeness::Complete
    };
    let size = failback_iso::seed::build_with(&seed, completeness, std::path::Path::new(out))?;
    println!("{out}: {size} bytes");
    Ok(())
}
