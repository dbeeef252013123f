//! The Boomerang binaries' command lines and `--json` outputs, as the tests use them.
//!
//! This is the one place that knows flag names and JSON field names: when a binary's
//! interface changes, change it here. Parsed reports keep the whole JSON value
//! (`raw`) so a test can reach a new field before this module learns it.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The agent binary.
pub const AGENT_BIN: &str = "boomerang-agent";
/// The process-server binary.
pub const PS_BIN: &str = "boomerang-ps";
/// The master-target binary.
pub const MT_BIN: &str = "boomerang-mt";

/// A daemon's first stdout line once it serves: `listening on <ip:port>`.
pub const READY_PREFIX: &str = "listening on ";

/// `boomerang-mt pki init --dir D`: a new deployment CA, `D/ca.pem` and `D/ca.key`.
pub fn pki_init_args(dir: &Path) -> Vec<OsString> {
    vec!["pki".into(), "init".into(), "--dir".into(), dir.into()]
}

/// `boomerang-mt pki issue --dir D --role ROLE --name NAME`: writes `D/NAME.pem` and
/// `D/NAME.key`.
pub fn pki_issue_args(dir: &Path, role: &str, name: &str) -> Vec<OsString> {
    vec![
        "pki".into(),
        "issue".into(),
        "--dir".into(),
        dir.into(),
        "--role".into(),
        role.into(),
        "--name".into(),
        name.into(),
    ]
}

/// The certificate `pki issue` writes for `name` into `dir`.
pub fn pki_cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// The private key `pki issue` writes for `name` into `dir`.
pub fn pki_key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// `boomerang-mt run ...`.
#[derive(Debug, Clone)]
pub struct MtRunArgs {
    /// `--listen`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// `--pki-dir`.
    pub pki_dir: PathBuf,
    /// `--name`: the certificate to serve with.
    pub name: String,
    /// `--state-dir`: journal and replica metadata.
    pub state_dir: PathBuf,
    /// `--replica DISK=PATH`, one per disk with a preset replica target.
    pub replicas: Vec<(String, PathBuf)>,
    /// Appended verbatim.
    pub extra: Vec<OsString>,
}

