//! Command line of `boomerang-ps`.

use std::path::PathBuf;
use std::process::ExitCode;

use boomerang_common::config::{
    exit_code, init_logging, load_toml, runtime, shutdown_on_signals, TlsArgs,
};
use clap::{Parser, Subcommand};

use crate::config::PsConfig;

/// Boomerang process server: durable spool and relay between agents and the master target.
#[derive(Debug, Parser)]
#[command(name = "boomerang-ps", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the process server daemon.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML configuration file (see PsConfig for every field and its default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address agents connect to (UDP).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Address of the master target.
    #[arg(long)]
    master_target: Option<std::net::SocketAddr>,
    /// Spool directory.
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// Spool cap in MiB.
    #[arg(long)]
    spool_max_mib: Option<u64>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Entry point: parse, run, and turn any error into a one-line reason and exit 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("info");
    if let Err(e) = boomerang_common::faults::init_from_env() {
        return exit_code("boomerang-ps", Err(e));
    }
    exit_code("boomerang-ps", dispatch(cli).map_err(|e| format!("{e:#}")))
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let Command::Run(args) = cli.command;
    let mut config: PsConfig = match &args.config {
        Some(p) => load_toml(p).map_err(anyhow::Error::msg)?,
        None => PsConfig::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.master_target {
        config.master_target = v;
    }
    if let Some(v) = args.spool_dir {
        config.spool_dir = v;
    }
    if let Some(v) = args.spool_max_mib {
        config.spool_max_mib = v;
    }
    args.tls.apply(&mut config.tls, &mut config.name);
    runtime().map_err(anyhow::Error::msg)?.block_on(async {
        let shutdown = shutdown_on_signals();
        crate::server::run(config, shutdown).await
    })
}
