//! Command line of `boomerang-mt`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use boomerang_common::config::{
    exit_code, init_logging, load_toml, parse_id_path, runtime, shutdown_on_signals, TlsArgs,
};
use boomerang_common::message::Role;
use boomerang_common::pki;
use clap::{Parser, Subcommand};

use crate::config::MtConfig;

/// Boomerang master target: writes replicas and runs the operator's commands.
#[derive(Debug, Parser)]
#[command(name = "boomerang-mt", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the master target daemon.
    Run(RunArgs),
    /// Show each replicated disk: size, bytes applied, seq, consistent or syncing, lag.
    Status {
        /// State directory of the master target.
        #[arg(long, default_value = "/var/lib/boomerang-mt")]
        state_dir: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Manage the deployment's certificate authority.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Demonstrate the whole path on this machine, no root needed: make a CA and a
    /// sample disk, start all three roles on loopback, replicate, change a few percent,
    /// replicate the delta, verify the replica byte for byte.
    Quickstart(crate::quickstart::QuickstartArgs),
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the deployment CA (ca.pem, ca.key with mode 0600) in DIR.
    Init {
        /// Directory for the CA.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for one role instance, signed by the CA in DIR.
    Issue {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Role the certificate proves.
        #[arg(long)]
        role: Role,
        /// Instance name (a-z, 0-9, '-').
        #[arg(long)]
        name: String,
        /// Where to write <name>.pem, <name>.key and a copy of ca.pem. Default: DIR.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML configuration file (see MtConfig for every field and its default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (UDP).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// State directory (disk records, default replicas).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Replica location for a disk, as ID=PATH (image file or block device); repeatable.
    #[arg(long = "replica", value_parser = parse_id_path)]
    replicas: Vec<(String, PathBuf)>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Entry point: parse, run, and turn any error into a one-line reason and exit 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("info");
    exit_code("boomerang-mt", dispatch(cli).map_err(|e| format!("{e:#}")))
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let mut config: MtConfig = match &args.config {
                Some(p) => load_toml(p).map_err(anyhow::Error::msg)?,
                None => MtConfig::default(),
            };
            if let Some(l) = args.listen {
                config.listen = l;
            }
            if let Some(s) = args.state_dir {
                config.state_dir = s;
            }
            config.replicas.extend(args.replicas);
            args.tls.apply(&mut config.tls, &mut config.name);
            runtime().map_err(anyhow::Error::msg)?.block_on(async {
                let shutdown = shutdown_on_signals();
                crate::server::run(config, shutdown).await
            })
        }
        Command::Status { state_dir, json } => {
            let disks = crate::status::collect(&state_dir)
                .with_context(|| format!("reading state in {}", state_dir.display()))?;
            if json {
                println!("{}", serde_json::json!({ "disks": disks }));
            } else {
                print!("{}", crate::status::render(&disks));
            }
            Ok(())
        }
        Command::Pki(PkiCommand::Init { dir }) => {
            let ca = pki::init_ca(&dir)?;
            println!("created CA {}", ca.display());
            Ok(())
        }
        Command::Pki(PkiCommand::Issue {
            dir,
            role,
            name,
            out,
        }) => {
            let out = out.unwrap_or_else(|| dir.clone());
            let (cert, key) = pki::issue(&dir, role, &name, &out)?;
            println!(
                "issued {role} certificate {} (key {})",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::Quickstart(args) => crate::quickstart::run(args),
    }
}