impl MtRunArgs {
    /// The argument list.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into()];
        push_flag(&mut args, "--listen", self.listen.to_string());
        push_flag(&mut args, "--pki-dir", &self.pki_dir);
        push_flag(&mut args, "--name", &self.name);
        push_flag(&mut args, "--state-dir", &self.state_dir);
        for (disk, path) in &self.replicas {
            push_flag(&mut args, "--replica", disk_eq_path(disk, path));
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// `boomerang-ps run ...`.
#[derive(Debug, Clone)]
pub struct PsRunArgs {
    /// `--listen`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// `--pki-dir`.
    pub pki_dir: PathBuf,
    /// `--name`.
    pub name: String,
    /// `--spool-dir`.
    pub spool_dir: PathBuf,
    /// `--master-target`.
    pub master_target: SocketAddr,
    /// `--spool-max-mib`, when set.
    pub spool_max_mib: Option<u64>,
    /// Appended verbatim.
    pub extra: Vec<OsString>,
}

impl PsRunArgs {
    /// The argument list.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into()];
        push_flag(&mut args, "--listen", self.listen.to_string());
        push_flag(&mut args, "--pki-dir", &self.pki_dir);
        push_flag(&mut args, "--name", &self.name);
        push_flag(&mut args, "--spool-dir", &self.spool_dir);
        push_flag(&mut args, "--master-target", self.master_target.to_string());
        if let Some(mib) = self.spool_max_mib {
            push_flag(&mut args, "--spool-max-mib", mib.to_string());
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// `boomerang-agent sync ...`: one sync of the given disks, then exit 0.
#[derive(Debug, Clone)]
pub struct AgentSyncArgs {
    /// `--ps`.
    pub ps: SocketAddr,
    /// `--pki-dir`.
    pub pki_dir: PathBuf,
    /// `--name`.
    pub name: String,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--disk ID=PATH`, at least one.
    pub disks: Vec<(String, PathBuf)>,
    /// `--group`, when set.
    pub group: Option<String>,
    /// `--freeze MOUNTPOINT`, one per filesystem to quiesce for an app-consistent tag.
    pub freeze: Vec<PathBuf>,
    /// `--json`: print a [`SyncReport`] on stdout.
    pub json: bool,
    /// Appended verbatim.
    pub extra: Vec<OsString>,
}

impl AgentSyncArgs {
    /// Adds `--disk ID=PATH`.
    pub fn disk(mut self, id: &str, path: impl Into<PathBuf>) -> Self {
        self.disks.push((id.to_string(), path.into()));
        self
    }

    /// Sets `--group`.
    pub fn group(mut self, group: &str) -> Self {
        self.group = Some(group.to_string());
        self
    }

    /// Adds `--freeze MOUNTPOINT`.
    pub fn freeze(mut self, mountpoint: impl Into<PathBuf>) -> Self {
        self.freeze.push(mountpoint.into());
        self
    }

    /// The argument list.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["sync".into()];
        push_flag(&mut args, "--ps", self.ps.to_string());
        push_flag(&mut args, "--pki-dir", &self.pki_dir);
        push_flag(&mut args, "--name", &self.name);
        push_flag(&mut args, "--state-dir", &self.state_dir);
        for (disk, path) in &self.disks {
            push_flag(&mut args, "--disk", disk_eq_path(disk, path));
        }
        if let Some(group) = &self.group {
            push_flag(&mut args, "--group", group);
        }
        for mountpoint in &self.freeze {
            push_flag(&mut args, "--freeze", mountpoint);
        }
        if self.json {
            args.push("--json".into());
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The same disks and peers for `track --source intercept --serve-dir
    /// <serve_dir>` (continuous tracking, each disk served as a FUSE file).
    pub fn to_track_intercept_args(&self, serve_dir: &Path) -> Vec<OsString> {
        let mut args = self.to_args();
        args[0] = "track".into();
        push_flag(&mut args, "--source", "intercept");
        push_flag(&mut args, "--serve-dir", serve_dir);
        args
    }
}

/// `boomerang-mt status --state-dir S --json`.
pub fn mt_status_args(state_dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["status".into()];
    push_flag(&mut args, "--state-dir", state_dir);
    args.push("--json".into());
    args
}

fn push_flag(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

fn disk_eq_path(disk: &str, path: &Path) -> OsString {
    let mut s = OsString::from(disk);
    s.push("=");
    s.push(path);
    s
}

/// One disk's line of `agent sync --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSyncReport {
    /// Disk id.
    pub disk: String,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Raw bytes of the chunks that differed from the replica.
    pub bytes_changed: u64,
    /// Chunks that differed.
    pub chunks_changed: u64,
    /// Bytes of encoded payload shipped (after zero-skip and compression).
    pub bytes_payload: u64,
}

/// `agent sync --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    /// Per disk, in output order.
    pub disks: Vec<DiskSyncReport>,
    /// Bytes the agent sent on the wire.
    pub wire_tx_bytes: u64,
    /// Bytes the agent received on the wire.
    pub wire_rx_bytes: u64,
    /// Wall-clock seconds of the sync.
    pub seconds: f64,
    /// The whole JSON object.
    pub raw: Value,
}

impl SyncReport {
    /// Parses the report; panics naming the missing or mistyped field.
    pub fn from_json(v: &Value) -> SyncReport {
        let what = "agent sync --json";
        SyncReport {
            disks: array(v, "disks", what)
                .iter()
                .map(|d| DiskSyncReport {
                    disk: string(d, "disk", what),
                    bytes_read: uint(d, "bytes_read", what),
                    bytes_changed: uint(d, "bytes_changed", what),
                    chunks_changed: uint(d, "chunks_changed", what),
                    bytes_payload: uint(d, "bytes_payload", what),
                })
                .collect(),
            wire_tx_bytes: uint(v, "wire_tx_bytes", what),
            wire_rx_bytes: uint(v, "wire_rx_bytes", what),
            seconds: float(v, "seconds", what),
            raw: v.clone(),
        }
    }

    /// The report for disk `id`; panics when it is absent.
    pub fn disk(&self, id: &str) -> &DiskSyncReport {
        self.disks
            .iter()
            .find(|d| d.disk == id)
            .unwrap_or_else(|| panic!("agent sync report has no disk {id:?}: {}", self.raw))
    }

    /// Sum of `bytes_changed` over all disks.
    pub fn bytes_changed(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes_changed).sum()
    }

    /// Sum of `bytes_payload` over all disks.
    pub fn bytes_payload(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes_payload).sum()
    }
}

/// One replica's line of `mt status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtDiskStatus {
    /// Disk id.
    pub disk: String,
    /// Replica size in bytes.
    pub size: u64,
    /// Current generation.
    pub generation: u64,
    /// Next expected batch sequence number.
    pub next_seq: u64,
    /// Raw bytes applied to the replica.
    pub bytes_applied: u64,
    /// Whether the replica is at a consistent cut.
    pub consistent: bool,
    /// Kind of the latest cut: `"sync-complete"`, `"app-consistent"`, or none.
    pub cut: Option<String>,
    /// Extents rejected for a hash mismatch.
    pub integrity_failures: u64,
}

