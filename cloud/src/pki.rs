//! The cluster CA, the certificates it issues, revocation, and the rustls
//! configurations of the QUIC hub.
//!
//! Layout of `data_dir/pki/` (directory mode 0700):
//!
//! | file      | content                                             | mode |
//! |-----------|-----------------------------------------------------|------|
//! | `ca.key`  | the CA's ECDSA P-256 private key, PKCS#8 PEM        | 0600 |
//! | `ca.pem`  | the self-signed CA certificate                      | 0644 |
//! | `revoked` | revoked serial numbers, one lowercase hex per line  | 0644 |
//! | `issued.log` | node certificates issued and nodes revoked (below), JSON lines | 0644 |
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of
//! the directory). On first start the key is written before the
//! certificate; a key without a certificate (a crash in between) is
//! replaced, a certificate without its key is an error, since every node
//! already pins that certificate.
//!
//! Identities: a node certificate has CN = node name, O = [`NODE_ORGANIZATION`]
//! and EKU clientAuth; the admin certificate has CN = [`ADMIN_COMMON_NAME`],
//! O = [`ADMIN_ORGANIZATION`]; the server certificate has EKU serverAuth.
//! [`node_name_from_cert`] accepts only the first kind.
//!
//! Revocation: `issued.log` is the ledger of node certificates (serial →
//! node, issue number, issue time, end of validity, whether a renewal
//! issued it), one JSON line appended (and fsync'd) per certificate or
//! revoked node, rewritten without expired entries once they dominate; a
//! torn last line (a crash mid-append) is ignored. [`ClusterCa::revoke_node`]
//! can revoke every certificate of a node. It also bars the node: from
//! then on a certificate of that node is refused unless the ledger shows
//! it was issued after the revocation (a new join with a token created
//! afterwards), which also covers certificates the ledger never saw.
//! Every TLS configuration built here checks both at each handshake.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::admission::{SharedAdmission, SharedShard};
use crate::error::{Error, Result};

/// ALPN protocol of the QUIC sync hub.
pub const ALPN_SYNC: &[u8] = b"keel-sync/1";
/// ALPN protocol of the HTTPS bootstrap endpoint.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Common name of the cluster CA.
pub const CA_COMMON_NAME: &str = "keel-cluster-ca";
use keel_api::auth::single_common_name;
/// The admin certificate's subject and its check (shared with edgecore).
pub use keel_api::auth::{ADMIN_COMMON_NAME, ADMIN_ORGANIZATION, is_admin_cert};
/// Organisation of every node client certificate.
pub const NODE_ORGANIZATION: &str = "keel:nodes";
/// Common name of the cloudcore server certificate.
pub const SERVER_COMMON_NAME: &str = "keel-cloudcore";
/// Default validity of a node certificate.
pub const DEFAULT_NODE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Validity of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Validity of server and admin certificates.
pub const SERVICE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `not_before` is backdated, to tolerate clock skew between nodes.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const REVOKED_FILE: &str = "revoked";
const ISSUED_FILE: &str = "issued.log";
/// Ledger lines beyond twice the live entries (plus this) trigger a rewrite.
const LEDGER_SLACK: usize = 1024;
/// Longest node name: an X.509 common name holds at most 64 characters.
pub const MAX_NODE_NAME_LEN: usize = 63;
/// The name of cloudcore's own CRDT actor and change origin: a node with
/// this name could pass its changes off as the cloud's.
pub const CLOUDCORE_NAME: &str = "cloudcore";
/// Names no node may take: keel's own identities.
pub const RESERVED_NAMES: [&str; 4] = [
    CLOUDCORE_NAME,
    CA_COMMON_NAME,
    ADMIN_COMMON_NAME,
    SERVER_COMMON_NAME,
];

/// The ring crypto provider, passed explicitly to every rustls builder so that
/// nothing depends on a process-wide default.
#[must_use]
pub fn crypto_provider() -> Arc<CryptoProvider> {
    // AES-128-GCM with SHA-256 first (ring's default starts with
    // AES-256-GCM-SHA384): TLS 1.3's mandatory suite, SHA-256 has CPU
    // instructions where SHA-384 has none, and a handshake's key schedule
    // and every packet cost less (the cloud hub's storms of handshakes).
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// A certificate issued by the cluster CA for a key held elsewhere (a CSR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its serial number, lowercase hex without separators.
    pub serial: String,
    /// End of its validity.
    pub not_after: SystemTime,
}

/// A certificate issued by the cluster CA together with the private key
/// generated for it (server and admin certificates).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// End of the certificate's validity.
    pub not_after: SystemTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The cluster certificate authority.
