//! Joining the cluster with a token, renewing the node certificate, and
//! loading the node identity.
//!
//! [`join`]:
//! 1. parses the token (`keel1.<node>.<id>.<secret>.<ca-sha256-hex>`);
//! 2. fetches `GET /v1/ca` over TLS *without* verifying the server (this one
//!    request only; nothing secret is sent), hashes the CA it gets and
//!    refuses with [`Error::CaHashMismatch`] unless it is the CA the token
//!    pins;
//! 3. generates a P-256 key, builds a CSR with CN = node and sends
//!    `POST /v1/join` on a new connection that verifies the server against
//!    that CA only;
//! 4. checks the certificate it gets (chains to the CA, CN = node, clientAuth,
//!    our public key) and stores `ca.pem`, `node.pem`, `node.key` (0600) in
//!    `data_dir/pki/`.
//!
//! A join answered 429 (too many joins from this address) is retried after
//! the delay the server names, a few times.
//!
//! [`renew`] does step 3–4 over mutual TLS with the current certificate and
//! swaps key and certificate (the cloud revokes the certificate it replaces).
//! [`LiveIdentity`] holds the identity a running edgecore presents: its
//! TLS client configuration asks it for the certificate at every handshake,
//! and [`LiveIdentity::renew_loop`] renews at 2/3 of the certificate's
//! lifetime and swaps it in, so the next connection uses the new
//! certificate without a restart. The swap writes `node.key.new` and
//! `node.pem.new` (each atomically), then renames them over the old files;
//! [`NodeIdentity::load`] finishes an interrupted swap, so key and
//! certificate always match.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::body::Body as _;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::error::{Error, Result};

/// ALPN protocol of the QUIC sync hub.
pub const ALPN_SYNC: &[u8] = b"keel-sync/1";
/// ALPN protocol of the HTTPS bootstrap endpoint.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Organisation of node certificates issued by the cluster CA.
pub const NODE_ORGANIZATION: &str = "keel:nodes";
/// Time allowed for one bootstrap exchange (connect, TLS, request, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer body accepted from the bootstrap endpoint.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// How far keel's CA backdates `not_before` (clock skew between nodes).
pub const ISSUER_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Joins refused with 429 that are tried again.
const JOIN_RETRIES: u32 = 8;
/// Longest wait before trying a rate-limited join again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// First wait after a failed renewal (doubles up to an hour, never past
/// a third of the time left).
const RENEW_RETRY_MIN: Duration = Duration::from_secs(10);
const RENEW_RETRY_MAX: Duration = Duration::from_secs(3600);

const TOKEN_PREFIX: &str = "keel1.";
const MAX_TOKEN_LEN: usize = 256;
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "node.pem";
const KEY_FILE: &str = "node.key";
const NEW_SUFFIX: &str = ".new";

