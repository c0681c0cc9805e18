//! `failback-client`: The failback appliance client. Thin: parse arguments, set up logging, call the library, map errors to
//! exit codes.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "failback-client",
    version,
    about = "The failback appliance client"
)]
struct Cli {}

fn main() {
    // As the appliance's /init (PID 1) the client runs the boot flow instead of the CLI.
    if std::process::id() == 1 {
        failback_client::appliance::init_main();
    }
    let _cli = Cli::parse();
}