///
/// Shared (behind an `Arc`) by the bootstrap endpoint and the QUIC hub;
/// revocations made through any handle are seen at once by every TLS
/// configuration built from it.
pub struct ClusterCa {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    revocations: Arc<Revocations>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("dir", &self.dir)
            .field("ca_hash", &self.ca_hash())
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Loads the CA from `data_dir/pki/`, creating it on first start.
    ///
    /// # Errors
    /// I/O errors, an unparseable or mismatched certificate/key pair, a CA
    /// certificate whose key is missing, or a corrupt revocation list.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("pki");
        create_private_dir(&dir)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_exists = exists(&cert_path)?;
        let key_exists = exists(&key_path)?;
        let (cert_pem, cert_der, issuer) = match (cert_exists, key_exists) {
            (true, true) => load_ca(&cert_path, &key_path)?,
            (true, false) => {
                return Err(Error::Corrupt {
                    path: key_path,
                    reason: "the CA certificate exists but its private key is missing; \
                             restore it from backup (a new CA would orphan every node)"
                        .into(),
                });
            }
            (false, key_exists) => {
                if key_exists {
                    tracing::warn!(
                        path = %key_path.display(),
                        "CA key without certificate (interrupted first start); creating a new CA"
                    );
                }
                create_ca(&cert_path, &key_path)?
            }
        };
        let revocations = Arc::new(Revocations::load(
            dir.join(REVOKED_FILE),
            dir.join(ISSUED_FILE),
        )?);
        let ca = Self {
            dir,
            cert_pem,
            cert_der,
            issuer,
            revocations,
        };
        tracing::info!(ca_hash = %ca.ca_hash(), "cluster CA ready");
        Ok(ca)
    }

    /// The directory holding the CA files (`data_dir/pki`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate, PEM.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    #[must_use]
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// `"sha256:" + hex(sha256(CA certificate DER))`, the pin carried by
    /// join tokens.
    #[must_use]
    pub fn ca_hash(&self) -> String {
        ca_hash_of_der(&self.cert_der)
    }

    /// Signs a node's CSR with the default validity window starting now.
    ///
    /// # Errors
    /// See [`ClusterCa::sign_node_csr_between`].
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_name: &str,
        validity: Duration,
    ) -> Result<IssuedCert> {
        let (not_before, not_after) = window_from_now(validity)?;
        self.sign_node_csr_between(csr_pem, node_name, not_before, not_after)
    }

    /// Signs a node's CSR for an explicit validity window.
    ///
    /// The CSR must parse, its self-signature must verify and its common
    /// name must be exactly `node_name`. Nothing else is taken from the CSR
    /// but its public key: the certificate gets CN = `node_name`,
    /// O = [`NODE_ORGANIZATION`], EKU clientAuth, no CA rights, a random
    /// 128-bit serial and the cluster CA as issuer, whatever the CSR asks for.
    ///
    /// # Errors
    /// [`Error::InvalidNodeName`], [`Error::InvalidCsr`],
    /// [`Error::NodeMismatch`], [`Error::InvalidValidity`], or a signing error.
    pub fn sign_node_csr_between(
        &self,
        csr_pem: &str,
        node_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert> {
        self.sign_node(csr_pem, node_name, not_before, not_after, false)
    }

    /// Signs a node's CSR as a renewal (see [`ClusterCa::last_renewal`]),
    /// valid from now for `validity`.
    ///
    /// # Errors
    /// See [`ClusterCa::sign_node_csr_between`].
    pub fn sign_node_renewal(
        &self,
        csr_pem: &str,
        node_name: &str,
        validity: Duration,
    ) -> Result<IssuedCert> {
        let (not_before, not_after) = window_from_now(validity)?;
        self.sign_node(csr_pem, node_name, not_before, not_after, true)
    }

    fn sign_node(
        &self,
        csr_pem: &str,
        node_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
        renewal: bool,
    ) -> Result<IssuedCert> {
        validate_node_name(node_name)?;
        let csr = parse_csr(csr_pem)?;
        if csr.common_name != node_name {
            return Err(Error::NodeMismatch {
                expected: node_name.to_owned(),
                actual: csr.common_name,
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(node_name, Some(NODE_ORGANIZATION));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = set_validity_and_serial(&mut params, not_before, not_after)?;
        let cert = params.signed_by(&csr.params.public_key, &self.issuer)?;
        // In the ledger before anyone holds it, so that revoking the node
        // always finds it.
        self.revocations
            .record_issued(&serial, node_name, not_after, renewal)?;
        tracing::info!(node = node_name, serial = %serial, renewal, "issued node certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial,
            not_after,
        })
    }

    /// Issues the cloudcore server certificate, with a fresh P-256 key.
    ///
    /// Each name becomes an IP-address SAN if it parses as an IP address and
    /// a DNS-name SAN otherwise. EKU serverAuth, valid for
    /// [`SERVICE_CERT_VALIDITY`].
    ///
    /// # Errors
    /// No names, a name that is not a valid DNS name, or a signing error.
    pub fn server_cert(&self, names: &[&str]) -> Result<Credentials> {
        if names.is_empty() {
            return Err(Error::InvalidCertificate(
                "a server certificate needs at least one name".into(),
            ));
        }
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = dn(SERVER_COMMON_NAME, None);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_new_key(params, "server")
    }

    /// Issues the admin client certificate (CN [`ADMIN_COMMON_NAME`], O
    /// [`ADMIN_ORGANIZATION`]), with a fresh P-256 key.
    ///
    /// # Errors
    /// A key generation or signing error.
    pub fn admin_cert(&self) -> Result<Credentials> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(ADMIN_COMMON_NAME, Some(ADMIN_ORGANIZATION));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with_new_key(params, "admin")
    }

    fn issue_with_new_key(&self, mut params: CertificateParams, kind: &str) -> Result<Credentials> {
        let now = SystemTime::now();
        let not_after = now + SERVICE_CERT_VALIDITY;
        params.use_authority_key_identifier_extension = true;
        let serial = set_validity_and_serial(&mut params, backdate(now), not_after)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        tracing::info!(kind, serial = %serial, "issued certificate");
        Ok(Credentials {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
            not_after,
        })
    }

    /// Revokes a certificate by serial number (hex, any case, `:` separators
    /// allowed). The list is persisted before this returns; TLS
    /// configurations built from this CA refuse the certificate from then on.
    ///
    /// # Errors
    /// [`Error::InvalidSerial`] or an I/O error.
    pub fn revoke(&self, serial: &str) -> Result<()> {
        self.revocations.revoke(serial)
    }

    /// Revokes a node certificate (DER) that is being replaced, as
    /// [`ClusterCa::revoke`] does, and in the replicas' shared state when
    /// this cloudcore is one of several.
    ///
    /// # Errors
    /// [`Error::NotANodeCertificate`], an unreadable certificate, or an
    /// error persisting the revocation.
    pub fn revoke_replaced(&self, der: &[u8]) -> Result<()> {
        let node = node_name_from_cert(der)?;
        let serial = serial_of_cert(der)?;
        let not_after = not_after_of_cert(der)?;
        self.revocations.revoke_of(&node, &serial, not_after)
    }

    /// Makes this CA one of several replicas' (see [`crate::admission`]).
    pub fn share(&self, shared: Arc<dyn SharedAdmission>) {
        self.revocations.share(shared);
    }

    /// Whether a serial number (same syntax as [`ClusterCa::revoke`]) is revoked.
    /// An unparseable serial is reported as not revoked.
    #[must_use]
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revocations.is_revoked(serial)
    }

    /// The shared revocation list.
    #[must_use]
    pub fn revocations(&self) -> Arc<Revocations> {
        Arc::clone(&self.revocations)
    }

    /// Revokes every certificate issued to `node` and bars the node: any
    /// certificate of it not issued after this call is refused from now
    /// on, whether or not the ledger knows it. Both are persisted before
    /// this returns (an I/O error leaves them in force in memory). Returns
    /// the serials revoked by this call.
    ///
    /// # Errors
    /// [`Error::InvalidNodeName`] or an I/O error.
    pub fn revoke_node(&self, node: &str) -> Result<Vec<String>> {
        validate_node_name(node)?;
        self.revocations.revoke_node(node)
    }

    /// Whether a DER client certificate is refused: its serial revoked, or
    /// a node certificate of a barred node not issued after the bar. An
    /// unparseable certificate is refused.
    #[must_use]
    pub fn is_cert_revoked(&self, der: &[u8]) -> bool {
        match X509Certificate::from_der(der) {
            Ok((_, cert)) => self.revocations.refuses(&cert),
            Err(_) => true,
        }
    }

    /// When `node` was last issued a certificate by renewal (from the
    /// ledger, so across restarts), if ever while one is still valid.
    #[must_use]
    pub fn last_renewal(&self, node: &str) -> Option<SystemTime> {
        self.revocations.last_renewal(node)
    }

    /// Whether `node` is revoked and holds no certificate issued since:
    /// any connection it has must be made with a refused certificate.
    #[must_use]
    pub fn is_node_shut_out(&self, node: &str) -> bool {
        self.revocations.is_node_shut_out(node)
    }

    /// Serials of the unexpired certificates issued to `node`, oldest first.
    #[must_use]
    pub fn issued_to(&self, node: &str) -> Vec<String> {
        self.revocations.issued_to(node)
    }
}