fn crypto_provider() -> Arc<CryptoProvider> {
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

// ---------------------------------------------------------------------------
// tokens
// ---------------------------------------------------------------------------

/// A parsed join token. `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    raw: String,
    node: String,
    ca_hash: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("node", &self.node)
            .field("ca_hash", &self.ca_hash)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// Parses `keel1.<node>.<id>.<secret>.<ca-sha256-hex>`.
    ///
    /// # Errors
    /// [`Error::InvalidToken`] with the reason.
    pub fn parse(token: &str) -> Result<Self> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::InvalidToken("too long"));
        }
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(Error::InvalidToken("does not start with \"keel1.\""))?;
        let mut fields = rest.rsplitn(4, '.');
        let (Some(ca), Some(secret), Some(id), Some(node)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(Error::InvalidToken(
                "expected keel1.<node>.<id>.<secret>.<ca-hash>",
            ));
        };
        if !is_lower_hex(id, 16) {
            return Err(Error::InvalidToken("id is not 16 lowercase hex digits"));
        }
        if !is_lower_hex(secret, 32) {
            return Err(Error::InvalidToken("secret is not 32 lowercase hex digits"));
        }
        if !is_lower_hex(ca, 64) {
            return Err(Error::InvalidToken(
                "CA hash is not 64 lowercase hex digits",
            ));
        }
        if !is_valid_node_name(node) {
            return Err(Error::InvalidToken("node name is not valid"));
        }
        Ok(Self {
            raw: token.to_owned(),
            node: node.to_owned(),
            ca_hash: format!("sha256:{ca}"),
        })
    }

    /// The node the token is for.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pinned CA hash, `"sha256:<hex>"`.
    #[must_use]
    pub fn ca_hash(&self) -> &str {
        &self.ca_hash
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Names the cloud keeps for itself (`cloudcore` is its CRDT actor and
/// change origin).
const RESERVED_NAMES: [&str; 4] = [
    "cloudcore",
    "keel-cluster-ca",
    "keel-admin",
    "keel-cloudcore",
];

/// Same rule as the cloud: a DNS-1123 subdomain of at most 63 characters
/// (labels of `a-z0-9-`, alphanumeric at both ends), not reserved.
fn is_valid_node_name(name: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .split('.')
            .all(|l| alnum(l.as_bytes().first()) && alnum(l.as_bytes().last()))
        && !RESERVED_NAMES.contains(&name)
}

/// `"sha256:" + hex(sha256(der))`, the form join tokens pin.
#[must_use]
pub fn ca_hash_of_der(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex(digest.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

// ---------------------------------------------------------------------------
// node identity
// ---------------------------------------------------------------------------

/// The node's credentials as stored in `data_dir/pki/`. `Debug` does not show
/// the key.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node name (the certificate's CN).
    pub node: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// The node's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Serial number of the node certificate, lowercase hex.
    pub serial: String,
    /// Start of the node certificate's validity.
    pub not_before: SystemTime,
    /// End of the node certificate's validity.
    pub not_after: SystemTime,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads `ca.pem`, `node.pem` and `node.key` from `data_dir/pki/`,
    /// finishing an interrupted renewal first, and checks that the key
    /// matches the certificate.
    ///
    /// # Errors
    /// [`Error::NotJoined`] if there is no identity, I/O errors, or
    /// unparseable or mismatched files.
    pub fn load(data_dir: &Path) -> Result<Self> {
        let dir = pki_dir(data_dir);
        finish_pending_swap(&dir)?;
        let read = |name: &str| -> Result<String> {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::NotJoined(data_dir.to_owned())
                } else {
                    Error::io(&path, e)
                }
            })
        };
        let ca_pem = read(CA_FILE)?;
        let cert_pem = read(CERT_FILE)?;
        let key_pem = read(KEY_FILE)?;
        Self::from_pems(ca_pem, cert_pem, key_pem)
    }

    fn from_pems(ca_pem: String, cert_pem: String, key_pem: String) -> Result<Self> {
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| Error::Certificate(format!("node key: {e}")))?;
        single_cert(&ca_pem).map_err(|e| Error::Certificate(format!("CA: {e}")))?;
        let info = CertInfo::from_pem(&cert_pem)?;
        if info.public_key != key.public_key_raw() {
            return Err(Error::Certificate(
                "the node key does not match the node certificate".into(),
            ));
        }
        Ok(Self {
            node: info.common_name,
            ca_pem,
            cert_pem,
            key_pem,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Whether the certificate expires within `margin` of `now`.
    #[must_use]
    pub fn needs_renewal(&self, now: SystemTime, margin: Duration) -> bool {
        expires_within(self.not_after, now, margin)
    }

    /// When to renew: 2/3 into the certificate's lifetime. The lifetime
    /// starts [`ISSUER_BACKDATE`] after `not_before` (keel's CA backdates
    /// certificates by that much for clock skew), or at `not_before` if the
    /// certificate is shorter than that.
    #[must_use]
    pub fn renew_at(&self) -> SystemTime {
        let issued = self
            .not_before
            .checked_add(ISSUER_BACKDATE)
            .filter(|t| *t < self.not_after)
            .unwrap_or(self.not_before);
        let lifetime = self.not_after.duration_since(issued).unwrap_or_default();
        issued
            .checked_add(lifetime.mul_f64(2.0 / 3.0))
            .unwrap_or(self.not_after)
    }

    /// The rustls client configuration for the QUIC hub: TLS 1.3, ALPN
    /// [`ALPN_SYNC`], the cluster CA as the only root, the node certificate
    /// as client certificate. Converts with
    /// `quinn::crypto::rustls::QuicClientConfig::try_from`.
    ///
    /// # Errors
    /// A rustls configuration error.
    pub fn client_tls_config(&self) -> Result<rustls::ClientConfig> {
        let mut config = self.mtls_config()?;
        config.alpn_protocols = vec![ALPN_SYNC.to_vec()];
        Ok(config)
    }

    fn mtls_config(&self) -> Result<rustls::ClientConfig> {
        let roots = roots_of(&single_cert(&self.ca_pem)?)?;
        let chain = vec![single_cert(&self.cert_pem)?];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("node key: {e}")))?;
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(Error::TlsConfig)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(Error::TlsConfig)
    }
}

