//! Command line of `boomerang-agent`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use boomerang_common::config::{
    exit_code, init_logging, load_toml, parse_id_path, runtime, shutdown_on_signals, TlsArgs,
};
use boomerang_common::message::{Message, Role};
use boomerang_common::transport;
use clap::{Parser, Subcommand};
use tracing::{error, info};

use crate::config::{AgentConfig, DiskConfig};
use crate::link::PsLink;
use crate::session::TrackStop;
use crate::sync::{SyncReport, Syncer, Wait};

/// Boomerang agent: tracks and ships the changes of this machine's disks.
#[derive(Debug, Parser)]
#[command(name = "boomerang-agent", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sync every disk once against the replica's hashes, then exit.
    Sync(Args),
    /// Replicate continuously from the kernel's block write tracepoints (block devices
    /// only): scan once, then ship written blocks as they change, with consistency
    /// points (paused by --freeze) every --crash-interval / --app-interval seconds.
    /// Checks in with the master target every --control-interval seconds: when the
    /// group fails over it takes a final point, ships it, runs --shutdown-hook and
    /// exits 0; once the failover is committed it forgets the disks' state and exits 0.
    Track {
        #[command(flatten)]
        args: Args,
        #[command(flatten)]
        track: TrackArgs,
    },
    /// Sync every disk now and then every --interval seconds, until SIGTERM.
    Run {
        #[command(flatten)]
        args: Args,
        /// Seconds between syncs.
        #[arg(long)]
        interval: Option<u64>,
    },
}

/// Flags of continuous tracking only.
#[derive(Debug, Clone, clap::Args)]
struct TrackArgs {
    /// Seconds between crash-consistent points.
    #[arg(long)]
    crash_interval: Option<f64>,
    /// Seconds between app-consistent points.
    #[arg(long)]
    app_interval: Option<f64>,
    /// Where changes come from.
    #[arg(long, value_enum)]
    source: Option<crate::config::TrackSource>,
    /// Intercept source: serve each disk as <DIR>/<disk id>/disk.
    #[arg(long)]
    serve_dir: Option<PathBuf>,
    /// Intercept source: journal capacity per disk in MiB.
    #[arg(long)]
    journal_mib: Option<u64>,
    /// Seconds between check-ins with the master target for the group's directive
    /// (continue, shut down for a failover, forget after a committed failover)
    /// [default: 2].
    #[arg(long, value_name = "SECS")]
    control_interval: Option<f64>,
    /// Command stopping the workload when the group fails over, run with `sh -c` once
    /// the final point is durable at the process server (output logged). Without
    /// one, the operator stops the workload.
    #[arg(long, value_name = "CMD")]
    shutdown_hook: Option<String>,
    /// Seconds the shutdown hook may run before it is killed [default: 300].
    #[arg(long, value_name = "SECS")]
    shutdown_hook_timeout: Option<f64>,
    /// Take interval points together with the group's other agents: on wall-clock
    /// multiples of the interval (the point id), tagged only when every disk of the
    /// group paused in time (clocks must agree, e.g. NTP).
    #[arg(long)]
    coordinated_points: bool,
    /// Coordinated points: milliseconds writes stay paused waiting for the group;
    /// below the pause deadline [default: 1500].
    #[arg(long, value_name = "MS")]
    point_deadline_ms: Option<u64>,
    /// Longest a consistency point may hold writes, in seconds; then it is undone and
    /// the point abandoned [default: 2].
    #[arg(long, value_name = "SECS")]
    pause_deadline: Option<f64>,
    /// Trace source: ring buffer per cpu in KiB; also bounds the writes a clean stop
    /// may miss before the next start rescans instead of adopting the handed-over
    /// trace instance (trace.buffer_size_kb) [default: 4096].
    #[arg(long, value_name = "KIB")]
    trace_buffer_kb: Option<u32>,
}