/// `mt status --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct MtStatus {
    /// Per replica, in output order.
    pub disks: Vec<MtDiskStatus>,
    /// The whole JSON object.
    pub raw: Value,
}

/// `cut` value of a replica at the end of a completed sync.
pub const CUT_SYNC_COMPLETE: &str = "sync-complete";
/// `cut` value of a replica at an app-consistent (frozen) point.
pub const CUT_APP_CONSISTENT: &str = "app-consistent";
/// `cut` value of a replica at a crash-consistent point.
pub const CUT_CRASH_CONSISTENT: &str = "crash-consistent";

impl MtStatus {
    /// Parses the status; panics naming the missing or mistyped field.
    pub fn from_json(v: &Value) -> MtStatus {
        let what = "mt status --json";
        MtStatus {
            disks: array(v, "disks", what)
                .iter()
                .map(|d| MtDiskStatus {
                    disk: string(d, "disk", what),
                    size: uint(d, "size", what),
                    generation: uint(d, "generation", what),
                    next_seq: uint(d, "next_seq", what),
                    bytes_applied: uint(d, "bytes_applied", what),
                    consistent: field(d, "consistent", what)
                        .as_bool()
                        .unwrap_or_else(|| panic!("{what}: `consistent` is not a bool in {d}")),
                    cut: match field(d, "cut", what) {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => {
                            panic!("{what}: `cut` is neither null nor a string: {other} in {d}")
                        }
                    },
                    integrity_failures: uint(d, "integrity_failures", what),
                })
                .collect(),
            raw: v.clone(),
        }
    }

    /// The state of group `group` (`syncing`, `protected`, `failover-pending`,
    /// `failed-back`, ...), or `None` when no disk of it is known.
    pub fn group_state(&self, group: &str) -> Option<String> {
        self.raw["groups"]
            .as_array()?
            .iter()
            .find(|g| g["group"] == group)
            .and_then(|g| g["state"].as_str())
            .map(str::to_string)
    }

    /// The status of disk `id`; panics when it is absent.
    pub fn disk(&self, id: &str) -> &MtDiskStatus {
        self.disks
            .iter()
            .find(|d| d.disk == id)
            .unwrap_or_else(|| panic!("mt status has no disk {id:?}: {}", self.raw))
    }
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("{what}: missing field `{key}` in {v}"))
}

fn uint(v: &Value, key: &str, what: &str) -> u64 {
    field(v, key, what)
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not an unsigned integer in {v}"))
}

fn float(v: &Value, key: &str, what: &str) -> f64 {
    field(v, key, what)
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a number in {v}"))
}