/// Whether the PEM certificate expires within `margin` of `now` (an expired
/// certificate needs renewal too, though the server will then refuse it).
///
/// # Errors
/// [`Error::Certificate`] if the PEM is not a certificate.
pub fn needs_renewal(cert_pem: &str, now: SystemTime, margin: Duration) -> Result<bool> {
    Ok(expires_within(
        CertInfo::from_pem(cert_pem)?.not_after,
        now,
        margin,
    ))
}

fn expires_within(not_after: SystemTime, now: SystemTime, margin: Duration) -> bool {
    match now.checked_add(margin) {
        Some(deadline) => not_after <= deadline,
        None => true,
    }
}

struct CertInfo {
    common_name: String,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    public_key: Vec<u8>,
    der: CertificateDer<'static>,
}

impl CertInfo {
    fn from_pem(pem: &str) -> Result<Self> {
        let der = single_cert(pem)?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| Error::Certificate(format!("not an X.509 certificate: {e}")))?;
        let mut cns = cert.subject().iter_common_name();
        let common_name = match (cns.next().map(|cn| cn.as_str()), cns.next()) {
            (Some(Ok(cn)), None) => cn.to_owned(),
            _ => {
                return Err(Error::Certificate(
                    "certificate must have exactly one string common name".into(),
                ));
            }
        };
        let raw = cert.raw_serial();
        let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
        let serial = hex(raw.get(first..).unwrap_or_default());
        let time =
            |ts: i64| u64::try_from(ts).map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s));
        let not_before = time(cert.validity().not_before.timestamp());
        let not_after = time(cert.validity().not_after.timestamp());
        let public_key = cert.public_key().subject_public_key.data.to_vec();
        Ok(Self {
            common_name,
            serial,
            not_before,
            not_after,
            public_key,
            der: der.clone(),
        })
    }
}

fn single_cert(pem: &str) -> Result<CertificateDer<'static>> {
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("bad certificate PEM: {e}")))?;
    match (certs.pop(), certs.is_empty()) {
        (Some(cert), true) => Ok(cert),
        (None, _) => Err(Error::Certificate("no certificate in PEM".into())),
        (Some(_), false) => Err(Error::Certificate(
            "expected exactly one certificate in PEM".into(),
        )),
    }
}

fn roots_of(ca: &CertificateDer<'static>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| Error::Certificate(format!("CA is not a usable trust anchor: {e}")))?;
    Ok(roots)
}

// ---------------------------------------------------------------------------
// the edge's own endpoints
// ---------------------------------------------------------------------------

/// Serving certificate generated when none is configured (as the kubelet
/// does for its own API): `pki/serving.pem` and `pki/serving.key`.
pub const SERVING_CERT_FILE: &str = "serving.pem";
const SERVING_KEY_FILE: &str = "serving.key";

