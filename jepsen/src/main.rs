//! The `jepsen` binary: `jepsen check FILE [--out DIR]` re-checks a history offline.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    jepsen::run(jepsen::Cli::parse())
}
