//! The `pgpipe` binary: everything lives in the library's `cli` module.

use std::process::ExitCode;

fn main() -> ExitCode {
    pgpipe_forwarder::cli::main()
}