/// The TLS configuration of the edge's Kubernetes API and log gRPC API when
/// they require authentication: a client certificate issued by the CA in
/// `client_ca` (PEM, one or more certificates), and the serving certificate
/// and key `serving` (PEM files), or else a self-signed one kept in the data
/// directory for `names` (DNS names and IP addresses), created on first
/// use.
///
/// # Errors
/// Unreadable or unusable files, or a rustls configuration error.
pub fn endpoint_tls_config(
    data_dir: &Path,
    client_ca: &Path,
    serving: Option<(&Path, &Path)>,
    names: &[String],
) -> Result<rustls::ServerConfig> {
    let read = |p: &Path| fs::read_to_string(p).map_err(|e| Error::io(p, e));
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(read(client_ca)?.as_bytes()) {
        let c = c.map_err(|e| {
            Error::Certificate(format!("client CA {}: bad PEM: {e}", client_ca.display()))
        })?;
        roots
            .add(c)
            .map_err(|e| Error::Certificate(format!("client CA {}: {e}", client_ca.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Certificate(format!(
            "client CA {}: no certificate in it",
            client_ca.display()
        )));
    }
    let (cert_pem, key_pem) = match serving {
        Some((cert, key)) => (read(cert)?, read(key)?),
        None => self_signed_serving(data_dir, names)?,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("serving certificate: bad PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Certificate(format!("serving key: {e}")))?;
    let provider = crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::Certificate(format!("client CA: {e}")))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Certificate(format!("serving certificate and key: {e}")))
}

/// The self-signed serving certificate and key (PEM) in `pki/`, created
/// for `names` when absent (key 0600).
fn self_signed_serving(data_dir: &Path, names: &[String]) -> Result<(String, String)> {
    let dir = pki_dir(data_dir);
    let (cert, key) = (dir.join(SERVING_CERT_FILE), dir.join(SERVING_KEY_FILE));
    if cert.exists() && key.exists() {
        let read = |p: &Path| fs::read_to_string(p).map_err(|e| Error::io(p, e));
        return Ok((read(&cert)?, read(&key)?));
    }
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(&dir, e))?;
    let pair = KeyPair::generate().map_err(|e| Error::Certificate(e.to_string()))?;
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|e| Error::Certificate(format!("serving certificate names: {e}")))?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "keel edgecore");
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
    let c = params
        .self_signed(&pair)
        .map_err(|e| Error::Certificate(format!("serving certificate: {e}")))?;
    let (cert_pem, key_pem) = (c.pem(), pair.serialize_pem());
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert, cert_pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert.display(), "created a self-signed serving certificate for the edge's endpoints");
    Ok((cert_pem, key_pem))
}

// ---------------------------------------------------------------------------
// join and renew
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct JoinRequest<'a> {
    token: &'a str,
    node: &'a str,
    csr: &'a str,
}

#[derive(Serialize)]
struct RenewRequest<'a> {
    csr: &'a str,
}

#[derive(Deserialize)]
struct CertResponse {
    certificate: String,
    ca: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    retry_after_seconds: Option<u64>,
}

/// The delay a 429 answer asks for.
fn retry_after(status: StatusCode, body: &[u8]) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let secs = serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .and_then(|e| e.retry_after_seconds)
        .unwrap_or(1);
    Some(Duration::from_secs(secs.max(1)).min(MAX_RETRY_AFTER))
}

