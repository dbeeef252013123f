//! The deployment's own certificate authority: `boomerang-mt pki init` makes it and
//! `pki issue` signs one certificate per role instance. Roles are carried in the
//! certificate as the DNS name `<role>.boomerang` (and `<name>.<role>.boomerang`), so a
//! peer's role is checked by ordinary name validation against the deployment CA, with
//! no certificate parsing of our own. Keys are written with mode 0600.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

use crate::durable::{create_dir_durable, write_atomic, DurableError};
use crate::message::Role;

/// DNS suffix of every role name in certificates.
pub const ROLE_DOMAIN: &str = "boomerang";
const CA_COMMON_NAME: &str = "Boomerang deployment CA";

/// PKI failures, naming the file or step.
#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A file could not be written durably.
    #[error(transparent)]
    Write(#[from] DurableError),
    /// Refusing to overwrite an existing CA.
    #[error("a CA already exists in {0}: refusing to replace it (every issued certificate would stop working); use another directory")]
    CaExists(PathBuf),
    /// The name is not usable in a certificate.
    #[error(
        "name {0:?} must be 1-63 characters of a-z 0-9 and '-', not starting or ending with '-'"
    )]
    BadName(String),
    /// rcgen refused.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The DNS name that proves `role` in a certificate.
pub fn role_dns_name(role: Role) -> String {
    format!("{}.{ROLE_DOMAIN}", role.as_str())
}

/// Checks a peer name is a valid DNS label.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = crate::config::now_ms() / 1000;
    // Civil year of `now`, close enough for a validity window that starts a year early.
    let year = i32::try_from(1970 + now / 31_556_952).unwrap_or(2026);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "Boomerang");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Creates a new CA in `dir`: `ca.pem` (certificate) and `ca.key` (mode 0600).
pub fn init_ca(dir: &Path) -> Result<PathBuf, PkiError> {
    let cert_path = dir.join("ca.pem");
    if cert_path.exists() || dir.join("ca.key").exists() {
        return Err(PkiError::CaExists(dir.to_path_buf()));
    }
    create_dir_durable(dir)?;
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    validity(&mut params, 20);
    let cert = params.self_signed(&key)?;
    write_atomic(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Issues a certificate for `name` acting as `role`, signed by the CA in `ca_dir`;
/// writes `<out_dir>/<name>.pem` and `<out_dir>/<name>.key` (0600). Returns the paths.
pub fn issue(
    ca_dir: &Path,
    role: Role,
    name: &str,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    validate_name(name)?;
    let ca_key_path = ca_dir.join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|source| PkiError::Read {
        path: ca_key_path.clone(),
        source,
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![
        role_dns_name(role),
        format!("{name}.{}", role_dns_name(role)),
    ])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 5);
    let cert = params.signed_by(&key, &issuer)?;

    create_dir_durable(out_dir)?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    if out_dir != ca_dir {
        let ca_pem = std::fs::read(ca_dir.join("ca.pem")).map_err(|source| PkiError::Read {
            path: ca_dir.join("ca.pem"),
            source,
        })?;
        write_atomic(&out_dir.join("ca.pem"), &ca_pem, 0o644)?;
    }
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_to_replace_and_issue_writes_private_keys(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        init_ca(dir.path())?;
        assert!(matches!(init_ca(dir.path()), Err(PkiError::CaExists(_))));
        let (_, key) = issue(dir.path(), Role::Agent, "vm1", dir.path())?;
        assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("ca.key"))?
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(matches!(
            issue(dir.path(), Role::Agent, "Bad_Name", dir.path()),
            Err(PkiError::BadName(_))
        ));
        Ok(())
    }
}
