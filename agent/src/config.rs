//! The agent's configuration (TOML, every field defaulted).

use std::net::SocketAddr;
use std::path::PathBuf;

use boomerang_common::config::TlsPaths;
use boomerang_common::message::{TagKind, CHUNK_SIZE_RANGE};
use serde::{Deserialize, Serialize};

/// Where continuous tracking finds changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrackSource {
    /// Kernel block write tracepoints on the workload's own block device.
    Trace,
    /// The agent serves the disk through FUSE and journals every write in order.
    Intercept,
}

/// One protected disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Stable disk id (A-Z a-z 0-9 . _ -).
    pub id: String,
    /// Image file or block device.
    pub path: PathBuf,
}

/// `boomerang-agent` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name (its certificate is `<name>.pem`).
    /// Default: `agent`.
    pub name: String,
    /// Process server address.
    /// Default: `127.0.0.1:7701`.
    pub process_server: SocketAddr,
    /// Where the agent keeps its per-disk state.
    /// Default: `/var/lib/boomerang-agent`.
    pub state_dir: PathBuf,
    /// Consistency group of this agent's disks.
    /// Default: the agent's name.
    pub group: String,
    /// Disks to protect. Default: none.
    pub disks: Vec<DiskConfig>,
    /// Chunk size in KiB (hash and ship granularity; power of two, 4 to 4096).
    /// Default: 64.
    pub chunk_kib: u32,
    /// zstd level (0 = no compression).
    /// Default: 1.
    pub compression_level: i32,
    /// Raw bytes per batch in MiB.
    /// Default: 4.
    pub batch_mib: u32,
    /// Batches in flight to the process server.
    /// Default: 8.
    pub in_flight: usize,
    /// Worker threads hashing and compressing.
    /// Default: the number of cores.
    pub workers: usize,
    /// Mount points to freeze for the final pass of a sync (app-consistent cut).
    /// Default: none.
    pub freeze: Vec<PathBuf>,
    /// Operator's command (run with `sh -c`) that quiesces the applications before an
    /// app-consistent point; a non-zero exit abandons the point. Default: none.
    pub freeze_hook: Option<String>,
    /// Operator's command run after an app-consistent point (also after a failed
    /// freeze hook). Default: none.
    pub thaw_hook: Option<String>,
    /// Longest a freeze may hold writes, in seconds; then it is undone and the
    /// app-consistent point abandoned.
    /// Default: 60.
    pub freeze_deadline_secs: f64,
    /// How long a request keeps retrying an unreachable process server, in seconds.
    /// Default: 600.
    pub retry_secs: u64,
    /// How long a sync waits for the master target to move at all past its last
    /// records, in seconds, before it gives up (a record it needs was refused or
    /// lost); the next sync then starts a new generation. Longer than the master
    /// target's gap timeout (120 s), so a gap it can still fill is waited for.
    /// Default: 180.
    pub drain_stall_secs: u64,
    /// Seconds between syncs in `run` mode.
    /// Default: 300.
    pub interval_secs: u64,
    /// Continuous tracking (`track`): how often dirty blocks are shipped, in ms.
    /// Default: 1000.
    pub ship_interval_ms: u64,
    /// Continuous tracking: seconds between crash-consistent points (1 or more).
    /// Default: 300.
    pub crash_interval_secs: f64,
    /// Continuous tracking: seconds between app-consistent points.
    /// Default: 3600.
    pub app_interval_secs: f64,
    /// Longest a consistency point may hold writes, in seconds; then it is undone and
    /// the point abandoned.
    /// Default: 2.
    pub pause_deadline_secs: f64,
    /// Continuous tracking source: `trace` (the workload keeps its block device; kernel
    /// write tracepoints) or `intercept` (the agent serves the disk as a file through
    /// FUSE under `serve_dir`; write-order fidelity).
    /// Default: `trace`.
    pub source: TrackSource,
    /// Intercept source: directory under which each disk is served as
    /// `<serve_dir>/<disk id>/disk`. Default: none.
    pub serve_dir: Option<PathBuf>,
    /// Intercept source: journal capacity per disk in MiB; when full the disk drops to
    /// bitmap mode until it catches up.
    /// Default: 1024.
    pub journal_mib: u64,
    /// Continuous tracking: seconds between check-ins with the master target (through
    /// the process server) for the group's directive (keep going, shut down for a
    /// failover, forget the group after a committed failover).
    /// Default: 2.
    pub control_interval_secs: f64,
    /// Operator's command (run with `sh -c`, in its own process group, output logged)
    /// that stops the workload once the group's final point before a failover is
    /// durable at the process server. Default: none (the operator stops the workload).
    pub shutdown_hook: Option<String>,
    /// Longest the shutdown hook may run, in seconds; then it is killed and the agent
    /// stops with an error, without reporting the shutdown.
    /// Default: 300.
    pub shutdown_hook_timeout_secs: f64,
    /// Continuous tracking: take interval points together with the group's other
    /// agents. Points fall on wall-clock multiples of the interval and carry that
    /// time as their point id; each agent pauses its writes, tells the master target
    /// it is ready, and tags only if every disk of the group was ready in time (the
    /// agents' clocks must agree, e.g. by NTP).
    /// Default: false.
    pub coordinated_points: bool,
    /// Coordinated points: how long an agent holds writes waiting for the group, in
    /// ms; must be below `pause_deadline_secs`.
    /// Default: 1500.
    pub point_deadline_ms: u64,
    /// Kernel write tracing settings (`[trace]`: ring buffer size, which also bounds
    /// how much a cleanly stopped agent may miss before its next start has to rescan
    /// rather than adopt the trace instance it handed over; hand-over on or off;
    /// health checks). See [`crate::trace::TraceOptions`].
    pub trace: crate::trace::TraceOptions,
    /// TLS identity. Default: none (set it, or pass --pki-dir).
    pub tls: TlsPaths,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: "agent".into(),
            process_server: SocketAddr::from(([127, 0, 0, 1], 7701)),
            state_dir: PathBuf::from("/var/lib/boomerang-agent"),
            group: String::new(),
            disks: Vec::new(),
            chunk_kib: 64,
            compression_level: 1,
            batch_mib: 4,
            in_flight: 8,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            freeze: Vec::new(),
            freeze_hook: None,
            thaw_hook: None,
            freeze_deadline_secs: 60.0,
            retry_secs: 600,
            drain_stall_secs: 180,
            interval_secs: 300,
            ship_interval_ms: 1000,
            crash_interval_secs: 300.0,
            app_interval_secs: 3600.0,
            pause_deadline_secs: 2.0,
            source: TrackSource::Trace,
            serve_dir: None,
            journal_mib: 1024,
            control_interval_secs: 2.0,
            shutdown_hook: None,
            shutdown_hook_timeout_secs: 300.0,
            coordinated_points: false,
            point_deadline_ms: 1500,
            trace: crate::trace::TraceOptions::default(),
            tls: TlsPaths::default(),
        }
    }
}

