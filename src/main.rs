//! The `taproom` binary: parses the command line and hands over to `taproom::cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    taproom::cli::run(taproom::cli::Cli::parse())
}