/// Joins the cluster: see the [module documentation](self). `server` is the
/// bootstrap endpoint; its certificate must carry `server`'s IP address as a
/// SAN.
///
/// # Errors
/// [`Error::InvalidToken`], [`Error::TokenNodeMismatch`],
/// [`Error::CaHashMismatch`] (before any CSR or token is sent),
/// [`Error::Refused`] with the server's reason, transport errors, or I/O
/// errors storing the identity.
pub async fn join(
    server: SocketAddr,
    token: &str,
    node: &str,
    data_dir: &Path,
) -> Result<NodeIdentity> {
    let token = JoinToken::parse(token)?;
    if token.node != node {
        return Err(Error::TokenNodeMismatch {
            token_node: token.node.clone(),
            node: node.chars().take(80).collect(),
        });
    }

    // 1. Fetch the CA without trusting the server, and pin it by the token.
    let (status, body) = exchange(
        Arc::new(unverified_config()?),
        server,
        Method::GET,
        "/v1/ca",
        None,
    )
    .await?;
    if status != StatusCode::OK {
        return Err(refused(status, &body));
    }
    let ca_pem = String::from_utf8(body)
        .map_err(|_| Error::Protocol("the CA answer is not UTF-8".into()))?;
    let ca_der = single_cert(&ca_pem)?;
    let actual = ca_hash_of_der(&ca_der);
    if actual != token.ca_hash {
        tracing::warn!(%server, expected = %token.ca_hash, %actual, "bootstrap server presented the wrong CA");
        return Err(Error::CaHashMismatch {
            addr: server,
            expected: token.ca_hash.clone(),
            actual,
        });
    }
    tracing::info!(%server, ca_hash = %actual, "cluster CA pinned");

    // 2. Key and CSR, then join over a connection verified against that CA.
    let (key, csr) = new_key_and_csr(node)?;
    let body = serde_json::to_string(&JoinRequest {
        token: &token.raw,
        node,
        csr: &csr,
    })
    .map_err(|e| Error::Protocol(e.to_string()))?;
    let config = Arc::new(pinned_config(&ca_der)?);
    let mut attempt = 0;
    let (status, answer) = loop {
        let (status, answer) = exchange(
            Arc::clone(&config),
            server,
            Method::POST,
            "/v1/join",
            Some(body.clone()),
        )
        .await?;
        match retry_after(status, &answer) {
            Some(wait) if attempt < JOIN_RETRIES => {
                attempt += 1;
                tracing::warn!(%server, ?wait, "join rate-limited by the cloud; trying again");
                tokio::time::sleep(wait).await;
            }
            _ => break (status, answer),
        }
    };
    let answer = parse_cert_answer(status, &answer)?;
    let identity = accept_certificate(&answer, &ca_der, &key, node)?;
    store_identity(data_dir, &identity)?;
    tracing::info!(node, serial = %identity.serial, "joined the cluster");
    Ok(identity)
}

/// Renews the node certificate over mutual TLS with the current one, with a
/// new key, and swaps the stored key and certificate.
///
/// # Errors
/// [`Error::NotJoined`], [`Error::Tls`] if the server refuses the current
/// certificate at the handshake (revoked, expired, unknown CA),
/// [`Error::Refused`], transport or I/O errors. The stored identity is
/// unchanged on any error.
pub async fn renew(server: SocketAddr, data_dir: &Path) -> Result<NodeIdentity> {
    let current = NodeIdentity::load(data_dir)?;
    let ca_der = single_cert(&current.ca_pem)?;
    let (key, csr) = new_key_and_csr(&current.node)?;
    let body = serde_json::to_string(&RenewRequest { csr: &csr })
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let mut config = current.mtls_config()?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let (status, body) = exchange(
        Arc::new(config),
        server,
        Method::POST,
        "/v1/renew",
        Some(body),
    )
    .await?;
    let answer = parse_cert_answer(status, &body)?;
    let renewed = accept_certificate(&answer, &ca_der, &key, &current.node)?;
    store_identity(data_dir, &renewed)?;
    tracing::info!(node = %renewed.node, old_serial = %current.serial, serial = %renewed.serial, "renewed node certificate");
    Ok(renewed)
}

/// The identity a running edgecore presents, swapped on renewal: TLS
/// client configurations from [`LiveIdentity::client_tls_config`] ask it for
/// the certificate at every handshake.
/// TLS sessions kept for resumption (one server: the hub).
const SESSIONS_KEPT: usize = 8;

/// The TLS sessions a node may resume, bound to the certificate it had
/// when it got them: once [`LiveIdentity`] presents another (a renewal),
/// they are dropped and the next handshake is a full one with the new
/// certificate (the old one is revoked: a session resumed with it would be
/// refused, and the refused connection would hand out another such ticket).
struct IdentitySessions {
    live: Arc<LiveIdentity>,
    /// (serial the sessions belong to, the sessions).
    cache: std::sync::Mutex<(String, Arc<rustls::client::ClientSessionMemoryCache>)>,
}