/// The persisted set of revoked serial numbers, the ledger of issued node
/// certificates and the barred nodes (see the [module documentation](self)).
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    ledger_path: PathBuf,
    serials: Mutex<BTreeSet<String>>,
    ledger: Mutex<Ledger>,
    /// Set when this cloudcore is one of several replicas: what it issues
    /// and revokes goes there first (see [`crate::admission`]).
    shared: OnceLock<Arc<dyn SharedAdmission>>,
}

/// The ledger (`issued.log`) in memory.
#[derive(Debug, Default)]
struct Ledger {
    /// Issue number of the last certificate recorded.
    last: u64,
    /// Serial → the node certificate issued under it.
    issued: BTreeMap<String, IssuedRecord>,
    /// Node → the issue number at its revocation: its certificates up to
    /// it, and any the ledger does not know, are refused.
    revoked_nodes: BTreeMap<String, u64>,
    /// Lines in the file.
    lines: usize,
}

/// A node certificate in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedRecord {
    pub(crate) node: String,
    pub(crate) number: u64,
    /// Unix seconds.
    pub(crate) issued_at: u64,
    /// Unix seconds.
    pub(crate) not_after: u64,
    #[serde(default)]
    pub(crate) renewal: bool,
}

/// One line of `issued.log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum LedgerLine {
    #[serde(rename_all = "camelCase")]
    Issued {
        serial: String,
        #[serde(flatten)]
        record: IssuedRecord,
    },
    #[serde(rename_all = "camelCase")]
    RevokedNode { node: String, bar: u64 },
}

impl Ledger {
    /// The ledger, and whether its last line was torn.
    fn load(path: &Path) -> Result<(Self, bool)> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::default(), false));
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut ledger = Self::default();
        let mut torn = false;
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<LedgerLine>(line) {
                Ok(entry) => ledger.apply(entry),
                Err(_) if !complete && i + 1 == lines.len() => {
                    tracing::warn!(path = %path.display(), "dropping a torn last line of the ledger");
                    torn = true;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Corrupt {
                        path: path.to_owned(),
                        reason: format!("line {}: {e}", i + 1),
                    });
                }
            }
            ledger.lines += 1;
        }
        Ok((ledger, torn))
    }

    fn apply(&mut self, entry: LedgerLine) {
        match entry {
            LedgerLine::Issued { serial, record } => {
                self.last = self.last.max(record.number);
                self.issued.insert(serial, record);
            }
            LedgerLine::RevokedNode { node, bar } => {
                // Numbers issued later stay above every bar, even once the
                // certificates numbered below it are pruned.
                self.last = self.last.max(bar);
                let b = self.revoked_nodes.entry(node).or_insert(bar);
                *b = (*b).max(bar);
            }
        }
    }

    fn entries(&self) -> impl Iterator<Item = LedgerLine> + '_ {
        let issued = self
            .issued
            .iter()
            .map(|(serial, record)| LedgerLine::Issued {
                serial: serial.clone(),
                record: record.clone(),
            });
        let nodes = self
            .revoked_nodes
            .iter()
            .map(|(node, bar)| LedgerLine::RevokedNode {
                node: node.clone(),
                bar: *bar,
            });
        issued.chain(nodes)
    }
}

fn ledger_line(path: &Path, entry: &LedgerLine) -> Result<String> {
    let mut line = serde_json::to_string(entry).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        reason: format!("cannot serialise a ledger line: {e}"),
    })?;
    line.push('\n');
    Ok(line)
}

