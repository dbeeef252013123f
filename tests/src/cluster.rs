//! A master target and a process server, started in that order on free localhost
//! ports, sharing one [`TestPki`] and one scratch directory; plus running agent syncs
//! and master-target status against them.
//!
//! Scratch layout: `mt-state/`, `ps-spool/`, `agent-<name>/` (agent state),
//! `logs/<label>.log` (each daemon's and agent's output), and whatever the test puts
//! under [`Cluster::root`] (images, mount points).

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use crate::cli::{self, AgentSyncArgs, MtRunArgs, MtStatus, PsRunArgs, SyncReport};
use crate::pki::{TestPki, STANDARD_PEERS};
use crate::process::{
    bin, describe, failure_message, run, run_json, scratch_dir, Daemon, DaemonSpec,
};

const MT_NAME: &str = "mt1";
const PS_NAME: &str = "ps1";

/// What differs between test clusters.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// `--replica DISK=PATH` for the master target.
    pub replicas: Vec<(String, PathBuf)>,
    /// `--spool-max-mib` for the process server.
    pub spool_max_mib: Option<u64>,
    /// Extra master-target arguments.
    pub mt_extra: Vec<OsString>,
    /// Extra process-server arguments.
    pub ps_extra: Vec<OsString>,
    /// Certificates to issue besides agent1/ps1/mt1: `(name, role)`.
    pub extra_peers: Vec<(String, String)>,
    /// `--state-dir` of the master target, when not `<root>/mt-state` (e.g. on a small
    /// loop file system or a power-cut mount).
    pub mt_state_dir: Option<PathBuf>,
    /// `--spool-dir` of the process server, when not `<root>/ps-spool`.
    pub ps_spool_dir: Option<PathBuf>,
    /// Environment of the master target (e.g. `BOOMERANG_FAULTS`).
    pub mt_env: Vec<(String, String)>,
    /// Environment of the process server.
    pub ps_env: Vec<(String, String)>,
}

/// A running master target (`mt1`) and process server (`ps1`) with an enrolled
/// `agent1`. Dropping it kills both daemons, then removes the PKI and scratch.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: processes die before their directories go.
    ps: Daemon,
    mt: Daemon,
    pki: TestPki,
    mt_state_dir: PathBuf,
    ps_spool_dir: PathBuf,
    root: TempDir,
}

impl Cluster {
    /// Issues the PKI, starts the master target, then the process server pointed at it.
    pub fn start(config: ClusterConfig) -> Cluster {
        let root = scratch_dir("cluster");
        let pki = TestPki::standard();
        for (name, role) in &config.extra_peers {
            pki.issue(name, role);
        }
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let mt_state_dir = config
            .mt_state_dir
            .clone()
            .unwrap_or_else(|| root.path().join("mt-state"));
        let ps_spool_dir = config
            .ps_spool_dir
            .clone()
            .unwrap_or_else(|| root.path().join("ps-spool"));
        let mt_args = MtRunArgs {
            listen: any_port,
            pki_dir: pki.dir().to_path_buf(),
            name: MT_NAME.to_string(),
            state_dir: mt_state_dir.clone(),
            replicas: config.replicas.clone(),
            extra: config.mt_extra.clone(),
        };
        let mut mt_spec = daemon_spec(root.path(), "mt", cli::MT_BIN, mt_args.to_args());
        for (k, v) in &config.mt_env {
            mt_spec = mt_spec.env(k, v);
        }
        let mt = Daemon::start(mt_spec);
        let ps_args = PsRunArgs {
            listen: any_port,
            pki_dir: pki.dir().to_path_buf(),
            name: PS_NAME.to_string(),
            spool_dir: ps_spool_dir.clone(),
            master_target: mt.addr(),
            spool_max_mib: config.spool_max_mib,
            extra: config.ps_extra.clone(),
        };
        let mut ps_spec = daemon_spec(root.path(), "ps", cli::PS_BIN, ps_args.to_args());
        for (k, v) in &config.ps_env {
            ps_spec = ps_spec.env(k, v);
        }
        let ps = Daemon::start(ps_spec);
        Cluster {
            ps,
            mt,
            pki,
            mt_state_dir,
            ps_spool_dir,
            root,
        }
    }

