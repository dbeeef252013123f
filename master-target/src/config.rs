//! The master target's configuration (TOML, every field defaulted).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use boomerang_common::config::TlsPaths;

use crate::retention_plan::RetentionPolicy;
use serde::{Deserialize, Serialize};

/// `boomerang-mt run` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtConfig {
    /// This instance's name (its certificate is `<name>.pem`).
    /// Default: `mt`.
    pub name: String,
    /// UDP address to listen on for process servers.
    /// Default: `0.0.0.0:7700`.
    pub listen: SocketAddr,
    /// Where disk records and default replicas live.
    /// Default: `/var/lib/boomerang-mt`.
    pub state_dir: PathBuf,
    /// TLS identity. Default: none (set it, or pass --pki-dir).
    pub tls: TlsPaths,
    /// Replica location per disk id (image file or block device); disks not listed get
    /// `<state_dir>/replicas/<disk>.img`. Default: empty.
    pub replicas: BTreeMap<String, PathBuf>,
    /// Where the retention journals live (best on storage of their own).
    /// Default: `<state_dir>/retention`.
    pub retention_dir: Option<PathBuf>,
    /// Which recovery points to keep. Default: see [`RetentionPolicy`].
    pub retention: RetentionPolicy,
    /// Retention journal segment size in MiB: pruning frees whole segments.
    /// Default: 64.
    pub journal_segment_mib: u64,
    /// How often the retention policy is applied, in seconds. Default: 10.
    pub prune_interval_secs: u64,
    /// How long `failover --point latest` waits for the group's agents to ship what
    /// they hold and shut down, in seconds. Default: 120.
    pub drain_timeout_secs: u64,
}

impl Default for MtConfig {
    fn default() -> Self {
        MtConfig {
            name: "mt".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7700)),
            state_dir: PathBuf::from("/var/lib/boomerang-mt"),
            tls: TlsPaths::default(),
            replicas: BTreeMap::new(),
            retention_dir: None,
            retention: RetentionPolicy::default(),
            journal_segment_mib: 64,
            prune_interval_secs: 10,
            drain_timeout_secs: 120,
        }
    }
}

impl MtConfig {
    /// Checks the configuration before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        self.tls.validate()?;
        for disk in self.replicas.keys() {
            boomerang_common::delta::validate_disk_id(disk)
                .map_err(|e| format!("replicas: {e}"))?;
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err("state_dir is empty".into());
        }
        self.retention
            .validate()
            .map_err(|e| format!("retention: {e}"))?;
        if self.prune_interval_secs == 0
            || self.drain_timeout_secs == 0
            || self.journal_segment_mib == 0
        {
            return Err("prune_interval_secs, drain_timeout_secs and journal_segment_mib must be at least 1".into());
        }
        Ok(())
    }

    /// The retention directory in effect.
    pub fn retention_dir(&self) -> PathBuf {
        self.retention_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("retention"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_map_disks_to_devices_and_are_checked() -> Result<(), String> {
        let c: MtConfig = toml::from_str(
            "state_dir = \"/srv/mt\"\n[tls]\nca = \"c\"\ncert = \"m\"\nkey = \"k\"\n[replicas]\n\"vm1-disk0\" = \"/dev/sdb\"\n",
        )
        .map_err(|e| e.to_string())?;
        c.validate()?;
        assert_eq!(
            c.replicas.get("vm1-disk0"),
            Some(&PathBuf::from("/dev/sdb"))
        );
        let mut bad = c.clone();
        bad.replicas.insert("../etc".into(), PathBuf::from("/x"));
        assert!(bad.validate().is_err_and(|e| e.contains("replicas")));
        let no_tls = MtConfig::default();
        assert!(no_tls.validate().is_err_and(|e| e.contains("tls")));
        Ok(())
    }
}
