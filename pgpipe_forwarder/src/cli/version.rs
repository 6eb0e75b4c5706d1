//! `pgpipe version`: prints `pgpipe <version>`.

use std::process::ExitCode;

use clap::Args;

use super::{print_output, GlobalArgs, Run};

/// Arguments of `pgpipe version` (none).
#[derive(Debug, Args)]
pub struct VersionArgs {}

impl Run for VersionArgs {
    fn run(self, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
        print_output(&format!("pgpipe {}\n", env!("CARGO_PKG_VERSION")))?;
        Ok(ExitCode::SUCCESS)
    }
}
