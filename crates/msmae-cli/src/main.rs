//! The `msmae` binary: registers the stage plugins, picks the backend and device once,
//! and runs or inspects pipelines.

use std::process::ExitCode;

fn main() -> ExitCode {
    msmae_cli::main_with(msmae_cli::registry())
}
