//! The master target's configuration (TOML, every field defaulted).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use boomerang_common::config::TlsPaths;
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
}

impl Default for MtConfig {
    fn default() -> Self {
        MtConfig {
            name: "mt".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7700)),
            state_dir: PathBuf::from("/var/lib/boomerang-mt"),
            tls: TlsPaths::default(),
            replicas: BTreeMap::new(),
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
        Ok(())
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
