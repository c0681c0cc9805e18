//! `failback iso build` and `failback seed build`: the appliance ISO and per-VM seed ISOs.

use clap::{Args, Subcommand, ValueEnum};
use failback_config::seed::{Completeness, SeedConfig};
use failback_iso::inputs::{default_cache, Inputs};
use std::path::PathBuf;
use std::process::ExitCode;

/// Output format.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object.
    Json,
}

/// `failback iso ...`
#[derive(Subcommand, Debug)]
pub enum IsoCommand {
    /// Build the appliance ISO (BIOS + UEFI + Secure Boot, hybrid CD/USB).
    Build(IsoBuildArgs),
}

/// `failback iso build`
#[derive(Args, Debug)]
pub struct IsoBuildArgs {
    /// Unpacked Debian inputs (`make iso-inputs`); default $FAILBACK_ISO_INPUTS or target/iso-inputs.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Static failback-client binary (default target/x86_64-unknown-linux-musl/release/failback-client).
    #[arg(long)]
    client: Option<PathBuf>,
    /// Extra kernel argument for every boot entry (repeatable), e.g. failback.no_prompt=1.
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
    /// Where to write the ISO.
    #[arg(short = 'o', long = "out", default_value = "failback.iso")]
    out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `failback seed ...`
#[derive(Subcommand, Debug)]
pub enum SeedCommand {
    /// Build a seed ISO (label FBSEED) from a seed.toml.
    Build(SeedBuildArgs),
}

/// `failback seed build`
#[derive(Args, Debug)]
pub struct SeedBuildArgs {
    /// The seed file (see `failback_config::seed`).
    #[arg(long)]
    config: PathBuf,
    /// Where to write the seed ISO.
    #[arg(short = 'o', long = "out", default_value = "seed.iso")]
    out: PathBuf,
    /// Allow a seed without server URL/token/CA: the appliance asks on the console.
    #[arg(long)]
    partial: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

fn exit_code(e: &failback_iso::Error) -> ExitCode {
    match e {
        failback_iso::Error::Seed(_) | failback_iso::Error::InputMissing { .. } => {
            ExitCode::from(2)
        }
        _ => ExitCode::from(1),
    }
}

/// Runs `failback iso ...`.
pub fn run_iso(cmd: IsoCommand) -> ExitCode {
    let IsoCommand::Build(args) = cmd;
    let cache = args.cache.unwrap_or_else(default_cache);
    let client = args.client.unwrap_or_else(|| {
        PathBuf::from("target/x86_64-unknown-linux-musl/release/failback-client")
    });
    if !client.is_file() {
        eprintln!(
            "error: client binary {} not found; build it with `cargo build --release --target x86_64-unknown-linux-musl -p failback-client` or pass --client",
            client.display()
        );
        return ExitCode::from(2);
    }
    let result = Inputs::from_cache(&cache).and_then(|inputs| {
        failback_iso::appliance::build(
            &failback_iso::appliance::ApplianceOptions {
                inputs,
                client,
                extra_kernel_args: args.kernel_args.join(" "),
            },
            &args.out,
        )
    });
    match result {
        Ok(r) => {
            match args.output {
                OutputFormat::Text => {
                    for w in &r.warnings {
                        eprintln!("warning: {w}");
                    }
                    println!(
                        "{}: {} bytes ({:.1} MiB); kernel {}, initramfs {} bytes ({} unpacked), {} modules",
                        args.out.display(),
                        r.iso_bytes,
                        r.iso_bytes as f64 / 1048576.0,
                        r.kernel_release,
                        r.initramfs_bytes,
                        r.initramfs_unpacked_bytes,
                        r.modules.len()
                    );
                }
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::json!({
                        "path": args.out, "iso_bytes": r.iso_bytes,
                        "kernel_release": r.kernel_release,
                        "initramfs_bytes": r.initramfs_bytes,
                        "initramfs_unpacked_bytes": r.initramfs_unpacked_bytes,
                        "modules": r.modules, "warnings": r.warnings,
                    })
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: building {}: {e}", args.out.display());
            exit_code(&e)
        }
    }
}

/// Runs `failback seed ...`.
pub fn run_seed(cmd: SeedCommand) -> ExitCode {
    let SeedCommand::Build(args) = cmd;
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let completeness = if args.partial {
        Completeness::Partial
    } else {
        Completeness::Complete
    };
    let result = SeedConfig::from_toml(&text)
        .map_err(failback_iso::Error::from)
        .and_then(|seed| failback_iso::seed::build_with(&seed, completeness, &args.out));
    match result {
        Ok(size) => {
            match args.output {
                OutputFormat::Text => println!("{}: {size} bytes", args.out.display()),
                OutputFormat::Json => {
                    println!("{}", serde_json::json!({"path": args.out, "bytes": size}))
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.display());
            exit_code(&e)
        }
    }
}
