//! `failback-client`: The failback appliance client. Thin: parse arguments, set up logging, call the library, map errors to
//! exit codes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "failback-client",
    version,
    about = "The failback appliance client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per mode; each mode's logic lives in its own library module.
#[derive(Subcommand, Debug)]
enum Command {
    /// Pull remote disks from a recovery agent into local block devices or image files.
    Sync(failback_client::sync_cmd::SyncArgs),
    /// Pair with the DR service and fail back until launched or stopped (exit 0 / 8).
    Run(failback_client::run::RunArgs),
}

fn main() -> ExitCode {
    failback_config::stdio::exit_quietly_on_broken_pipe();
    // As the appliance's /init (PID 1) the client runs the boot flow instead of the CLI.
    if std::process::id() == 1 {
        failback_client::appliance::init_main();
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let exit = match cli.command {
        Command::Sync(args) => failback_client::sync_cmd::main(args),
        Command::Run(args) => failback_client::run::main(args),
    };
    exit.into()
}