    /// The scratch directory, for the test's own files.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Where daemon and agent logs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.root().join("logs")
    }

    /// The PKI.
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The master target daemon.
    pub fn mt(&mut self) -> &mut Daemon {
        &mut self.mt
    }

    /// The process server daemon.
    pub fn ps(&mut self) -> &mut Daemon {
        &mut self.ps
    }

    /// The master target's address.
    pub fn mt_addr(&self) -> SocketAddr {
        self.mt.addr()
    }

    /// The process server's address.
    pub fn ps_addr(&self) -> SocketAddr {
        self.ps.addr()
    }

    /// The master target's `--state-dir`.
    pub fn mt_state_dir(&self) -> PathBuf {
        self.mt_state_dir.clone()
    }

    /// The process server's `--spool-dir`.
    pub fn ps_spool_dir(&self) -> PathBuf {
        self.ps_spool_dir.clone()
    }

    /// Restarts the master target on the same address and state (SIGKILLing it first
    /// if it still runs: call [`Daemon::terminate`] before for a clean stop).
    pub fn restart_mt(&mut self) {
        self.mt.kill9();
        let spec = rebind(self.mt.spec(), self.mt.addr());
        self.mt = Daemon::start(spec);
    }

    /// Restarts the process server on the same address and spool, like
    /// [`Cluster::restart_mt`].
    pub fn restart_ps(&mut self) {
        self.restart_ps_with(|spec| spec);
    }

    /// Restarts the process server like [`Cluster::restart_ps`], with its spec changed
    /// by `change` (e.g. another `BOOMERANG_FAULTS`, or `""` for none). Also for a
    /// process server that already exited.
    pub fn restart_ps_with(&mut self, change: impl FnOnce(DaemonSpec) -> DaemonSpec) {
        if self.ps.is_running() {
            self.ps.kill9();
        }
        let spec = change(rebind(self.ps.spec(), self.ps.addr()));
        self.ps = Daemon::start(spec);
    }

    /// [`Cluster::restart_ps_with`] for the master target.
    pub fn restart_mt_with(&mut self, change: impl FnOnce(DaemonSpec) -> DaemonSpec) {
        if self.mt.is_running() {
            self.mt.kill9();
        }
        let spec = change(rebind(self.mt.spec(), self.mt.addr()));
        self.mt = Daemon::start(spec);
    }

    /// Sync arguments for agent `name` (enrolled in the PKI) against this process
    /// server, with state in `agent-<name>/` and `--json`; add disks to it.
    pub fn agent(&self, name: &str) -> AgentSyncArgs {
        AgentSyncArgs {
            ps: self.ps_addr(),
            pki_dir: self.pki.dir().to_path_buf(),
            name: name.to_string(),
            state_dir: self.root().join(format!("agent-{name}")),
            disks: Vec::new(),
            group: None,
            freeze: Vec::new(),
            json: true,
            extra: Vec::new(),
        }
    }

    /// [`Cluster::agent`] for the standard `agent1`.
    pub fn agent1(&self) -> AgentSyncArgs {
        self.agent(STANDARD_PEERS[0].0)
    }

    /// The agent command for `args`, with the daemons' log environment.
    pub fn agent_command(&self, args: &AgentSyncArgs) -> Command {
        boomerang_command(cli::AGENT_BIN, args.to_args())
    }

    /// Runs one agent sync and returns its output whatever the exit status (for tests
    /// that expect a refusal). Its stderr is appended to `logs/agent-<name>.log`.
    pub fn agent_sync_output(&self, args: &AgentSyncArgs) -> Output {
        let mut cmd = self.agent_command(args);
        let out = run(&mut cmd);
        self.append_log(&format!("agent-{}", args.name), &cmd, &out);
        out
    }

    /// Runs one agent sync (forcing `--json`), panics unless it exits 0, and returns its
    /// report.
    pub fn agent_sync(&self, args: &AgentSyncArgs) -> SyncReport {
        let args = AgentSyncArgs {
            json: true,
            ..args.clone()
        };
        let mut cmd = self.agent_command(&args);
        let out = run(&mut cmd);
        self.append_log(&format!("agent-{}", args.name), &cmd, &out);
        if !out.status.success() {
            panic!("{}", failure_message(&cmd, &out));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("`{}` printed invalid JSON ({e}):\n{stdout}", describe(&cmd))
        });
        SyncReport::from_json(&json)
    }

    /// `boomerang-mt status --json` on this master target's state.
    pub fn mt_status(&self) -> MtStatus {
        let json = run_json(&mut boomerang_command(
            cli::MT_BIN,
            cli::mt_status_args(&self.mt_state_dir()),
        ));
        MtStatus::from_json(&json)
    }

    /// The recovery points of `group` (`boomerang-mt points --json`).
    pub fn mt_points(&self, group: &str) -> Vec<cli::PointInfo> {
        cli::parse_points(&run_json(&mut boomerang_command(
            cli::MT_BIN,
            cli::mt_points_args(&self.mt_state_dir(), group),
        )))
    }

    /// Runs a failback command (`failover`, `test-failover`, `commit`, ...) of `group`
    /// against this master target and returns its output whatever the exit status.
    pub fn mt_op_output(&self, op: &str, group: &str, more: &[OsString]) -> Output {
        let mut cmd = boomerang_command(
            cli::MT_BIN,
            cli::mt_group_op_args(op, &self.mt_state_dir(), group, more),
        );
        let out = run(&mut cmd);
        self.append_log("mt-ops", &cmd, &out);
        out
    }

    /// Starts a failback command as a child (output to `logs/mt-ops-child.log`), for
    /// tests that kill the master target while it runs.
    pub fn mt_op_child(&self, op: &str, group: &str, more: &[OsString]) -> std::process::Child {
        let _ = std::fs::create_dir_all(self.logs_dir());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs_dir().join("mt-ops-child.log"))
            .expect("open the mt-ops-child log");
        let err = log.try_clone().expect("clone the log handle");
        boomerang_command(
            cli::MT_BIN,
            cli::mt_group_op_args(op, &self.mt_state_dir(), group, more),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .expect("start boomerang-mt")
    }

    /// [`Cluster::mt_op_output`] that panics unless it exits 0; returns stdout.
    pub fn mt_op(&self, op: &str, group: &str, more: &[OsString]) -> String {
        let out = self.mt_op_output(op, group, more);
        if !out.status.success() {
            panic!(
                "boomerang-mt {op} --group {group} failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn append_log(&self, label: &str, cmd: &Command, out: &Output) {
        let path = self.logs_dir().join(format!("{label}.log"));
        let _ = std::fs::create_dir_all(self.logs_dir());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        if let Ok(mut file) = file {
            let _ = writeln!(file, "=== `{}`: {}", describe(cmd), out.status);
            let _ = file.write_all(&out.stderr);
        }
    }
}

/// A Boomerang binary command with `RUST_LOG` from
/// [`daemon_log_filter`](crate::process::daemon_log_filter) and `RUST_BACKTRACE=1`.
pub fn boomerang_command(name: &str, args: Vec<OsString>) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.args(args)
        .env("RUST_LOG", crate::process::daemon_log_filter())
        .env("RUST_BACKTRACE", "1");
    cmd
}

fn daemon_spec(root: &Path, label: &str, bin_name: &str, args: Vec<OsString>) -> DaemonSpec {
    DaemonSpec::new(label, bin(bin_name), &root.join("logs")).args(args)
}

/// The same spec listening on `addr` instead of what `--listen` said.
fn rebind(spec: &DaemonSpec, addr: SocketAddr) -> DaemonSpec {
    let mut args = spec.args_list().to_vec();
    let at = args
        .iter()
        .position(|a| a == "--listen")
        .expect("daemon arguments carry --listen");
    args[at + 1] = addr.to_string().into();
    spec.clone().with_args(args)
}