impl TrackArgs {
    fn apply(&self, c: &mut AgentConfig) {
        if let Some(v) = self.source {
            c.source = v;
        }
        if self.serve_dir.is_some() {
            c.serve_dir.clone_from(&self.serve_dir);
        }
        if let Some(v) = self.journal_mib {
            c.journal_mib = v;
        }
        if let Some(v) = self.crash_interval {
            c.crash_interval_secs = v;
        }
        if let Some(v) = self.app_interval {
            c.app_interval_secs = v;
        }
        if let Some(v) = self.control_interval {
            c.control_interval_secs = v;
        }
        if self.shutdown_hook.is_some() {
            c.shutdown_hook.clone_from(&self.shutdown_hook);
        }
        if let Some(v) = self.shutdown_hook_timeout {
            c.shutdown_hook_timeout_secs = v;
        }
        if self.coordinated_points {
            c.coordinated_points = true;
        }
        if let Some(v) = self.point_deadline_ms {
            c.point_deadline_ms = v;
        }
        if let Some(v) = self.pause_deadline {
            c.pause_deadline_secs = v;
        }
        if let Some(v) = self.trace_buffer_kb {
            c.trace.buffer_size_kb = v;
        }
    }
}

#[derive(Debug, clap::Args)]
struct Args {
    /// TOML configuration file (see AgentConfig for every field and its default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Process server address.
    #[arg(long = "ps")]
    process_server: Option<std::net::SocketAddr>,
    /// State directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A disk to protect, as ID=PATH (image file or block device); repeatable.
    #[arg(long = "disk", value_parser = parse_id_path)]
    disks: Vec<(String, PathBuf)>,
    /// Consistency group.
    #[arg(long)]
    group: Option<String>,
    /// Freeze this mounted file system for the final pass (app-consistent cut); repeatable.
    #[arg(long)]
    freeze: Vec<PathBuf>,
    /// Command quiescing the applications before an app-consistent point (`sh -c`).
    #[arg(long)]
    freeze_hook: Option<String>,
    /// Command resuming them afterwards (`sh -c`).
    #[arg(long)]
    thaw_hook: Option<String>,
    /// Chunk size in KiB.
    #[arg(long)]
    chunk_kib: Option<u32>,
    /// zstd level (0 = off).
    #[arg(long)]
    level: Option<i32>,
    /// Give up on an unreachable process server after this many seconds.
    #[arg(long)]
    retry_secs: Option<u64>,
    /// Return once the process server holds the data, without waiting for the master target.
    #[arg(long)]
    no_wait: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

impl Args {
    /// The configuration file with these flags over it, not yet validated.
    fn config(&self) -> anyhow::Result<AgentConfig> {
        let mut c: AgentConfig = match &self.config {
            Some(p) => load_toml(p).map_err(anyhow::Error::msg)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = self.process_server {
            c.process_server = v;
        }
        if let Some(v) = &self.state_dir {
            c.state_dir.clone_from(v);
        }
        for (id, path) in &self.disks {
            c.disks.push(DiskConfig {
                id: id.clone(),
                path: path.clone(),
            });
        }
        if let Some(v) = &self.group {
            c.group.clone_from(v);
        }
        c.freeze.extend(self.freeze.iter().cloned());
        if self.freeze_hook.is_some() {
            c.freeze_hook.clone_from(&self.freeze_hook);
        }
        if self.thaw_hook.is_some() {
            c.thaw_hook.clone_from(&self.thaw_hook);
        }
        if let Some(v) = self.chunk_kib {
            c.chunk_kib = v;
        }
        if let Some(v) = self.retry_secs {
            c.retry_secs = v;
        }
        if let Some(v) = self.level {
            c.compression_level = v;
        }
        self.tls.apply(&mut c.tls, &mut c.name);
        Ok(c)
    }
}

/// Entry point: parse, run, and turn any error into a one-line reason and exit 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("info");
    if let Err(e) = boomerang_common::faults::init_from_env() {
        return exit_code("boomerang-agent", Err(e));
    }
    exit_code(
        "boomerang-agent",
        dispatch(cli).map_err(|e| format!("{e:#}")),
    )
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let (args, interval, track) = match cli.command {
        Command::Sync(a) => (a, None, None),
        Command::Run { args, interval } => (args, Some(interval), None),
        Command::Track { args, track } => (args, None, Some(track)),
    };
    let mut config = args.config()?;
    if let Some(t) = &track {
        t.apply(&mut config);
    }
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let wait = if args.no_wait {
        Wait::ProcessServer
    } else {
        Wait::MasterTarget
    };
    let _lock = boomerang_common::durable::lock_dir(&config.state_dir, "agent")?;
    runtime().map_err(anyhow::Error::msg)?.block_on(async move {
        let shutdown = shutdown_on_signals();
        let endpoint = transport::client_endpoint(&config.tls).context("setting up QUIC")?;
        let hello = Message::Hello {
            role: Role::Agent,
            name: config.name.clone(),
            software: env!("CARGO_PKG_VERSION").into(),
        };
        let link = Arc::new(PsLink::new(
            endpoint,
            config.process_server,
            hello,
            Duration::from_secs(config.retry_secs),
        ));
        let every = interval.map(|i| Duration::from_secs(i.unwrap_or(config.interval_secs)));
        let syncer = Syncer::new(config, link.clone(), shutdown.clone());
        if track.is_some() {
            let result = match syncer.config.source {
                crate::config::TrackSource::Trace => syncer.track().await,
                crate::config::TrackSource::Intercept => syncer.track_intercept().await,
            };
            if let Ok(report) = &result {
                print_track_report(report, args.json);
            }
            link.close().await;
            return result.map(|_| ());
        }
        let result = loop {
            let r = syncer.sync(wait).await;
            match (&r, every) {
                (Ok(report), _) => print_report(report, args.json),
                (Err(e), Some(_)) => {
                    error!(error = %format!("{e:#}"), "sync failed; retrying at the next interval")
                }
                (Err(_), None) => {}
            }
            let Some(every) = every else {
                break r.map(|_| ());
            };
            let mut sd = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = sd.changed() => break Ok(()),
            }
            if *shutdown.borrow() {
                break Ok(());
            }
        };
        link.close().await;
        result
    })
}