impl AgentConfig {
    /// Checks the configuration before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        self.tls.validate()?;
        if self.disks.is_empty() {
            return Err(
                "no disks to protect: add [[disks]] to the config or pass --disk ID=PATH".into(),
            );
        }
        for d in &self.disks {
            boomerang_common::delta::validate_disk_id(&d.id)?;
        }
        let cs = self.chunk_kib.saturating_mul(1024);
        if !cs.is_power_of_two() || cs < CHUNK_SIZE_RANGE.0 || cs > CHUNK_SIZE_RANGE.1 {
            return Err(format!(
                "chunk_kib = {} must be a power of two from 4 to 4096",
                self.chunk_kib
            ));
        }
        if self.batch_mib == 0
            || self.batch_mib > 16
            || u64::from(self.batch_mib) * 1024 < u64::from(self.chunk_kib)
        {
            return Err(format!(
                "batch_mib = {} must be 1 to 16 and hold at least one chunk",
                self.batch_mib
            ));
        }
        if !(0..=19).contains(&self.compression_level) {
            return Err(format!(
                "compression_level = {} must be 0 to 19",
                self.compression_level
            ));
        }
        if self.in_flight == 0 || self.in_flight > 64 {
            return Err("in_flight must be 1 to 64".into());
        }
        if self.workers == 0 || self.workers > 256 {
            return Err("workers must be 1 to 256".into());
        }
        if !(10..=600_000).contains(&self.ship_interval_ms) {
            return Err("ship_interval_ms must be 10 to 600000".into());
        }
        for (name, v, min) in [
            ("crash_interval_secs", self.crash_interval_secs, 1.0),
            ("app_interval_secs", self.app_interval_secs, 1.0),
            ("pause_deadline_secs", self.pause_deadline_secs, 0.05),
            ("control_interval_secs", self.control_interval_secs, 0.1),
            (
                "shutdown_hook_timeout_secs",
                self.shutdown_hook_timeout_secs,
                1.0,
            ),
        ] {
            if v.is_nan() || v < min {
                return Err(format!("{name} = {v} must be at least {min}"));
            }
        }
        self.trace.validate()?;
        if self.drain_stall_secs == 0 {
            return Err("drain_stall_secs must be at least 1".into());
        }
        if self.journal_mib == 0 {
            return Err("journal_mib must be at least 1".into());
        }
        if self.freeze_deadline_secs.is_nan() || self.freeze_deadline_secs <= 0.0 {
            return Err("freeze_deadline_secs must be positive".into());
        }
        if self
            .shutdown_hook
            .as_deref()
            .is_some_and(|h| h.trim().is_empty())
        {
            return Err("shutdown_hook is empty: leave it out to stop the workload by hand".into());
        }
        if self.coordinated_points {
            let pause_ms = self.pause_deadline_secs * 1000.0;
            if self.point_deadline_ms < 100 || self.point_deadline_ms as f64 >= pause_ms {
                return Err(format!(
                    "point_deadline_ms = {} must be at least 100 and below pause_deadline_secs \
                     ({pause_ms:.0} ms): writes stay paused while the group decides",
                    self.point_deadline_ms
                ));
            }
        }
        Ok(())
    }

    /// The operator's quiesce hooks for app-consistent points.
    pub fn hooks(&self) -> crate::freeze::Hooks {
        crate::freeze::Hooks {
            freeze: self.freeze_hook.clone(),
            thaw: self.thaw_hook.clone(),
        }
    }

    /// Seconds between crash-consistent (`kind` crash) or app-consistent points, in
    /// whole ms: the slot width of coordinated points.
    pub fn interval_ms(&self, kind: TagKind) -> u64 {
        let secs = match kind {
            TagKind::AppConsistent => self.app_interval_secs,
            _ => self.crash_interval_secs,
        };
        let ms = std::time::Duration::from_secs_f64(secs.max(0.001)).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }

    /// The ids of this agent's disks.
    pub fn disk_ids(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.id.clone()).collect()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_kib * 1024
    }

    /// The group tags carry.
    pub fn group(&self) -> String {
        if self.group.is_empty() {
            self.name.clone()
        } else {
            self.group.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses_and_validates() -> Result<(), String> {
        let c: AgentConfig = toml::from_str(
            r#"
            name = "vm1"
            process_server = "10.0.0.5:7701"
            state_dir = "/var/lib/boomerang-agent"
            freeze = ["/"]
            [tls]
            ca = "/etc/boomerang/ca.pem"
            cert = "/etc/boomerang/vm1.pem"
            key = "/etc/boomerang/vm1.key"
            [[disks]]
            id = "vm1-disk0"
            path = "/dev/vda"
            "#,
        )
        .map_err(|e| e.to_string())?;
        c.validate()?;
        assert_eq!(c.chunk_size(), 65536);
        assert_eq!(c.group(), "vm1");
        Ok(())
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let mut c = AgentConfig {
            tls: TlsPaths::in_dir(std::path::Path::new("/pki"), "a"),
            disks: vec![DiskConfig {
                id: "d".into(),
                path: "/dev/null".into(),
            }],
            ..AgentConfig::default()
        };
        assert!(c.validate().is_ok());
        c.chunk_kib = 48;
        assert!(c.validate().is_err_and(|e| e.contains("chunk_kib")));
        c.chunk_kib = 64;
        c.disks.clear();
        assert!(c.validate().is_err_and(|e| e.contains("no disks")));
        assert!(
            toml::from_str::<AgentConfig>("chunk_kb = 64").is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn control_and_coordinated_point_settings_are_checked() -> Result<(), String> {
        let mut c: AgentConfig = toml::from_str(
            r#"
            control_interval_secs = 0.5
            shutdown_hook = "systemctl stop db"
            coordinated_points = true
            point_deadline_ms = 1200
            [tls]
            ca = "/pki/ca.pem"
            cert = "/pki/a.pem"
            key = "/pki/a.key"
            [[disks]]
            id = "d"
            path = "/dev/null"
            "#,
        )
        .map_err(|e| e.to_string())?;
        c.validate()?;
        assert_eq!(AgentConfig::default().point_deadline_ms, 1500);
        assert!(!AgentConfig::default().coordinated_points);
        assert_eq!(AgentConfig::default().control_interval_secs, 2.0);
        // The group's wait holds writes: it must end before the pause deadline does.
        c.point_deadline_ms = 2000;
        assert!(c.validate().is_err_and(|e| e.contains("point_deadline_ms")));
        c.coordinated_points = false;
        assert!(c.validate().is_ok(), "only checked for coordinated points");
        c.coordinated_points = true;
        c.point_deadline_ms = 50;
        assert!(c.validate().is_err_and(|e| e.contains("point_deadline_ms")));
        c.point_deadline_ms = 1500;
        c.control_interval_secs = 0.0;
        assert!(c
            .validate()
            .is_err_and(|e| e.contains("control_interval_secs")));
        c.control_interval_secs = 2.0;
        c.shutdown_hook = Some("  ".into());
        assert!(c.validate().is_err_and(|e| e.contains("shutdown_hook")));
        c.shutdown_hook = None;
        c.shutdown_hook_timeout_secs = 0.0;
        assert!(c
            .validate()
            .is_err_and(|e| e.contains("shutdown_hook_timeout_secs")));
        Ok(())
    }

    #[test]
    fn interval_ms_is_the_slot_width() {
        let c = AgentConfig {
            crash_interval_secs: 5.0,
            app_interval_secs: 60.5,
            ..AgentConfig::default()
        };
        assert_eq!(c.interval_ms(TagKind::CrashConsistent), 5000);
        assert_eq!(c.interval_ms(TagKind::AppConsistent), 60_500);
    }
}
