//! The cluster CA: created by the bootstrapping server, handed to servers
//! that join (in the Join answer, over mutual TLS), kept in
//! `DATA/pki/ca.key` (0600). Every server can therefore issue and renew
//! certificates and check join secrets, and losing one server loses no
//! authority.
//!
//! Join secrets are not stored anywhere: the secret of a role is a keyed
//! hash of the CA key, the role and the role's token generation (a counter
//! in the Raft state that `skiff cluster token rotate` bumps). Every server
//! derives the same secret; rotating makes the old one useless at once.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};

use crate::identity::{subject_names, Role};
use crate::{files, PkiError};

/// How long a certificate lives unless `--cert-lifetime` says otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// How long the CA itself lives.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Certificates start this much before they are issued, so that a peer
/// whose clock is a little behind accepts them.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";

pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// The CA as rcgen signs with it: same name and key as `cert_der`
    /// (rebuilt from both after a load).
    issuer: rcgen::Certificate,
}

/// A certificate issued by the CA.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    pub pem: String,
    pub not_after: SystemTime,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Skiff cluster CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn datetime(at: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(at)
}

/// A public key received from a peer: an uncompressed P-256 point, the
/// only kind Skiff generates.
struct RawP256(Vec<u8>);

impl PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl ClusterCa {
    /// A new CA.
    pub fn create() -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate()?;
        let now = SystemTime::now();
        let mut params = ca_params();
        params.serial_number = Some(random_serial());
        params.not_before = datetime(now - BACKDATE);
        params.not_after = datetime(now + CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(ClusterCa {
            cert_pem,
            cert_der,
            key,
            issuer: cert,
        })
    }

    /// The CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("invalid CA certificate: {e}")))?;
        let issuer = ca_params().self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
            issuer,
        })
    }

    /// The CA kept in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<ClusterCa>, PkiError> {
        let cert = files::read(&dir.join(CA_CERT_FILE))?;
        let key = files::read(&dir.join(CA_KEY_FILE))?;
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(ClusterCa::from_pem(&cert, &key)?)),
            _ => Ok(None),
        }
    }

    /// Writes the CA to `dir`: the certificate 0644, the key 0600.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        files::write(&dir.join(CA_KEY_FILE), self.key_pem().as_bytes(), 0o600)?;
        files::write(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The hex SHA-256 of the CA certificate: what join tokens pin.
    pub fn digest(&self) -> String {
        digest_of(&self.cert_der)
    }

    /// A certificate for `name` in `role` for the P-256 public key
    /// `public_key` (uncompressed point), valid for `lifetime` from now.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        public_key: &[u8],
        lifetime: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        if public_key.len() != 65 || public_key[0] != 0x04 {
            return Err(PkiError::Invalid(
                "public key is not an uncompressed P-256 point (65 bytes)".into(),
            ));
        }
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let mut params = CertificateParams::new(subject_names(role, name))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{} {name}", role.as_str()));
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial());
        params.not_before = datetime(now - BACKDATE);
        params.not_after = datetime(not_after);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&RawP256(public_key.to_vec()), &self.issuer, &self.key)?;
        Ok(IssuedCertificate {
            pem: cert.pem(),
            not_after,
        })
    }

    /// The current join secret of `role` at token generation `generation`.
    pub fn join_secret(&self, role: Role, generation: u64) -> String {
        let mut hash = Sha256::new();
        hash.update(b"skiff join secret\0");
        hash.update(self.key.serialize_der());
        hash.update(role.as_str().as_bytes());
        hash.update(generation.to_be_bytes());
        hex::encode(&hash.finalize()[..16])
    }
}

/// The hex SHA-256 of a DER certificate.
pub fn digest_of(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The hex SHA-256 of a PEM certificate (its first).
pub fn digest_of_pem(pem: &str) -> Result<String, PkiError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("invalid certificate: {e}")))?;
    Ok(digest_of(&der))
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_that_chain_to_the_saved_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create().unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = ClusterCa::load(dir.path()).unwrap().unwrap();
        assert_eq!(ca.digest(), loaded.digest());
        let key = KeyPair::generate().unwrap();
        let issued = loaded
            .issue(
                Role::Agent,
                "n1",
                key.public_key_raw(),
                Duration::from_secs(60),
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(ca.cert_der()).unwrap();
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
        let identity = crate::PeerIdentity::new(der);
        assert!(identity.is_node("n1"));
        assert!(!identity.is_node("n2"));
        assert!(!identity.is_server());
    }

    #[test]
    fn join_secrets_differ_by_role_and_generation_and_match_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create().unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = ClusterCa::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            ca.join_secret(Role::Agent, 0),
            loaded.join_secret(Role::Agent, 0)
        );
        assert_ne!(
            ca.join_secret(Role::Agent, 0),
            ca.join_secret(Role::Agent, 1)
        );
        assert_ne!(
            ca.join_secret(Role::Agent, 0),
            ca.join_secret(Role::Server, 0)
        );
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
    }

    #[test]
    fn server_certificates_carry_the_role_and_the_name() {
        let ca = ClusterCa::create().unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = ca
            .issue(
                Role::Server,
                "s1",
                key.public_key_raw(),
                Duration::from_secs(60),
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let identity = crate::PeerIdentity::new(der);
        assert!(identity.is_server());
        assert!(identity.is_server_named("s1"));
        assert!(!identity.is_server_named("s2"));
        assert!(!identity.is_node("s1"));
    }
}
