//! A throw-away deployment PKI, made with the real `boomerang-mt pki` commands so the
//! tests exercise the enrolment path operators use.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::cli;
use crate::process::{bin, run_ok, scratch_dir};

/// The usual peers of a one-of-each test cluster: `(name, role)`.
pub const STANDARD_PEERS: &[(&str, &str)] = &[("agent1", "agent"), ("ps1", "ps"), ("mt1", "mt")];

/// A CA plus issued certificates in a scratch directory, removed on drop. Every
/// daemon of a test gets this directory as `--pki-dir`.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// A new CA (`boomerang-mt pki init`) and one certificate per `(name, role)`
    /// (`boomerang-mt pki issue`), roles being `agent`, `ps` or `mt`.
    pub fn new(peers: &[(&str, &str)]) -> TestPki {
        let dir = scratch_dir("pki");
        run_ok(Command::new(bin(cli::MT_BIN)).args(cli::pki_init_args(dir.path())));
        let pki = TestPki { dir };
        for (name, role) in peers {
            pki.issue(name, role);
        }
        pki
    }

    /// [`TestPki::new`] with [`STANDARD_PEERS`].
    pub fn standard() -> TestPki {
        TestPki::new(STANDARD_PEERS)
    }

    /// Issues one more certificate.
    pub fn issue(&self, name: &str, role: &str) {
        run_ok(Command::new(bin(cli::MT_BIN)).args(cli::pki_issue_args(self.dir(), role, name)));
        for path in [self.cert(name), self.key(name)] {
            assert!(
                path.is_file(),
                "pki issue --name {name} did not write {}",
                path.display()
            );
        }
    }

    /// The `--pki-dir` of every peer.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/<name>.pem`.
    pub fn cert(&self, name: &str) -> PathBuf {
        cli::pki_cert_path(self.dir(), name)
    }

    /// `<dir>/<name>.key`.
    pub fn key(&self, name: &str) -> PathBuf {
        cli::pki_key_path(self.dir(), name)
    }

    /// The CA certificate, `<dir>/ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// The CA key, `<dir>/ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.dir().join("ca.key")
    }
}
