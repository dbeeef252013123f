//! The process server's configuration (TOML, every field defaulted).

use std::net::SocketAddr;
use std::path::PathBuf;

use boomerang_common::config::TlsPaths;
use serde::{Deserialize, Serialize};

/// `boomerang-ps run` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PsConfig {
    /// This instance's name (its certificate is `<name>.pem`).
    /// Default: `ps`.
    pub name: String,
    /// UDP address agents connect to.
    /// Default: `0.0.0.0:7701`.
    pub listen: SocketAddr,
    /// The master target that owns the disks of this process server's agents.
    /// Default: `127.0.0.1:7700`.
    pub master_target: SocketAddr,
    /// Spool directory (on storage that honours fsync).
    /// Default: `/var/lib/boomerang-ps/spool`.
    pub spool_dir: PathBuf,
    /// Spool size cap in MiB; when full, agents are pushed back.
    /// Default: 4096.
    pub spool_max_mib: u64,
    /// Records in flight to the master target at once.
    /// Default: 16.
    pub forward_window: usize,
    /// TLS identity. Default: none (set it, or pass --pki-dir).
    pub tls: TlsPaths,
}

impl Default for PsConfig {
    fn default() -> Self {
        PsConfig {
            name: "ps".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7701)),
            master_target: SocketAddr::from(([127, 0, 0, 1], 7700)),
            spool_dir: PathBuf::from("/var/lib/boomerang-ps/spool"),
            spool_max_mib: 4096,
            forward_window: 16,
            tls: TlsPaths::default(),
        }
    }
}

impl PsConfig {
    /// Checks the configuration before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        self.tls.validate()?;
        if self.spool_max_mib < 64 {
            return Err(format!(
                "spool_max_mib = {} is too small: at least 64 MiB (one full batch) is needed",
                self.spool_max_mib
            ));
        }
        if self.forward_window == 0 || self.forward_window > 256 {
            return Err("forward_window must be between 1 and 256".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_the_file_leaves_out_and_bad_values_are_named() -> Result<(), String> {
        let c: PsConfig = toml::from_str(
            "master_target = \"192.0.2.1:7700\"\nspool_max_mib = 8192\n[tls]\nca = \"c\"\ncert = \"p\"\nkey = \"k\"\n",
        )
        .map_err(|e| e.to_string())?;
        c.validate()?;
        assert_eq!(c.forward_window, 16);
        let small = PsConfig {
            spool_max_mib: 1,
            ..c
        };
        assert!(small.validate().is_err_and(|e| e.contains("spool_max_mib")));
        Ok(())
    }
}
