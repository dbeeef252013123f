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
        for (what, p) in [
            ("tls.ca", &self.ca),
            ("tls.cert", &self.cert),
            ("tls.key", &self.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(format!(
                    "{what} is not set: give it in the config file or with --pki-dir"
                ));
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

/// Command-line flags every daemon shares for its TLS identity: either the three
/// files, or a PKI directory plus this instance's name (the layout `pki issue` writes).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Directory with ca.pem, <name>.pem and <name>.key (as `boomerang-mt pki issue` writes).
    #[arg(long, value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
    /// This instance's name: picks <name>.pem / <name>.key in --pki-dir.
    #[arg(long)]
    pub name: Option<String>,
}

impl TlsArgs {
    /// Applies the flags over the config file's TLS paths.
    pub fn apply(&self, tls: &mut TlsPaths, name: &mut String) {
        if let Some(n) = &self.name {
            name.clone_from(n);
        }
        if let Some(dir) = &self.pki_dir {
            *tls = TlsPaths::in_dir(dir, name);
        }
    }
}

/// Sets up logging to stderr; `RUST_LOG` overrides `default_level`.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Parses `ID=PATH` pairs given on the command line.
pub fn parse_id_path(s: &str) -> Result<(String, PathBuf), String> {
    let (id, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} must be ID=PATH"))?;
    crate::delta::validate_disk_id(id)?;
    if path.is_empty() {
        return Err(format!("{s:?} has an empty path"));
    }
    Ok((id.to_string(), PathBuf::from(path)))
}

/// A shutdown signal: flips to `true` once.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// A shutdown signal that flips on SIGINT or SIGTERM. Must be called inside a tokio
/// runtime.
pub fn shutdown_on_signals() -> Shutdown {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = tx.send(true);
    });
    rx
}

/// The multi-threaded tokio runtime every binary runs on (one worker per core).
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))
}

/// Turns a binary's result into its exit code: on error, one line
/// `<binary>: error: <reason>` on stderr and exit 1.
pub fn exit_code(binary: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("{binary}: error: {reason}");
            std::process::ExitCode::FAILURE
        }
    }
}
