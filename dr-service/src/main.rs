//! `failback-server`: The DR service. Thin: parse arguments, set up logging, call the library, map errors to
//! exit codes.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "failback-server", version, about = "The DR service")]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