impl fmt::Debug for IdentitySessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentitySessions").finish_non_exhaustive()
    }
}

impl IdentitySessions {
    /// The sessions of the certificate presented now.
    fn current(&self) -> Arc<rustls::client::ClientSessionMemoryCache> {
        let serial = self.live.identity().serial;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.0 != serial {
            *cache = (
                serial,
                Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS_KEPT)),
            );
        }
        Arc::clone(&cache.1)
    }
}

impl rustls::client::ClientSessionStore for IdentitySessions {
    fn set_kx_hint(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        group: rustls::NamedGroup,
    ) {
        self.current().set_kx_hint(server, group);
    }

    fn kx_hint(&self, server: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.current().kx_hint(server)
    }

    fn set_tls12_session(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.current().set_tls12_session(server, value);
    }

    fn tls12_session(
        &self,
        server: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.current().tls12_session(server)
    }

    fn remove_tls12_session(&self, server: &rustls::pki_types::ServerName<'static>) {
        self.current().remove_tls12_session(server);
    }

    fn insert_tls13_ticket(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.current().insert_tls13_ticket(server, value);
    }

    fn take_tls13_ticket(
        &self,
        server: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.current().take_tls13_ticket(server)
    }
}

pub struct LiveIdentity {
    current: std::sync::RwLock<(NodeIdentity, Arc<rustls::sign::CertifiedKey>)>,
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("identity", &self.identity())
            .finish()
    }
}

fn certified_key(id: &NodeIdentity) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let chain = vec![single_cert(&id.cert_pem)?];
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| Error::Certificate(format!("node key: {e}")))?;
    rustls::sign::CertifiedKey::from_der(chain, key, &crypto_provider())
        .map(Arc::new)
        .map_err(Error::TlsConfig)
}

impl LiveIdentity {
    /// Starts with `identity`.
    ///
    /// # Errors
    /// An unusable certificate or key.
    pub fn new(identity: NodeIdentity) -> Result<Arc<Self>> {
        let key = certified_key(&identity)?;
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new((identity, key)),
        }))
    }

    /// The identity presented now.
    #[must_use]
    pub fn identity(&self) -> NodeIdentity {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Presents `identity` from the next handshake on (same node and CA).
    ///
    /// # Errors
    /// An unusable certificate or key, or an identity of another node.
    pub fn replace(&self, identity: NodeIdentity) -> Result<()> {
        let key = certified_key(&identity)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0.node != identity.node || current.0.ca_pem != identity.ca_pem {
            return Err(Error::Certificate(
                "a renewed identity must be of the same node and CA".into(),
            ));
        }
        *current = (identity, key);
        Ok(())
    }

    /// The rustls client configuration for the QUIC hub (as
    /// [`NodeIdentity::client_tls_config`]) presenting the current
    /// certificate at each handshake.
    ///
    /// # Errors
    /// A rustls configuration error.
    pub fn client_tls_config(self: &Arc<Self>) -> Result<rustls::ClientConfig> {
        let roots = roots_of(&single_cert(&self.identity().ca_pem)?)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(Error::TlsConfig)?
            .with_root_certificates(roots)
            .with_client_cert_resolver(
                Arc::clone(self) as Arc<dyn rustls::client::ResolvesClientCert>
            );
        config.alpn_protocols = vec![ALPN_SYNC.to_vec()];
        // The hub's session tickets, for this certificate only: a resumed
        // session keeps the certificate of its first handshake, which a
        // renewal revokes.
        config.resumption = rustls::client::Resumption::store(Arc::new(IdentitySessions {
            live: Arc::clone(self),
            cache: std::sync::Mutex::new((
                String::new(),
                Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS_KEPT)),
            )),
        }));
        Ok(config)
    }

    /// Renews the certificate at [`NodeIdentity::renew_at`] through the
    /// bootstrap endpoint at `server`, stores it in `data_dir` and presents
    /// it from then on; a failed renewal is tried again with a growing
    /// delay. Runs until dropped.
    pub async fn renew_loop(self: Arc<Self>, server: SocketAddr, data_dir: PathBuf) {
        let mut failures = 0u32;
        loop {
            let current = self.identity();
            let at = current.renew_at();
            if let Ok(wait) = at.duration_since(SystemTime::now()) {
                tracing::info!(serial = %current.serial, ?wait, "next certificate renewal");
                // In steps, so a clock that jumps is noticed.
                tokio::time::sleep(wait.min(RENEW_RETRY_MAX)).await;
                continue;
            }
            match renew(server, &data_dir).await {
                Ok(renewed) => {
                    failures = 0;
                    if let Err(e) = self.replace(renewed) {
                        tracing::error!(error = %e, "cannot use the renewed certificate");
                    }
                }
                Err(e) => {
                    let left = current
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let wait = RENEW_RETRY_MIN
                        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
                        .min(RENEW_RETRY_MAX)
                        .min((left / 3).max(RENEW_RETRY_MIN));
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, ?wait, "certificate renewal failed; trying again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

impl rustls::client::ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1,
        ))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn new_key_and_csr(node: &str) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

fn parse_cert_answer(status: StatusCode, body: &[u8]) -> Result<CertResponse> {
    if status != StatusCode::OK {
        return Err(refused(status, body));
    }
    serde_json::from_slice(body).map_err(|e| Error::Protocol(format!("certificate answer: {e}")))
}

fn refused(status: StatusCode, body: &[u8]) -> Error {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) => Error::Refused {
            status: status.as_u16(),
            code: e.error,
            reason: e.reason,
        },
        Err(_) => Error::Refused {
            status: status.as_u16(),
            code: "unknown".into(),
            reason: String::from_utf8_lossy(body.get(..200).unwrap_or(body)).into_owned(),
        },
    }
}

