//! `failback`: the admin CLI. One module per command group (`*_cmd.rs`), each owning its
//! clap types and a `run` function; this file only dispatches and maps errors to exit codes.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod admin_cmd;
mod iso_cmd;
mod mass_cmd;
mod vcenter_cmd;

#[derive(Parser, Debug)]
#[command(
    name = "failback",
    version,
    about = "Failback admin CLI: DR service, vCenter, ISOs, mass failback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version of every wire format this build speaks.
    Version,
    /// DR service admin: instances, token, launch, stop, config, events.
    #[command(flatten)]
    Admin(admin_cmd::AdminCommand),
    /// vCenter: list VMs, upload, attach/detach ISOs, boot order, power, snapshots.
    Vcenter(vcenter_cmd::VcenterCmd),
    /// Mass failback: find VMs, plan, run many at once.
    #[command(subcommand)]
    Mass(mass_cmd::MassCommand),
    /// Appliance ISO.
    #[command(subcommand)]
    Iso(iso_cmd::IsoCommand),
    /// Per-VM seed ISO.
    #[command(subcommand)]
    Seed(iso_cmd::SeedCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    failback_config::stdio::exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    match cli.command {
        Command::Mass(cmd) => mass_cmd::run(cmd).await,
        Command::Admin(cmd) => admin_cmd::run(cmd).await,
        Command::Vcenter(cmd) => vcenter_cmd::run(cmd).await,
        Command::Version => {
            println!("failback {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Iso(cmd) => iso_cmd::run_iso(cmd),
        Command::Seed(cmd) => iso_cmd::run_seed(cmd),
    }
}