impl Revocations {
    fn load(path: PathBuf, ledger_path: PathBuf) -> Result<Self> {
        let mut serials = BTreeSet::new();
        match fs::read_to_string(&path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let serial = normalize_serial(line).map_err(|_| Error::Corrupt {
                        path: path.clone(),
                        reason: format!("line {} is not a hex serial number", i + 1),
                    })?;
                    serials.insert(serial);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        let (mut ledger, torn) = Ledger::load(&ledger_path)?;
        let revocations = Self {
            path,
            ledger_path,
            serials: Mutex::new(BTreeSet::new()),
            ledger: Mutex::new(Ledger::default()),
            shared: OnceLock::new(),
        };
        if torn {
            // Appending after a torn line would corrupt the next one.
            revocations.rewrite_ledger(&mut ledger)?;
        }
        *revocations
            .serials
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = serials;
        *revocations
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = ledger;
        Ok(revocations)
    }

    /// Adds a serial and persists the list atomically.
    ///
    /// # Errors
    /// [`Error::InvalidSerial`] or an I/O error (the serial then stays
    /// revoked in memory).
    pub fn revoke(&self, serial: &str) -> Result<()> {
        let serial = normalize_serial(serial)?;
        self.revoke_all(std::slice::from_ref(&serial)).map(|_| ())
    }

    /// Adds serials (normalised) and persists the list once; returns those
    /// that were not revoked before.
    fn revoke_all(&self, serials: &[String]) -> Result<Vec<String>> {
        let mut set = self.serials.lock().unwrap_or_else(PoisonError::into_inner);
        let added: Vec<String> = serials
            .iter()
            .filter(|s| set.insert((*s).clone()))
            .cloned()
            .collect();
        if added.is_empty() {
            return Ok(added);
        }
        let mut text = String::new();
        for s in set.iter() {
            text.push_str(s);
            text.push('\n');
        }
        write_atomic(&self.path, text.as_bytes(), 0o644)?;
        for serial in &added {
            tracing::warn!(serial = %serial, "certificate revoked");
        }
        Ok(added)
    }

    /// Records a node certificate in the ledger (pruning expired entries)
    /// and persists it.
    fn record_issued(
        &self,
        serial: &str,
        node: &str,
        not_after: SystemTime,
        renewal: bool,
    ) -> Result<()> {
        let now = unix_secs(SystemTime::now());
        let mut record = IssuedRecord {
            node: node.to_owned(),
            number: 0,
            issued_at: now,
            not_after: unix_secs(not_after),
            renewal,
        };
        // One of several replicas: numbered in the node's shard, and there
        // before anyone holds it.
        if let Some(shared) = self.shared.get() {
            let local_last = self.lock_ledger().last;
            shared.update(node, &mut |s| {
                s.prune(now);
                s.last = s.last.max(local_last).saturating_add(1);
                record.number = s.last;
                s.issued.insert(serial.to_owned(), record.clone());
                Ok(true)
            })?;
        }
        let mut ledger = self.lock_ledger();
        if self.shared.get().is_none() {
            ledger.last = ledger.last.saturating_add(1);
            record.number = ledger.last;
        }
        let entry = LedgerLine::Issued {
            serial: serial.to_owned(),
            record,
        };
        ledger.apply(entry.clone());
        self.append_ledger(&mut ledger, &entry)?;
        self.compact_ledger(&mut ledger, now)
    }

    /// Rewrites the ledger without expired certificates once they
    /// dominate it.
    fn compact_ledger(&self, ledger: &mut Ledger, now: u64) -> Result<()> {
        let live = ledger.issued.len() + ledger.revoked_nodes.len();
        if ledger.lines > live.saturating_mul(2).saturating_add(LEDGER_SLACK) {
            ledger.issued.retain(|_, r| r.not_after > now);
            self.rewrite_ledger(ledger)?;
        }
        Ok(())
    }

    fn lock_ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn revoke_node(&self, node: &str) -> Result<Vec<String>> {
        let now = unix_secs(SystemTime::now());
        // One of several replicas: the bar and the revoked serials go to
        // the node's shard first, numbered in its sequence.
        let mut shared_bar = None;
        let mut serials: Vec<String> = Vec::new();
        if let Some(shared) = self.shared.get() {
            let local_last = self.lock_ledger().last;
            shared.update(node, &mut |s| {
                s.prune(now);
                s.last = s.last.max(local_last);
                let bar = s.last;
                serials.clear();
                for (serial, r) in s.issued.iter().filter(|(_, r)| r.node == node) {
                    serials.push(serial.clone());
                    s.revoked.insert(serial.clone(), r.not_after);
                }
                let b = s.barred.entry(node.to_owned()).or_insert(bar);
                *b = (*b).max(bar);
                shared_bar = Some(*b);
                Ok(true)
            })?;
        }
        {
            let mut ledger = self.lock_ledger();
            let entry = LedgerLine::RevokedNode {
                node: node.to_owned(),
                bar: shared_bar.unwrap_or(ledger.last),
            };
            ledger.apply(entry.clone());
            serials.extend(
                ledger
                    .issued
                    .iter()
                    .filter(|(_, r)| r.node == node)
                    .map(|(s, _)| s.clone()),
            );
            self.append_ledger(&mut ledger, &entry)?;
        }
        serials.sort();
        serials.dedup();
        tracing::warn!(node, certificates = serials.len(), "node revoked");
        self.revoke_all(&serials)
    }

    /// Revokes one certificate of `node` (a renewal's predecessor), in the
    /// node's shard first when this cloudcore is one of several replicas.
    fn revoke_of(&self, node: &str, serial: &str, not_after: SystemTime) -> Result<()> {
        let serial = normalize_serial(serial)?;
        if let Some(shared) = self.shared.get() {
            let now = unix_secs(SystemTime::now());
            shared.update(node, &mut |s| {
                s.prune(now);
                let changed = s
                    .revoked
                    .insert(serial.clone(), unix_secs(not_after))
                    .is_none();
                Ok(changed)
            })?;
        }
        self.revoke_all(std::slice::from_ref(&serial)).map(|_| ())
    }

    /// Makes this the store of one of several replicas: from now on what
    /// it issues and revokes goes to `shared` first. Set once.
    pub fn share(&self, shared: Arc<dyn SharedAdmission>) {
        let _ = self.shared.set(shared);
    }

    /// Merges a shard of the replicas' shared state into the local files:
    /// certificates other replicas issued, nodes they barred (and every
    /// certificate of such a node known here but not issued after the
    /// bar), serials they revoked. Returns the nodes barred by this merge,
    /// whose connections are to be closed.
    ///
    /// # Errors
    /// An I/O error persisting the merge (what was merged so far holds in
    /// memory).
    pub fn merge(&self, shard: &SharedShard) -> Result<Vec<String>> {
        let now = unix_secs(SystemTime::now());
        let mut revoke: Vec<String> = Vec::new();
        let mut barred = Vec::new();
        {
            let mut ledger = self.lock_ledger();
            for (serial, record) in &shard.issued {
                if record.not_after <= now || ledger.issued.contains_key(serial) {
                    continue;
                }
                let entry = LedgerLine::Issued {
                    serial: serial.clone(),
                    record: record.clone(),
                };
                ledger.apply(entry.clone());
                self.append_ledger(&mut ledger, &entry)?;
            }
            for (node, bar) in &shard.barred {
                if ledger.revoked_nodes.get(node).is_some_and(|b| b >= bar) {
                    continue;
                }
                revoke.extend(
                    ledger
                        .issued
                        .iter()
                        .filter(|(serial, r)| {
                            r.node == *node
                                && !shard
                                    .issued
                                    .get(*serial)
                                    .is_some_and(|s| s.node == *node && s.number > *bar)
                        })
                        .map(|(s, _)| s.clone()),
                );
                let entry = LedgerLine::RevokedNode {
                    node: node.clone(),
                    bar: *bar,
                };
                ledger.apply(entry.clone());
                self.append_ledger(&mut ledger, &entry)?;
                barred.push(node.clone());
            }
            self.compact_ledger(&mut ledger, now)?;
        }
        {
            let known = self.serials.lock().unwrap_or_else(PoisonError::into_inner);
            revoke.extend(
                shard
                    .revoked
                    .keys()
                    .filter(|s| !known.contains(*s))
                    .cloned(),
            );
        }
        if !revoke.is_empty() {
            revoke.sort();
            revoke.dedup();
            self.revoke_all(&revoke)?;
        }
        for node in &barred {
            tracing::warn!(%node, "node revoked by another replica");
        }
        Ok(barred)
    }

    /// Appends one line and fsyncs it (and the directory, when the file is
    /// new).
    fn append_ledger(&self, ledger: &mut Ledger, entry: &LedgerLine) -> Result<()> {
        let path = &self.ledger_path;
        let line = ledger_line(path, entry)?;
        let existed = exists(path)?;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io(path, e))?;
        if !existed && let Some(dir) = path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, e))?;
        }
        ledger.lines = ledger.lines.saturating_add(1);
        Ok(())
    }

    /// Rewrites the ledger with its live entries only.
    fn rewrite_ledger(&self, ledger: &mut Ledger) -> Result<()> {
        let mut text = String::new();
        let mut lines = 0usize;
        for entry in ledger.entries() {
            text.push_str(&ledger_line(&self.ledger_path, &entry)?);
            lines += 1;
        }
        write_atomic(&self.ledger_path, text.as_bytes(), 0o644)?;
        ledger.lines = lines;
        Ok(())
    }

    /// Whether `serial` is revoked (unparseable serials are not).
    #[must_use]
    pub fn is_revoked(&self, serial: &str) -> bool {
        match normalize_serial(serial) {
            Ok(s) => self
                .serials
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&s),
            Err(_) => false,
        }
    }

    /// Whether a parsed client certificate is refused: its serial is
    /// revoked, or it is a certificate of a barred node that the ledger
    /// does not show as issued after the bar.
    /// Whether a client certificate (DER) may not be used any more: it is
    /// refused as [`Revocations`] says, has expired or cannot be read. For
    /// the hub's resumed TLS sessions, which never reach the verifier.
    #[must_use]
    pub fn refuses_der(&self, der: &CertificateDer<'_>) -> bool {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return true;
        };
        !cert.validity().is_valid() || self.refuses(&cert)
    }

    fn refuses(&self, cert: &X509Certificate<'_>) -> bool {
        let serial = hex(strip_leading_zeros(cert.raw_serial()));
        if self
            .serials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&serial)
        {
            return true;
        }
        let Ok(node) = single_common_name(cert.subject()) else {
            return false;
        };
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(bar) = ledger.revoked_nodes.get(&node) else {
            return false;
        };
        !ledger
            .issued
            .get(&serial)
            .is_some_and(|r| r.node == node && r.number > *bar)
    }

    fn is_node_shut_out(&self, node: &str) -> bool {
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.revoked_nodes.get(node).is_some_and(|bar| {
            !ledger
                .issued
                .values()
                .any(|r| r.node == node && r.number > *bar)
        })
    }

    fn last_renewal(&self, node: &str) -> Option<SystemTime> {
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger
            .issued
            .values()
            .filter(|r| r.renewal && r.node == node)
            .map(|r| r.issued_at)
            .max()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
    }

    fn issued_to(&self, node: &str) -> Vec<String> {
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let mut mine: Vec<(u64, String)> = ledger
            .issued
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(s, r)| (r.number, s.clone()))
            .collect();
        mine.sort();
        mine.into_iter().map(|(_, s)| s).collect()
    }

    /// Every revoked serial, lowercase hex, sorted.
    #[must_use]
    pub fn list(&self) -> Vec<String> {
        self.serials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// TLS configurations
// ---------------------------------------------------------------------------

/// Whether a server configuration requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    Required,
    Optional,
}