/// Checks an issued certificate before storing it: the CA is the pinned one,
/// the certificate chains to it as a client certificate (validity and EKU
/// included), its CN is the node and its key is ours.
fn accept_certificate(
    answer: &CertResponse,
    ca_der: &CertificateDer<'static>,
    key: &KeyPair,
    node: &str,
) -> Result<NodeIdentity> {
    if single_cert(&answer.ca)? != *ca_der {
        return Err(Error::Protocol(
            "the server answered with another CA than the pinned one".into(),
        ));
    }
    let info = CertInfo::from_pem(&answer.certificate)?;
    if info.common_name != node {
        return Err(Error::Protocol(format!(
            "issued certificate is for {:?}, not {node:?}",
            info.common_name
        )));
    }
    if info.public_key != key.public_key_raw() {
        return Err(Error::Protocol(
            "issued certificate does not carry our public key".into(),
        ));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots_of(ca_der)?),
        crypto_provider(),
    )
    .build()
    .map_err(|e| Error::Certificate(e.to_string()))?;
    verifier
        .verify_client_cert(&info.der, &[], UnixTime::now())
        .map_err(|e| Error::Protocol(format!("issued certificate does not verify: {e}")))?;
    Ok(NodeIdentity {
        node: node.to_owned(),
        ca_pem: answer.ca.clone(),
        cert_pem: answer.certificate.clone(),
        key_pem: key.serialize_pem(),
        serial: info.serial,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

// ---------------------------------------------------------------------------
// TLS and HTTP
// ---------------------------------------------------------------------------

/// Accepts any server certificate. Used for `GET /v1/ca` only: the answer is
/// checked against the hash in the token before anything is trusted or sent.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn unverified_config() -> Result<rustls::ClientConfig> {
    let provider = crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

fn pinned_config(ca_der: &CertificateDer<'static>) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::TlsConfig)?
        .with_root_certificates(roots_of(ca_der)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 request on a fresh TLS connection.
async fn exchange(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    method: Method,
    path: &'static str,
    body: Option<String>,
) -> Result<(StatusCode, Vec<u8>)> {
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        exchange_inner(config, addr, method, path, body),
    )
    .await
    .map_err(|_| Error::Timeout {
        what: "bootstrap request",
        after: REQUEST_TIMEOUT,
    })?
}

async fn exchange_inner(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    method: Method,
    path: &'static str,
    body: Option<String>,
) -> Result<(StatusCode, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| Error::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| transport_error(addr, &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, String>(TokioIo::new(tls))
        .await
        .map_err(|e| transport_error(addr, &e))?;
    let mut conn = AbortOnDrop(tokio::spawn(async move {
        let ended = conn.await;
        if let Err(e) = &ended {
            tracing::debug!(error = %e, "bootstrap client connection ended with an error");
        }
        ended
    }));
    let is_post = method == Method::POST;
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close");
    if is_post {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(body.unwrap_or_default())
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(e) => {
            // In TLS 1.3 the server judges a client certificate after the
            // client's handshake is done: its alert (a revoked certificate)
            // ends the connection task, and the request only sees that the
            // connection went away. Report the connection's error then.
            let ended = tokio::time::timeout(Duration::from_secs(1), &mut conn.0).await;
            if let Ok(Ok(Err(conn_err))) = ended {
                return Err(transport_error(addr, &conn_err));
            }
            return Err(transport_error(addr, &e));
        }
    };
    let status = response.status();
    let mut incoming = std::pin::pin!(response.into_body());
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| incoming.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| transport_error(addr, &e))?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > MAX_RESPONSE_BYTES {
                return Err(Error::Protocol(format!(
                    "answer larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((status, buf))
}

/// Finds a rustls error (a local failure or a peer's alert) in an error's
/// source chain, so that a refusal at the TLS layer is reported as such.
fn transport_error(addr: SocketAddr, err: &(dyn std::error::Error + 'static)) -> Error {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Error::Tls {
                addr,
                source: tls.clone(),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return Error::Tls {
                addr,
                source: tls.clone(),
            };
        }
        current = e.source();
    }
    Error::Http {
        addr,
        reason: error_chain(err),
    }
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

// ---------------------------------------------------------------------------
// storage
// ---------------------------------------------------------------------------

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

fn with_suffix(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{NEW_SUFFIX}"))
}

/// Stores CA, key and certificate. The CA is written first (it does not
/// change on renewal); key and certificate are swapped as described in the
/// module documentation.
fn store_identity(data_dir: &Path, id: &NodeIdentity) -> Result<()> {
    let dir = pki_dir(data_dir);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(&dir, e))?;
    write_atomic(&dir.join(CA_FILE), id.ca_pem.as_bytes(), 0o644)?;
    let key_new = with_suffix(&dir, KEY_FILE);
    let cert_new = with_suffix(&dir, CERT_FILE);
    write_atomic(&key_new, id.key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert_new, id.cert_pem.as_bytes(), 0o644)?;
    finish_pending_swap(&dir)
}

/// Completes a key/certificate swap: both `.new` files present → rename the
/// key, then the certificate; only `node.pem.new` → the key was already
/// renamed, rename the certificate; only `node.key.new` → the swap never got
/// its certificate, discard the key.
fn finish_pending_swap(dir: &Path) -> Result<()> {
    let key_new = with_suffix(dir, KEY_FILE);
    let cert_new = with_suffix(dir, CERT_FILE);
    let exists = |p: &Path| p.try_exists().map_err(|e| Error::io(p, e));
    let (has_key, has_cert) = (exists(&key_new)?, exists(&cert_new)?);
    if has_key && !has_cert {
        tracing::warn!(path = %key_new.display(), "discarding the key of an unfinished renewal");
        fs::remove_file(&key_new).map_err(|e| Error::io(&key_new, e))?;
    }
    if has_key && has_cert {
        let key = dir.join(KEY_FILE);
        fs::rename(&key_new, &key).map_err(|e| Error::io(&key, e))?;
    }
    if has_cert {
        let cert = dir.join(CERT_FILE);
        fs::rename(&cert_new, &cert).map_err(|e| Error::io(&cert, e))?;
    }
    if has_key || has_cert {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Temporary file (with `mode`), fsync, rename over `path`, fsync of the
/// directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| Error::io(path, std::io::Error::other("path has no parent directory")))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
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
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
