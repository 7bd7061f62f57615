//! The `dino` command line.

use clap::Parser;

fn main() {
    let cli = dino::cli::Cli::parse();
    if let Err(e) = dino::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
