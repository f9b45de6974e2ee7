//! The cluster's certificate authority: made once when a cluster is founded, then used to
//! issue each control node's and agent's certificate.

use crate::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a CA made by [`ClusterCa::generate`] is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{what} is not a PEM certificate")]
    NotPem { what: &'static str },
    #[error("cannot write a certificate or key: {0}")]
    Write(String),
    #[error("the key is not the CA certificate's")]
    KeyMismatch,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// How far before its issue a certificate made with [`Validity::from_now`] becomes valid
/// (clocks of the cluster's machines differ a little).
pub const ISSUE_BACKDATE: Duration = Duration::from_secs(3600);

impl Validity {
    /// From [`ISSUE_BACKDATE`] ago for `length`.
    pub fn from_now(length: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - ISSUE_BACKDATE,
            not_after: now + length,
        }
    }
}

/// When a certificate (DER) made with [`Validity::from_now`] was issued, as its signer's
/// clock read: every agent certificate a control node signs is. `None` if unreadable.
pub fn issued_at(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_before = u64::try_from(cert.validity().not_before.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(not_before) + ISSUE_BACKDATE)
}

fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A certificate and the private key it was issued for, both PEM.
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster's CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA for the cluster `cluster_name`, valid for [`CA_VALIDITY`].
    pub fn generate(cluster_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Muster cluster CA ({cluster_name})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let validity = Validity::from_now(CA_VALIDITY);
        params.not_before = offset_time(validity.not_before);
        params.not_after = offset_time(validity.not_after);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA written earlier by [`ClusterCa::generate`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = first_certificate_der(cert_pem).ok_or(PkiError::NotPem {
            what: "the CA certificate",
        })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|_| PkiError::NotPem {
                what: "the CA certificate",
            })?;
        if *cert.public_key().subject_public_key.data != *rcgen::PublicKeyData::der_bytes(&key) {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A new key and a certificate for it that names `role`, for the given host names and
    /// addresses besides the role's own server name.
    pub fn issue(
        &self,
        role: &Role,
        hosts: &[String],
        validity: Validity,
    ) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::generate()?;
        let cert = role_params(role, hosts, validity)?.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A new key and a certificate for the HTTPS API at `hosts` (names and addresses), for
    /// clients that trust this CA (`AWS_CA_BUNDLE`). It names no role: it is no member's.
    pub fn issue_api(
        &self,
        hosts: &[String],
        validity: Validity,
    ) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = server_params("Muster API", hosts, validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            // Chained to the CA, as clients that know only the CA expect.
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for the key of a certificate signing request, naming `role`. What the
    /// request itself asks for (names, usages) is ignored: the role is the CA's decision.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        role: &Role,
        validity: Validity,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = role_params(role, &[], validity)?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

fn role_params(
    role: &Role,
    hosts: &[String],
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    let mut params = server_params(&role.to_string(), hosts, validity)?;
    params.subject_alt_names.splice(
        0..0,
        [
            SanType::URI(role.uri().try_into()?),
            SanType::DnsName(role.server_name().try_into()?),
        ],
    );
    // Every holder is both: a control node serves agents and calls its peers; an agent calls
    // control nodes and serves its logs to them.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// A certificate's common parameters: its name, the host names and addresses it is for, its
/// key usages and validity.
fn server_params(
    common_name: &str,
    hosts: &[String],
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for host in hosts {
        params.subject_alt_names.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.as_str().try_into()?),
        });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset_time(validity.not_before);
    params.not_after = offset_time(validity.not_after);
    Ok(params)
}

/// A new key, and a certificate signing request for it, for a holder that asks the CA for a
/// certificate without ever sending its key (an agent joining with a token).
pub fn signing_request(role: &Role) -> Result<IssuedRequest, PkiError> {
    let key = KeyPair::generate()?;
    // Only a name: the CA decides everything else (see `ClusterCa::sign_request`).
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, role.to_string());
    let csr = params.serialize_request(&key)?;
    Ok(IssuedRequest {
        csr_pem: csr.pem()?,
        key_pem: key.serialize_pem(),
    })
}

/// A certificate signing request and the key it is for, both PEM.
pub struct IssuedRequest {
    pub csr_pem: String,
    pub key_pem: String,
}

/// `sha256:` and the hex SHA-256 of a PEM certificate's DER: what an agent is told to expect
/// of the cluster's CA before it trusts anything it is sent.
pub fn fingerprint(cert_pem: &str) -> Result<String, PkiError> {
    let der = first_certificate_der(cert_pem).ok_or(PkiError::NotPem {
        what: "the CA certificate",
    })?;
    Ok(fingerprint_of_der(&der))
}

/// See [`fingerprint`].
pub fn fingerprint_of_der(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn first_certificate_der(pem: &str) -> Option<Vec<u8>> {
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
}

use rustls::pki_types::pem::PemObject;

/// Writes PEM text to `path`; a private key (`private`) is readable by its owner alone from
/// the moment the file exists.
pub fn write_pem(path: &std::path::Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)?;
    // `mode` applies only to a file this creates: one written over keeps its own, so a key
    // is made owner-only before anything of it is written.
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Issues a certificate for `role` and writes it with its key as `dir/<stem>.pem` and
/// `dir/<stem>.key`, beside the CA's certificate in `dir/ca.pem`: the files a `[tls]` section
/// names.
pub fn write_identity(
    ca: &ClusterCa,
    dir: &std::path::Path,
    stem: &str,
    role: &Role,
    hosts: &[String],
    validity: Validity,
) -> Result<crate::TlsFiles, PkiError> {
    let issued = ca.issue(role, hosts, validity)?;
    let files = crate::TlsFiles {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join(format!("{stem}.pem")),
        key_file: dir.join(format!("{stem}.key")),
        ca_key_file: None,
    };
    let io = |e: std::io::Error| PkiError::Write(e.to_string());
    if !files.ca_file.exists() {
        write_pem(&files.ca_file, ca.cert_pem(), false).map_err(io)?;
    }
    // A control node presents the CA after its own certificate: an agent that joins knows the
    // CA only by its fingerprint, and finds it in the chain.
    let chain = match role {
        Role::Control(_) => format!("{}{}", issued.cert_pem, ca.cert_pem()),
        Role::Agent(_) => issued.cert_pem,
    };
    write_pem(&files.cert_file, &chain, false).map_err(io)?;
    write_pem(&files.key_file, &issued.key_pem, true).map_err(io)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_role_and_chain_to_the_ca() {
        let ca = ClusterCa::generate("test").unwrap();
        let issued = ca
            .issue(
                &Role::Control(2),
                &["10.0.0.2".into(), "cp2.example".into()],
                Validity::from_now(Duration::from_secs(3600)),
            )
            .unwrap();
        let der = first_certificate_der(&issued.cert_pem).unwrap();
        assert_eq!(crate::role_of_certificate(&der), Ok(Role::Control(2)));
        // Read back from its PEM, the CA signs as it did when made.
        let again = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        // Another CA's key with this CA's certificate is refused.
        let other = ClusterCa::generate("other").unwrap();
        assert!(matches!(
            ClusterCa::from_pem(ca.cert_pem(), other.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        let request = signing_request(&Role::Agent("asked-for".into())).unwrap();
        let signed = again
            .sign_request(
                &request.csr_pem,
                &Role::Agent("granted".into()),
                Validity::from_now(Duration::from_secs(60)),
            )
            .unwrap();
        let der = first_certificate_der(&signed).unwrap();
        assert_eq!(
            crate::role_of_certificate(&der),
            Ok(Role::Agent("granted".into())),
            "the CA decides the role, not the request"
        );
        let fp = fingerprint(ca.cert_pem()).unwrap();
        assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
        assert_eq!(fp, fingerprint(again.cert_pem()).unwrap());
    }
}