/// The rustls server configuration of the QUIC hub: TLS 1.3 only, ALPN
/// [`ALPN_SYNC`], and a client certificate that chains to the cluster CA, is
/// within its validity, has EKU clientAuth and is not revoked, checked at
/// every handshake (no session resumption). The server sends its own
/// certificate only: every node already trusts the cluster CA (it pinned
/// it when it joined).
///
/// The result converts with `quinn::crypto::rustls::QuicServerConfig::try_from`.
///
/// # Errors
/// Unparseable server certificate or key, or a rustls configuration error.
pub fn server_tls_config(
    ca: &ClusterCa,
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<rustls::ServerConfig> {
    server_config_with(
        ca,
        server_cert_pem,
        server_key_pem,
        ClientAuth::Required,
        ALPN_SYNC,
        Chain::LeafOnly,
    )
}

/// The rustls server configuration of the cloud hub with TLS 1.3 session
/// tickets from `tickets`: a node coming back resumes its session instead
/// of a full handshake. A resumed handshake takes the client certificate
/// from the ticket and never asks the verifier, so the hub checks every
/// connection's certificate against the revocation list and its validity
/// after the handshake ([`Revocations::refuses_der`]). No 0-RTT: the
/// link's first flight would be replayable, and it is cheap after a
/// resumed handshake anyway.
pub fn hub_tls_config(
    ca: &ClusterCa,
    server_cert_pem: &str,
    server_key_pem: &str,
    tickets: Arc<HubTickets>,
) -> Result<rustls::ServerConfig> {
    let mut config = server_tls_config(ca, server_cert_pem, server_key_pem)?;
    config.ticketer = tickets;
    // A client uses each ticket once, and one used on an attempt the hub
    // turned away (a storm) is gone: a few in hand keep the next attempt
    // a resumption.
    config.send_tls13_tickets = HUB_TICKETS_PER_HANDSHAKE;
    Ok(config)
}

/// Stateless TLS session tickets of the cloud hub: the session state,
/// sealed with ChaCha20-Poly1305 under a key derived from the hub's
/// persisted secret (the one its stateless resets use), so tickets survive
/// a cloudcore restart and no state is kept per node. A ticket of another
/// cluster (another secret) does not open: that client gets a full
/// handshake.
pub struct HubTickets {
    key: ring::aead::LessSafeKey,
    rng: ring::rand::SystemRandom,
    opened: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for HubTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubTickets").finish_non_exhaustive()
    }
}

