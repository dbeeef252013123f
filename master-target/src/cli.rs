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
use crate::control::{self, Request};

/// Targets as absolute paths (the daemon runs elsewhere).
fn absolute_targets(
    to: Vec<(String, PathBuf)>,
) -> anyhow::Result<std::collections::BTreeMap<String, PathBuf>> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut out = std::collections::BTreeMap::new();
    for (disk, path) in to {
        let path = if path.is_absolute() {
            path
        } else {
            cwd.join(path)
        };
        if out.insert(disk.clone(), path).is_some() {
            anyhow::bail!("--to names disk {disk} twice");
        }
    }
    Ok(out)
}

fn print_result(v: serde_json::Value, json: bool) {
    if json {
        println!("{v}");
    }
}

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
    /// Show each group (state, RPO, points kept, journal size, last error) and each
    /// replicated disk (size, bytes applied, seq, consistent or syncing, lag).
    Status {
        #[command(flatten)]
        dirs: Dirs,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List a group's recovery points: id, kind, time, disks; marks latest-processed
    /// and latest-app.
    Points {
        #[command(flatten)]
        dirs: Dirs,
        /// The group.
        #[arg(long)]
        group: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Fail a group over to a recovery point: roll its replicas back in place, or
    /// materialize the point to --to targets. Replication of the group stops until
    /// `commit` or `failover --cancel`.
    Failover {
        #[command(flatten)]
        dirs: Dirs,
        /// The group.
        #[arg(long)]
        group: String,
        /// latest (drain the sources and shut them down first), latest-processed (the
        /// newest point here now), latest-app, or a point id.
        #[arg(long, required_unless_present = "cancel")]
        point: Option<String>,
        /// Target for a disk, as DISK=PATH (image file or block device); repeatable.
        /// Give one per disk, or none to roll the replicas in place.
        #[arg(long = "to", value_parser = parse_id_path)]
        to: Vec<(String, PathBuf)>,
        /// Cancel the pending failover: replication resumes.
        #[arg(long, conflicts_with = "point")]
        cancel: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Materialize a recovery point into scratch targets while replication goes on.
    TestFailover {
        #[command(flatten)]
        dirs: Dirs,
        /// The group.
        #[arg(long)]
        group: String,
        /// latest-processed, latest-app or a point id (latest means latest-processed).
        #[arg(long, required_unless_present = "cleanup")]
        point: Option<String>,
        /// Target for a disk, as DISK=PATH; one per disk.
        #[arg(long = "to", value_parser = parse_id_path)]
        to: Vec<(String, PathBuf)>,
        /// Remove the image files earlier test failovers of the group created.
        #[arg(long, conflicts_with = "point")]
        cleanup: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Commit a failover: history after the point is dropped, the old source is told
    /// to stop replicating and forget the group; the group is failed back, unprotected.
    Commit {
        #[command(flatten)]
        dirs: Dirs,
        /// The group.
        #[arg(long)]
        group: String,
    },
    /// Replicate a failed-back group the other way: writes the configuration of the
    /// agent that ships its disks (now the source) to the given process server.
    Reprotect {
        #[command(flatten)]
        dirs: Dirs,
        /// The group.
        #[arg(long)]
        group: String,
        /// The process server that carries the data to the other site (ADDR:PORT).
        #[arg(long)]
        process_server: String,
        /// Name of the agent for disks no agent was seen replicating.
        #[arg(long, default_value = "agent")]
        agent_name: String,
        /// Print the result (the agent configurations written) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a failed-back group back as a replication target (once the other site has
    /// failed it over again).
    Protect {
        #[command(flatten)]
        dirs: Dirs,
        /// The group.
        #[arg(long)]
        group: String,
    },
    /// Manage the deployment's certificate authority.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Demonstrate the whole path on this machine, no root needed: make a CA and a
    /// sample disk, start all three roles on loopback, replicate, change a few percent,
    /// replicate the delta, verify the replica byte for byte.
    Quickstart(crate::quickstart::QuickstartArgs),
}

/// Where the master target keeps its state.
#[derive(Debug, clap::Args)]
struct Dirs {
    /// State directory of the master target.
    #[arg(long, default_value = "/var/lib/boomerang-mt")]
    state_dir: PathBuf,
    /// Retention directory, when not `<state_dir>/retention`.
    #[arg(long)]
    retention_dir: Option<PathBuf>,
}

impl Dirs {
    fn retention(&self) -> PathBuf {
        self.retention_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("retention"))
    }
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
    /// Retention directory (default `<state_dir>/retention`).
    #[arg(long)]
    retention_dir: Option<PathBuf>,
    /// Seconds `failover --point latest` waits for the sources to drain.
    #[arg(long)]
    drain_timeout_secs: Option<u64>,
    /// Seconds between applications of the retention policy.
    #[arg(long)]
    prune_interval_secs: Option<u64>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Entry point: parse, run, and turn any error into a one-line reason and exit 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("info");
    if let Err(e) = boomerang_common::faults::init_from_env() {
        return exit_code("boomerang-mt", Err(e));
    }
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
            if args.retention_dir.is_some() {
                config.retention_dir = args.retention_dir;
            }
            if let Some(s) = args.drain_timeout_secs {
                config.drain_timeout_secs = s;
            }
            if let Some(s) = args.prune_interval_secs {
                config.prune_interval_secs = s;
            }
            args.tls.apply(&mut config.tls, &mut config.name);
            runtime().map_err(anyhow::Error::msg)?.block_on(async {
                let shutdown = shutdown_on_signals();
                crate::server::run(config, shutdown).await
            })
        }
        Command::Status { dirs, json } => {
            let state_dir = &dirs.state_dir;
            let disks = crate::status::collect(state_dir)
                .with_context(|| format!("reading state in {}", state_dir.display()))?;
            let groups = crate::status::collect_groups(state_dir, &dirs.retention())
                .with_context(|| format!("reading state in {}", state_dir.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "groups": groups, "disks": disks })
                );
            } else {
                if !groups.is_empty() {
                    print!("{}", crate::status::render_groups(&groups));
                    println!();
                }
                print!("{}", crate::status::render(&disks));
            }
            Ok(())
        }
        Command::Points { dirs, group, json } => {
            let records = crate::disks::load_records(&dirs.state_dir)
                .with_context(|| format!("reading state in {}", dirs.state_dir.display()))?;
            if !records.iter().any(|r| r.group == group) {
                eprintln!("boomerang-mt: no disk of group {group} is known in {} yet; `boomerang-mt status` lists the groups", dirs.state_dir.display());
            }
            let lines = crate::points::listing(&crate::points::group_points(&records, &group));
            if json {
                println!("{}", serde_json::json!({ "group": group, "points": lines }));
            } else {
                print!("{}", crate::points::render(&group, &lines));
            }
            Ok(())
        }
        Command::Failover {
            dirs,
            group,
            point,
            to,
            cancel,
            json,
        } => {
            let request = if cancel {
                Request::Cancel { group }
            } else {
                Request::Failover {
                    group,
                    point: point.unwrap_or_else(|| "latest".into()),
                    to: absolute_targets(to)?,
                }
            };
            print_result(control::call(&dirs.state_dir, &request, json)?, json);
            Ok(())
        }
        Command::TestFailover {
            dirs,
            group,
            point,
            to,
            cleanup,
            json,
        } => {
            let request = if cleanup {
                Request::TestCleanup { group }
            } else {
                Request::TestFailover {
                    group,
                    point: point.unwrap_or_else(|| "latest-processed".into()),
                    to: absolute_targets(to)?,
                }
            };
            print_result(control::call(&dirs.state_dir, &request, json)?, json);
            Ok(())
        }
        Command::Commit { dirs, group } => {
            control::call(&dirs.state_dir, &Request::Commit { group }, false)?;
            Ok(())
        }
        Command::Reprotect {
            dirs,
            group,
            process_server,
            agent_name,
            json,
        } => {
            let request = Request::Reprotect {
                group,
                process_server,
                agent_name,
            };
            print_result(control::call(&dirs.state_dir, &request, json)?, json);
            Ok(())
        }
        Command::Protect { dirs, group } => {
            control::call(&dirs.state_dir, &Request::Protect { group }, false)?;
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
