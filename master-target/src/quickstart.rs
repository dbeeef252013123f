//! `boomerang-mt quickstart` (filled in below).

/// Quickstart flags.
#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {}

/// Runs the quickstart.
pub fn run(_args: QuickstartArgs) -> anyhow::Result<()> {
    anyhow::bail!("quickstart is not built yet")
}
