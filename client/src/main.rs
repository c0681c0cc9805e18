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
    let _cli = Cli::parse();
}