fn string(v: &Value, key: &str, what: &str) -> String {
    field(v, key, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a string in {v}"))
        .to_string()
}

fn array<'a>(v: &'a Value, key: &str, what: &str) -> &'a [Value] {
    field(v, key, what)
        .as_array()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not an array in {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn agent_sync_command_line() {
        let args = AgentSyncArgs {
            ps: "127.0.0.1:7000".parse().expect("literal address"),
            pki_dir: "/p".into(),
            name: "agent1".into(),
            state_dir: "/s".into(),
            disks: vec![],
            group: None,
            freeze: vec![],
            json: true,
            extra: vec![],
        }
        .disk("d0", "/img0")
        .disk("d1", "/img1")
        .group("g")
        .freeze("/mnt");
        assert_eq!(
            strings(&args.to_args()).join(" "),
            "sync --ps 127.0.0.1:7000 --pki-dir /p --name agent1 --state-dir /s \
             --disk d0=/img0 --disk d1=/img1 --group g --freeze /mnt --json"
        );
    }

    #[test]
    fn daemon_command_lines() {
        let mt = MtRunArgs {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            pki_dir: "/p".into(),
            name: "mt1".into(),
            state_dir: "/mt".into(),
            replicas: vec![("d0".into(), "/r0".into())],
            extra: vec![],
        };
        assert_eq!(
            strings(&mt.to_args()).join(" "),
            "run --listen 127.0.0.1:0 --pki-dir /p --name mt1 --state-dir /mt --replica d0=/r0"
        );
        let ps = PsRunArgs {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            pki_dir: "/p".into(),
            name: "ps1".into(),
            spool_dir: "/sp".into(),
            master_target: "127.0.0.1:9".parse().expect("literal address"),
            spool_max_mib: Some(64),
            extra: vec![],
        };
        assert_eq!(
            strings(&ps.to_args()).join(" "),
            "run --listen 127.0.0.1:0 --pki-dir /p --name ps1 --spool-dir /sp \
             --master-target 127.0.0.1:9 --spool-max-mib 64"
        );
        assert_eq!(
            strings(&mt_status_args(Path::new("/mt"))).join(" "),
            "status --state-dir /mt --json"
        );
        assert_eq!(
            strings(&pki_issue_args(Path::new("/p"), "ps", "ps1")).join(" "),
            "pki issue --dir /p --role ps --name ps1"
        );
    }

    #[test]
    fn reports_parse() {
        let sync: Value = serde_json::from_str(
            r#"{"disks":[{"disk":"d0","bytes_read":10,"bytes_changed":4,"chunks_changed":1,"bytes_payload":2}],
                "wire_tx_bytes":100,"wire_rx_bytes":50,"seconds":0.5}"#,
        )
        .expect("literal JSON");
        let r = SyncReport::from_json(&sync);
        assert_eq!(r.disk("d0").chunks_changed, 1);
        assert_eq!(
            (r.bytes_changed(), r.bytes_payload(), r.wire_tx_bytes),
            (4, 2, 100)
        );

        let status: Value = serde_json::from_str(
            r#"{"disks":[{"disk":"d0","size":8,"generation":1,"next_seq":3,"bytes_applied":8,
                "consistent":true,"cut":"sync-complete","integrity_failures":0},
               {"disk":"d1","size":8,"generation":1,"next_seq":0,"bytes_applied":0,
                "consistent":false,"cut":null,"integrity_failures":2}]}"#,
        )
        .expect("literal JSON");
        let s = MtStatus::from_json(&status);
        assert_eq!(s.disk("d0").cut.as_deref(), Some(CUT_SYNC_COMPLETE));
        assert!(!s.disk("d1").consistent && s.disk("d1").cut.is_none());
        assert_eq!(s.disk("d1").integrity_failures, 2);
    }

    #[test]
    #[should_panic(expected = "missing field `wire_tx_bytes`")]
    fn missing_field_is_named() {
        SyncReport::from_json(&serde_json::json!({"disks": []}));
    }
}

/// `boomerang-mt points --state-dir S --group G --json`.
pub fn mt_points_args(state_dir: &Path, group: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["points".into()];
    push_flag(&mut args, "--state-dir", state_dir);
    push_flag(&mut args, "--group", group);
    args.push("--json".into());
    args
}

/// One recovery point of `boomerang-mt points --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PointInfo {
    /// Point id.
    pub id: u64,
    /// `crash-consistent` or `app-consistent`.
    pub kind: String,
    /// Wall time of the point (ms since the epoch).
    pub time_ms: u64,
    /// The disks whose cuts make the point (every disk of the group).
    pub disks: Vec<String>,
    /// Marked the newest point here.
    pub latest_processed: bool,
    /// Marked the newest app-consistent point.
    pub latest_app: bool,
}

/// Parses `points --json`; panics naming the missing or mistyped field.
pub fn parse_points(v: &Value) -> Vec<PointInfo> {
    let what = "mt points --json";
    array(v, "points", what)
        .iter()
        .map(|p| PointInfo {
            id: uint(p, "id", what),
            kind: string(p, "kind", what),
            time_ms: uint(p, "time_ms", what),
            disks: array(p, "disks", what)
                .iter()
                .map(|d| {
                    d.as_str()
                        .unwrap_or_else(|| panic!("{what}: a disk is not a string in {p}"))
                        .to_string()
                })
                .collect(),
            latest_processed: field(p, "latest_processed", what).as_bool() == Some(true),
            latest_app: field(p, "latest_app", what).as_bool() == Some(true),
        })
        .collect()
}

/// `boomerang-mt OP --state-dir S --group G MORE...` for the failback commands
/// (`failover`, `test-failover`, `commit`, `reprotect`, `protect`).
pub fn mt_group_op_args(
    op: &str,
    state_dir: &Path,
    group: &str,
    more: &[OsString],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![op.into()];
    push_flag(&mut args, "--state-dir", state_dir);
    push_flag(&mut args, "--group", group);
    args.extend(more.iter().cloned());
    args
}

/// `--point P` plus one `--to DISK=PATH` per target.
pub fn point_to_args(point: &str, targets: &[(String, PathBuf)]) -> Vec<OsString> {
    let mut args = Vec::new();
    push_flag(&mut args, "--point", point);
    for (disk, path) in targets {
        push_flag(&mut args, "--to", disk_eq_path(disk, path));
    }
    args
}