/// Session tickets the hub sends after each handshake. A client uses a
/// ticket once, and an attempt the hub turns away uses one up: with four,
/// a 10,000-node warm storm (about 6 refusals per node) resumed 1,970
/// sessions; with eight (and the hub's 7 s wait), 10,047 handshakes
/// resumed (some nodes connected twice).
pub const HUB_TICKETS_PER_HANDSHAKE: usize = 8;

/// How long a hub session ticket may be used (a day).
pub const HUB_TICKET_LIFETIME_SECS: u32 = 24 * 3600;

impl HubTickets {
    /// Tickets sealed with a key derived from `secret`.
    pub fn new(secret: &[u8; 32]) -> Result<Arc<HubTickets>> {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"keel hub session tickets v1")
            .extract(secret);
        let okm = prk
            .expand(&[b"ticket key"], &ring::aead::CHACHA20_POLY1305)
            .map_err(|_| Error::Tls(rustls::Error::General("deriving the ticket key".into())))?;
        Ok(Arc::new(HubTickets {
            key: ring::aead::LessSafeKey::new(ring::aead::UnboundKey::from(okm)),
            rng: ring::rand::SystemRandom::new(),
            opened: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Tickets that opened: handshakes that resumed a session (rustls
    /// still refuses an opened ticket that has expired or does not fit).
    pub fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl rustls::server::ProducesTickets for HubTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        HUB_TICKET_LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut sealed,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (nonce, sealed) = cipher.split_at_checked(ring::aead::NONCE_LEN)?;
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::empty(), &mut buf)
            .ok()?;
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(plain.to_vec())
    }
}

/// Whether a server sends the cluster CA after its own certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// Leaf and CA: for clients that may not hold the CA yet (a joining
    /// node pins its hash, kubectl reads it from the chain).
    WithCa,
    /// The leaf alone: every client of the hub already trusts the CA, and
    /// a storm of handshakes sends one certificate less each.
    LeafOnly,
}

pub(crate) fn build_server_config(
    ca: &ClusterCa,
    server_cert_pem: &str,
    server_key_pem: &str,
    client_auth: ClientAuth,
    alpn: &[u8],
) -> Result<rustls::ServerConfig> {
    server_config_with(
        ca,
        server_cert_pem,
        server_key_pem,
        client_auth,
        alpn,
        Chain::WithCa,
    )
}

fn server_config_with(
    ca: &ClusterCa,
    server_cert_pem: &str,
    server_key_pem: &str,
    client_auth: ClientAuth,
    alpn: &[u8],
    send: Chain,
) -> Result<rustls::ServerConfig> {
    let provider = crypto_provider();
    let verifier = client_verifier(ca, client_auth, Arc::clone(&provider))?;
    let mut chain = certs_from_pem(server_cert_pem)?;
    if send == Chain::WithCa {
        chain.push(ca.cert_der.clone());
    }
    let key = key_from_pem(server_key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    // No session resumption: a resumed TLS 1.3 handshake takes the client
    // certificate from the session and never asks the verifier, so a
    // revoked certificate could come back with a ticket issued before
    // its revocation.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The rustls server configuration of the kubelet stream API cloudcore
/// serves for its edge nodes in attached mode: HTTP/1.1, a client
/// certificate issued by one of `client_roots` (the Kubernetes cluster's
/// CA, DER) required; no session resumption (as everywhere).
///
/// # Errors
/// Unusable roots, certificate or key.
pub fn kubelet_api_tls_config(
    client_roots: &[Vec<u8>],
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<rustls::ServerConfig> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for der in client_roots {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()?;
    let chain = certs_from_pem(server_cert_pem)?;
    let key = key_from_pem(server_key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn client_verifier(
    ca: &ClusterCa,
    client_auth: ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der.clone())?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if client_auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    Ok(Arc::new(RevocationCheckingVerifier {
        inner: builder.build()?,
        revocations: ca.revocations(),
    }))
}

/// A client certificate verifier that refuses revoked serial numbers with
/// [`rustls::CertificateError::Revoked`] (alert `certificate_revoked`) and
/// then delegates to rustls' WebPKI verifier.
#[derive(Debug)]
struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let Ok((_, cert)) = X509Certificate::from_der(end_entity) else {
            tracing::warn!("refused client certificate: not a parseable X.509 certificate");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ));
        };
        if self.revocations.refuses(&cert) {
            tracing::warn!(
                serial = %hex(strip_leading_zeros(cert.raw_serial())),
                subject = %cert.subject(),
                "refused client certificate: revoked"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                tracing::warn!(subject = %cert.subject(), error = %e, "refused client certificate");
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls client configuration of a node: TLS 1.3 only, ALPN
/// [`ALPN_SYNC`], trusts the cluster CA and nothing else (no system roots),
/// and presents the node certificate.
///
/// The result converts with `quinn::crypto::rustls::QuicClientConfig::try_from`.
///
/// # Errors
/// Unparseable PEM or a rustls configuration error.
pub fn client_tls_config(
    ca_pem: &str,
    node_cert_pem: &str,
    node_key_pem: &str,
) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    let chain = certs_from_pem(node_cert_pem)?;
    let key = key_from_pem(node_key_pem)?;
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_SYNC.to_vec()];
    Ok(config)
}

/// The node name of a (verified) peer certificate: its common name, if the
/// certificate is a keel node certificate (O = [`NODE_ORGANIZATION`]) and the
/// name is a valid node name.
///
/// # Errors
/// [`Error::InvalidCertificate`] for unparseable DER,
/// [`Error::NotANodeCertificate`] otherwise.
pub fn node_name_from_cert(der: &[u8]) -> Result<String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidCertificate(format!("not an X.509 certificate: {e}")))?;
    let subject = cert.subject();
    let is_node = subject
        .iter_organization()
        .any(|o| o.as_str().is_ok_and(|o| o == NODE_ORGANIZATION));
    if !is_node {
        return Err(Error::NotANodeCertificate(format!(
            "subject {subject} lacks O={NODE_ORGANIZATION}"
        )));
    }
    let name = single_common_name(subject)
        .map_err(|e| Error::NotANodeCertificate(format!("subject {subject}: {e}")))?;
    validate_node_name(&name)
        .map_err(|e| Error::NotANodeCertificate(format!("subject {subject}: {e}")))?;
    Ok(name)
}

/// The TLS configuration of the Kubernetes API: the cluster CA must have
/// issued the client's certificate (which one may do what is decided per
/// request).
///
/// # Errors
/// Unparseable server certificate or key, or a rustls configuration error.
pub fn api_tls_config(
    ca: &ClusterCa,
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<rustls::ServerConfig> {
    build_server_config(
        ca,
        server_cert_pem,
        server_key_pem,
        ClientAuth::Required,
        b"http/1.1",
    )
}

/// The serial number of a DER certificate, lowercase hex.
///
/// # Errors
/// [`Error::InvalidCertificate`] for unparseable DER.
pub fn serial_of_cert(der: &[u8]) -> Result<String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidCertificate(format!("not an X.509 certificate: {e}")))?;
    Ok(hex(strip_leading_zeros(cert.raw_serial())))
}

