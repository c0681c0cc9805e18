//! `failback-agent`: The recovery agent. Thin: parse arguments, set up logging, call the library, map errors to
//! exit codes.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "failback-agent", version, about = "The recovery agent")]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
