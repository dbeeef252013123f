//! Configuration types every role shares, and TOML loading with clear errors.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where a role finds its TLS material: the deployment CA and its own certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsPaths {
    /// The deployment CA certificate (PEM).
    /// Default: `<pki dir>/ca.pem`.
    pub ca: PathBuf,
    /// This role's certificate (PEM), issued by `boomerang-mt pki issue`.
    /// Default: `<pki dir>/<name>.pem`.
    pub cert: PathBuf,
    /// This role's private key (PEM, mode 0600).
    /// Default: `<pki dir>/<name>.key`.
    pub key: PathBuf,
}

impl TlsPaths {
    /// The layout `boomerang-mt pki issue` writes: `<dir>/ca.pem`, `<dir>/<name>.pem`,
    /// `<dir>/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// Checks that the three files are named.
    pub fn validate(&self) -> Result<(), String> {
        for (what, p) in [("tls.ca", &self.ca), ("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if p.as_os_str().is_empty() {
                return Err(format!("{what} is not set: give it in the config file or with --pki-dir"));
            }
        }
        Ok(())
    }
}

/// Reads and parses a TOML config file; the error names the file and the problem.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {} is not valid: {e}", path.display()))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