/// The end of a DER certificate's validity.
///
/// # Errors
/// [`Error::InvalidCertificate`] for unparseable DER.
pub fn not_after_of_cert(der: &[u8]) -> Result<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidCertificate(format!("not an X.509 certificate: {e}")))?;
    let ts = cert.validity().not_after.timestamp();
    Ok(u64::try_from(ts).map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s)))
}

/// `"sha256:" + hex(sha256(der))`.
#[must_use]
pub fn ca_hash_of_der(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex(digest.as_ref()))
}

/// All certificates of a PEM string, in order.
///
/// # Errors
/// [`Error::InvalidCertificate`] if the PEM is malformed or holds no certificate.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidCertificate(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidCertificate("no certificate in PEM".into()));
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::InvalidCertificate(format!("bad private key PEM: {e}")))
}

/// Checks that `name` is a keel node name: a DNS-1123 subdomain (dot-separated
/// labels of `a-z`, `0-9` and `-`, each starting and ending with a letter or
/// digit) of at most 63 characters (it is the certificate's common name),
/// and none of [`RESERVED_NAMES`] — in particular not `cloudcore`, whose
/// actor id and change origin are the cloud's own. Names such as
/// `system:…` or `user:…` fail the character rule.
///
/// # Errors
/// [`Error::InvalidNodeName`].
pub fn validate_node_name(name: &str) -> Result<()> {
    let refuse = |reason| {
        let mut shown: String = name.chars().take(80).collect();
        if shown.len() < name.len() {
            shown.push('…');
        }
        Err(Error::InvalidNodeName {
            name: shown,
            reason,
        })
    };
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return refuse("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return refuse(
            "not a DNS-1123 subdomain: only lowercase a-z, 0-9, '-' and '.' are allowed",
        );
    }
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !name
        .split('.')
        .all(|label| alnum(label.as_bytes().first()) && alnum(label.as_bytes().last()))
    {
        return refuse(
            "not a DNS-1123 subdomain: each dot-separated part must start and end with a letter or digit",
        );
    }
    if RESERVED_NAMES.contains(&name) {
        return refuse("reserved for keel itself");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

struct ParsedCsr {
    params: CertificateSigningRequestParams,
    common_name: String,
}

fn parse_csr(csr_pem: &str) -> Result<ParsedCsr> {
    use rustls::pki_types::CertificateSigningRequestDer;
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| Error::InvalidCsr(format!("not a PEM certificate request: {e}")))?;
    // Parses and verifies the CSR's self-signature (proof of possession).
    let params = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| Error::InvalidCsr(e.to_string()))?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::InvalidCsr(e.to_string()))?;
    let common_name = single_common_name(&parsed.certification_request_info.subject)
        .map_err(Error::InvalidCsr)?;
    Ok(ParsedCsr {
        params,
        common_name,
    })
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A certificate's validity window: from now (backdated, see
/// [`backdate`]) for `validity`.
fn window_from_now(validity: Duration) -> Result<(SystemTime, SystemTime)> {
    let now = SystemTime::now();
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| Error::InvalidValidity(format!("{validity:?} is too long")))?;
    Ok((backdate(now), not_after))
}

