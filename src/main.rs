//! The `dino` command line.

use clap::{CommandFactory, FromArgMatches};
use dino::cli::{Cli, run};

fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = run(cli, &matches) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