fn print_report(report: &SyncReport, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => error!(error = %e, "cannot print the report"),
        }
        return;
    }
    for d in &report.disks {
        println!(
            "disk {}: read {} MiB, changed {} MiB in {} chunks ({} zero), payload {} MiB, tag {:?} at seq {:?}",
            d.disk,
            d.bytes_read >> 20,
            d.bytes_changed >> 20,
            d.chunks_changed,
            d.chunks_zero,
            d.bytes_payload >> 20,
            d.tag,
            d.tag_seq
        );
    }
    let read: u64 = report.disks.iter().map(|d| d.bytes_read).sum();
    println!(
        "synced in {:.2} s: {:.0} MB/s read, {} bytes on the wire",
        report.seconds,
        read as f64 / report.seconds.max(1e-9) / 1e6,
        report.wire_tx_bytes
    );
    info!(seconds = report.seconds, "sync done");
}

fn print_track_report(report: &crate::track_trace::TrackReport, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => error!(error = %e, "cannot print the report"),
        }
        return;
    }
    let mut p = report.pauses_ms.clone();
    p.sort_by(f64::total_cmp);
    if report.adopted > 0 {
        println!(
            "resumed from {} handed-over trace instance(s) without a rescan: {} KiB changed while down, durable after {:.0} ms",
            report.adopted,
            report.backlog_bytes >> 10,
            report.resume_ms.unwrap_or(0.0)
        );
    }
    for why in &report.not_adopted {
        println!("rescanned instead of adopting the trace instance of {why}");
    }
    println!(
        "tracked: {} batches, {} MiB shipped, {} points ({} abandoned), {} resyncs; pause median {:.1} ms, max {:.1} ms",
        report.batches,
        report.bytes_shipped >> 20,
        report.points,
        report.points_abandoned,
        report.resyncs,
        p.get(p.len() / 2).copied().unwrap_or(0.0),
        p.last().copied().unwrap_or(0.0)
    );
    match report.stopped {
        TrackStop::Signal => {}
        TrackStop::ShutDown => println!(
            "stopped for failover: final point {}, shutdown {}",
            report.final_point_id.map_or_else(
                || "none (the group's previous point is used)".to_string(),
                |id| id.to_string()
            ),
            if report.shut_down_reported {
                "reported to the master target"
            } else {
                "NOT reported to the master target (unreachable)"
            }
        ),
        TrackStop::Forgotten => println!(
            "stopped for failover: committed at the master target, this group's state forgotten"
        ),
    }
}