fn backdate(now: SystemTime) -> SystemTime {
    now.checked_sub(CLOCK_SKEW).unwrap_or(now)
}

/// Sets the validity window and a fresh random serial; returns the serial as hex.
fn set_validity_and_serial(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<String> {
    if not_after <= not_before {
        return Err(Error::InvalidValidity(
            "not_after must be later than not_before".into(),
        ));
    }
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    let serial = random_serial()?;
    let hex_serial = hex(&serial);
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(hex_serial)
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::InvalidValidity("time before 1970".into()))?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| Error::InvalidValidity("time too far".into()))?;
    let dt = time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| Error::InvalidValidity(e.to_string()))?;
    if dt.year() >= 10_000 {
        return Err(Error::InvalidValidity("time after year 9999".into()));
    }
    Ok(dt)
}

/// 16 random bytes, positive and without a leading zero byte, so the DER
/// INTEGER is exactly these bytes and its hex is canonical.
fn random_serial() -> Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(bytes)
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Random)?;
    Ok(bytes)
}

/// Lowercase hex, canonical (no leading zero bytes), from hex with any case
/// and optional `:` separators.
fn normalize_serial(serial: &str) -> Result<String> {
    let invalid = || Error::InvalidSerial(serial.chars().take(100).collect());
    let digits: String = serial
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() || digits.len() > 128 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let trimmed = digits.trim_start_matches('0');
    // Whole bytes: re-pad to an even number of digits.
    let canonical = if trimmed.len() % 2 == 1 {
        format!("0{trimmed}")
    } else {
        trimmed.to_owned()
    };
    if canonical.is_empty() {
        return Ok("00".into());
    }
    Ok(canonical)
}

fn strip_leading_zeros(raw: &[u8]) -> &[u8] {
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    match raw.get(first..) {
        Some(rest) if !rest.is_empty() => rest,
        _ => &[0],
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn exists(path: &Path) -> Result<bool> {
    path.try_exists().map_err(|e| Error::io(path, e))
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory (created with `mode`), fsync, rename over `path`, fsync of the
/// directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| Error::io(path, std::io::Error::other("path has no parent directory")))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn create_ca(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(String, CertificateDer<'static>, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(CA_COMMON_NAME, Some("keel"));
    // A per-cluster OU makes every cluster's CA subject unique, so a
    // certificate from another keel cluster fails as "unknown issuer"
    // rather than as a bad signature under a same-named CA.
    params.distinguished_name.push(
        DnType::OrganizationalUnitName,
        format!("cluster-{}", hex(&random_bytes::<8>()?)),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    set_validity_and_serial(&mut params, backdate(now), now + CA_VALIDITY)?;
    let cert = params.self_signed(&key)?;
    let cert_pem = cert.pem();
    let cert_der = cert.der().clone();
    write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert_path, cert_pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), "created cluster CA");
    Ok((cert_pem, cert_der, Issuer::new(params, key)))
}

fn load_ca(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(String, CertificateDer<'static>, Issuer<'static, KeyPair>)> {
    let corrupt = |path: &Path, reason: String| Error::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let cert_pem = fs::read_to_string(cert_path).map_err(|e| Error::io(cert_path, e))?;
    let key_pem = fs::read_to_string(key_path).map_err(|e| Error::io(key_path, e))?;
    let mode = fs::metadata(key_path)
        .map_err(|e| Error::io(key_path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %key_path.display(),
            mode = format!("{:o}", mode & 0o777),
            "CA key is readable by group or others"
        );
    }
    let mut certs = certs_from_pem(&cert_pem).map_err(|e| corrupt(cert_path, e.to_string()))?;
    if certs.len() != 1 {
        return Err(corrupt(
            cert_path,
            "expected exactly one certificate".into(),
        ));
    }
    let cert_der = certs
        .pop()
        .ok_or_else(|| corrupt(cert_path, "no certificate".into()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(key_path, e.to_string()))?;
    let (_, parsed) =
        X509Certificate::from_der(&cert_der).map_err(|e| corrupt(cert_path, e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(corrupt(
            key_path,
            "the CA key does not match the CA certificate".into(),
        ));
    }
    if !parsed.is_ca() {
        return Err(corrupt(cert_path, "not a CA certificate".into()));
    }
    let issuer =
        Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| corrupt(cert_path, e.to_string()))?;
    Ok((cert_pem, cert_der, issuer))
}
