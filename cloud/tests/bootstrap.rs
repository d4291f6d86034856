//! Join tokens and the HTTPS bootstrap endpoint, driven by the real edge
//! client (`keel_edge::bootstrap`) and by a raw HTTPS client, all over TLS on
//! 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keel_cloud::bootstrap::{BootstrapOptions, BootstrapServer};
use keel_cloud::pki::{self, ClusterCa};
use keel_cloud::token::{self, TokenStore};
use keel_cloud::{Error, TokenError};
use keel_edge::bootstrap::{self as edge, NodeIdentity};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x509_parser::prelude::{FromDer as _, X509Certificate};

const HOUR: Duration = Duration::from_secs(3600);

struct Cluster {
    dir: tempfile::TempDir,
    ca: Arc<ClusterCa>,
    tokens: Arc<TokenStore>,
    server: BootstrapServer,
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(BootstrapOptions::default().with_max_body_bytes(16 * 1024)).await
    }

    async fn start_with(options: BootstrapOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(ClusterCa::load_or_create(dir.path()).unwrap());
        let tokens = Arc::new(TokenStore::open(dir.path(), &ca.ca_hash()).unwrap());
        let server_creds = ca.server_cert(&["127.0.0.1", "localhost"]).unwrap();
        let server = BootstrapServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&ca),
            Arc::clone(&tokens),
            &server_creds,
            options,
        )
        .await
        .unwrap();
        Self {
            dir,
            ca,
            tokens,
            server,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn token(&self, node: &str) -> String {
        self.tokens
            .create(node, HOUR, SystemTime::now())
            .unwrap()
            .as_str()
            .to_owned()
    }
}

fn key_and_csr(cn: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

/// A raw HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a JSON error answer with this status and code.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{self:?} / {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/json");
        let json = self.json();
        assert_eq!(json["error"], code, "{json}");
        assert!(
            json["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "missing reason: {json}"
        );
    }
}

/// Sends `body` raw over TLS 1.3 (server verified against `ca_pem`,
/// optionally presenting a client certificate) and reads the whole answer.
async fn raw_request(
    addr: SocketAddr,
    ca_pem: &str,
    client_cert: Option<(&str, &str)>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Answer, std::io::Error> {
    raw_request_from(None, addr, ca_pem, client_cert, method, path, body).await
}

/// A TCP connection from `src` (any 127.0.0.0/8 address works on loopback).
async fn connect_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
) -> Result<tokio::net::TcpStream, std::io::Error> {
    match src {
        None => tokio::net::TcpStream::connect(addr).await,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await
        }
    }
}

fn client_config(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki::certs_from_pem(ca_pem).unwrap() {
        roots.add(cert).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(pki::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

async fn raw_request_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
    ca_pem: &str,
    client_cert: Option<(&str, &str)>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Answer, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki::certs_from_pem(ca_pem).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(pki::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                pki::certs_from_pem(cert).unwrap(),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = connect_from(src, addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok(Answer {
        status,
        content_type,
        head,
        body: raw[split + 4..].to_vec(),
    })
}

fn join_body(token: &str, node: &str, csr: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "token": token, "node": node, "csr": csr })).unwrap()
}

fn chains_to(ca: &ClusterCa, cert_pem: &str) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        pki::crypto_provider(),
    )
    .build()
    .unwrap();
    let der = pki::certs_from_pem(cert_pem).unwrap().remove(0);
    verifier
        .verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
}

fn token_err(result: keel_cloud::Result<()>) -> TokenError {
    match result {
        Err(Error::Token(t)) => t,
        other => panic!("expected a token error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// token store
// ---------------------------------------------------------------------------

#[test]
fn token_format_carries_node_and_ca_hash_and_store_keeps_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let store = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let t = store
        .create("edge.site-1", HOUR, SystemTime::now())
        .unwrap();
    let parsed = token::parse_token(t.as_str()).unwrap();
    assert_eq!(parsed.node, "edge.site-1");
    assert_eq!(parsed.ca_hash, ca.ca_hash());
    assert_eq!(parsed.id, t.id());
    // The edge parses the same format.
    let edge_tok = edge::JoinToken::parse(t.as_str()).unwrap();
    assert_eq!(edge_tok.node(), "edge.site-1");
    assert_eq!(edge_tok.ca_hash(), ca.ca_hash());

    let file = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
    assert!(file.contains(t.id()));
    assert!(
        !file.contains(parsed.secret),
        "the secret must not be stored"
    );
    let mode = std::fs::metadata(dir.path().join("tokens.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        !format!("{t:?}").contains(parsed.secret),
        "Debug must not print the secret"
    );
    assert!(!format!("{edge_tok:?}").contains(parsed.secret));
}

#[test]
fn token_bound_to_node_a_is_refused_for_node_b() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let store = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let now = SystemTime::now();
    let t = store.create("edge-a", HOUR, now).unwrap();
    let err = token_err(store.redeem(t.as_str(), "edge-b", now));
    assert_eq!(
        err,
        TokenError::WrongNode {
            bound: "edge-a".into(),
            requested: "edge-b".into()
        }
    );
    assert!(
        err.to_string().contains("bound to node \"edge-a\""),
        "{err}"
    );
    // The failed attempt did not use the token up.
    store.redeem(t.as_str(), "edge-a", now).unwrap();
}

#[test]
fn expired_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let store = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let t = store.create("edge-1", HOUR, t0).unwrap();
    assert_eq!(t.expires_at(), t0 + HOUR);
    store
        .check(t.as_str(), "edge-1", t0 + HOUR - Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        token_err(store.redeem(t.as_str(), "edge-1", t0 + HOUR)),
        TokenError::Expired
    );
    assert_eq!(
        token_err(store.redeem(t.as_str(), "edge-1", t0 + 2 * HOUR)),
        TokenError::Expired
    );
}

#[test]
fn token_is_single_use_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let now = SystemTime::now();
    let store = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let t = store.create("edge-1", HOUR, now).unwrap();
    let unused = store.create("edge-2", HOUR, now).unwrap();
    store.redeem(t.as_str(), "edge-1", now).unwrap();
    assert_eq!(
        token_err(store.redeem(t.as_str(), "edge-1", now)),
        TokenError::AlreadyUsed
    );
    drop(store);
    let reopened = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    assert_eq!(
        token_err(reopened.redeem(t.as_str(), "edge-1", now)),
        TokenError::AlreadyUsed
    );
    reopened.redeem(unused.as_str(), "edge-2", now).unwrap();
}

#[test]
fn malformed_and_unknown_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let store = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let now = SystemTime::now();
    let good = store.create("edge-1", HOUR, now).unwrap();
    let g = good.as_str();
    let long = "a".repeat(10_000);
    let wrong_prefix = g.replacen("keel1.", "keel2.", 1);
    let upper = g.to_uppercase();
    let short_secret = {
        let mut parts: Vec<&str> = g.rsplitn(4, '.').collect();
        parts[1] = "abcd";
        parts.reverse();
        parts.join(".")
    };
    for bad in [
        "",
        "keel1.",
        "keel1.edge-1",
        "garbage",
        "keel1....",
        &long,
        &wrong_prefix,
        &upper,
        &short_secret,
        "keel1.\u{0}.\u{1}.\u{2}.\u{3}",
    ] {
        let err = token_err(store.redeem(bad, "edge-1", now));
        assert!(matches!(err, TokenError::Malformed(_)), "{bad:?}: {err}");
        assert!(
            edge::JoinToken::parse(bad).is_err(),
            "edge accepted {bad:?}"
        );
    }
    // Well-formed but unknown: another id, another secret, another cluster.
    let flip_last = |s: &str, at_from_end: usize| {
        let mut b = s.as_bytes().to_vec();
        let i = b.len() - at_from_end;
        b[i] = if b[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    let other_secret = flip_last(g, 66); // last char of the secret
    let other_ca = flip_last(g, 1);
    let other_id = {
        let parsed = token::parse_token(g).unwrap();
        g.replacen(parsed.id, "0123456789abcdef", 1)
    };
    let other_node_in_string = g.replacen("keel1.edge-1.", "keel1.edge-2.", 1);
    for bad in [&other_secret, &other_ca, &other_id] {
        assert_eq!(
            token_err(store.redeem(bad, "edge-1", now)),
            TokenError::Unknown,
            "{bad}"
        );
    }
    // Editing the node inside the token does not rebind it.
    assert_eq!(
        token_err(store.redeem(&other_node_in_string, "edge-2", now)),
        TokenError::Unknown
    );
    // None of this used the real token up.
    store.redeem(g, "edge-1", now).unwrap();
}

#[test]
fn token_store_refuses_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    assert!(TokenStore::open(dir.path(), "md5:abc").is_err());
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let store = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    assert!(matches!(
        store.create("Bad_Name", HOUR, SystemTime::now()),
        Err(Error::InvalidNodeName { .. })
    ));
    assert!(
        store
            .create("edge-1", Duration::MAX, SystemTime::now())
            .is_err()
    );
    std::fs::write(dir.path().join("tokens.json"), b"{not json").unwrap();
    assert!(matches!(
        TokenStore::open(dir.path(), &ca.ca_hash()),
        Err(Error::Corrupt { .. })
    ));
}

// ---------------------------------------------------------------------------
// join through the endpoint
// ---------------------------------------------------------------------------

#[tokio::test]
async fn join_end_to_end_stores_an_identity_that_chains_to_the_ca() {
    let cluster = Cluster::start().await;
    let token = cluster.token("edge-1");
    let edge_dir = tempfile::tempdir().unwrap();

    let identity = edge::join(cluster.addr(), &token, "edge-1", edge_dir.path())
        .await
        .unwrap();
    assert_eq!(identity.node, "edge-1");
    assert_eq!(identity.ca_pem, cluster.ca.cert_pem());
    chains_to(&cluster.ca, &identity.cert_pem).unwrap();
    let der = pki::certs_from_pem(&identity.cert_pem).unwrap().remove(0);
    assert_eq!(pki::node_name_from_cert(&der).unwrap(), "edge-1");
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "edge-1");
    let key = KeyPair::from_pem(&identity.key_pem).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    let pki_dir = edge_dir.path().join("pki");
    for (file, mode) in [("ca.pem", 0o644), ("node.pem", 0o644), ("node.key", 0o600)] {
        let m = std::fs::metadata(pki_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, mode, "{file}");
    }
    let loaded = NodeIdentity::load(edge_dir.path()).unwrap();
    assert_eq!(loaded, identity);
    assert!(!format!("{loaded:?}").contains("PRIVATE KEY"));

    let stats = cluster.server.stats();
    assert_eq!(
        (stats.ca_served, stats.join_requests, stats.joins_ok),
        (1, 1, 1)
    );

    // The stored identity authenticates against the hub's QUIC-ready TLS config.
    let server_creds = cluster.ca.server_cert(&["127.0.0.1"]).unwrap();
    let hub =
        pki::server_tls_config(&cluster.ca, &server_creds.cert_pem, &server_creds.key_pem).unwrap();
    let client = loaded.client_tls_config().unwrap();
    assert_eq!(client.alpn_protocols, vec![pki::ALPN_SYNC.to_vec()]);
    quinn::crypto::rustls::QuicServerConfig::try_from(hub).unwrap();
    quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();

    // The same token cannot be used a second time, even by the same node.
    let again = tempfile::tempdir().unwrap();
    let err = edge::join(cluster.addr(), &token, "edge-1", again.path())
        .await
        .unwrap_err();
    match &err {
        keel_edge::Error::Refused { status, code, .. } => {
            assert_eq!((*status, code.as_str()), (401, "token_used"));
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(!again.path().join("pki/node.key").exists());
    cluster.server.shutdown().await;
}

#[tokio::test]
async fn token_for_node_a_is_refused_for_node_b_over_https() {
    let cluster = Cluster::start().await;
    let token = cluster.token("edge-a");
    // Through the raw endpoint: the token is bound to edge-a.
    let (_key, csr) = key_and_csr("edge-b");
    let answer = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        None,
        "POST",
        "/v1/join",
        &join_body(&token, "edge-b", &csr),
    )
    .await
    .unwrap();
    answer.assert_error(401, "token_wrong_node");
    assert!(answer.json()["reason"].as_str().unwrap().contains("edge-a"));
    // The edge client refuses before contacting anyone.
    let dir = tempfile::tempdir().unwrap();
    let err = edge::join(cluster.addr(), &token, "edge-b", dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(err, keel_edge::Error::TokenNodeMismatch { .. }),
        "{err}"
    );
    // edge-a can still use it.
    edge::join(cluster.addr(), &token, "edge-a", dir.path())
        .await
        .unwrap();
    assert_eq!(cluster.server.stats().joins_ok, 1);
}

#[tokio::test]
async fn expired_token_is_refused_over_https() {
    let cluster = Cluster::start().await;
    let long_ago = SystemTime::now() - 3 * HOUR;
    let token = cluster.tokens.create("edge-1", HOUR, long_ago).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = edge::join(cluster.addr(), token.as_str(), "edge-1", dir.path())
        .await
        .unwrap_err();
    match &err {
        keel_edge::Error::Refused {
            status,
            code,
            reason,
        } => {
            assert_eq!((*status, code.as_str()), (401, "token_expired"));
            assert!(reason.contains("expired"), "{reason}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(!dir.path().join("pki/node.pem").exists());
    assert_eq!(cluster.server.stats().joins_ok, 0);
}

#[tokio::test]
async fn malformed_token_is_refused_over_https() {
    let cluster = Cluster::start().await;
    let (_key, csr) = key_and_csr("edge-1");
    for token in ["", "garbage", "keel1.edge-1.zz.zz.zz"] {
        let answer = raw_request(
            cluster.addr(),
            cluster.ca.cert_pem(),
            None,
            "POST",
            "/v1/join",
            &join_body(token, "edge-1", &csr),
        )
        .await
        .unwrap();
        answer.assert_error(400, "token_malformed");
        let err = edge::join(
            cluster.addr(),
            token,
            "edge-1",
            tempfile::tempdir().unwrap().path(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, keel_edge::Error::InvalidToken(_)), "{err}");
    }
    // A well-formed token this cluster never issued.
    let forged = format!(
        "keel1.edge-1.{}.{}.{}",
        "0".repeat(16),
        "0".repeat(32),
        cluster.ca.ca_hash().trim_start_matches("sha256:")
    );
    let answer = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        None,
        "POST",
        "/v1/join",
        &join_body(&forged, "edge-1", &csr),
    )
    .await
    .unwrap();
    answer.assert_error(401, "token_unknown");
}

#[tokio::test]
async fn ca_hash_mismatch_is_refused_by_the_edge_before_any_csr_is_sent() {
    let cluster = Cluster::start().await;
    // A token from another cluster (another CA) for the same node name.
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = ClusterCa::load_or_create(other_dir.path()).unwrap();
    let other_tokens = TokenStore::open(other_dir.path(), &other_ca.ca_hash()).unwrap();
    let foreign = other_tokens
        .create("edge-1", HOUR, SystemTime::now())
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let err = edge::join(cluster.addr(), foreign.as_str(), "edge-1", dir.path())
        .await
        .unwrap_err();
    match &err {
        keel_edge::Error::CaHashMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &other_ca.ca_hash());
            assert_eq!(actual, &cluster.ca.ca_hash());
        }
        other => panic!("expected CaHashMismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("cluster CA mismatch") && msg.contains("refusing to trust"),
        "{msg}"
    );
    let stats = cluster.server.stats();
    assert_eq!(stats.ca_served, 1, "the edge fetched the CA");
    assert_eq!(
        stats.join_requests, 0,
        "no CSR or token may reach the server"
    );
    assert!(!dir.path().join("pki/node.key").exists());
    assert!(!dir.path().join("pki/ca.pem").exists());
}

#[tokio::test]
async fn csr_for_another_node_gives_403_and_does_not_burn_the_token() {
    let cluster = Cluster::start().await;
    let token = cluster.token("edge-1");
    let (_key, csr) = key_and_csr("edge-2");
    let answer = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        None,
        "POST",
        "/v1/join",
        &join_body(&token, "edge-1", &csr),
    )
    .await
    .unwrap();
    answer.assert_error(403, "node_mismatch");
    let (_key, garbage_csr) = (
        "",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    );
    let answer = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        None,
        "POST",
        "/v1/join",
        &join_body(&token, "edge-1", garbage_csr),
    )
    .await
    .unwrap();
    answer.assert_error(400, "invalid_csr");
    // The token still works for a correct CSR.
    let (_key, csr) = key_and_csr("edge-1");
    let answer = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        None,
        "POST",
        "/v1/join",
        &join_body(&token, "edge-1", &csr),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    let json = answer.json();
    chains_to(&cluster.ca, json["certificate"].as_str().unwrap()).unwrap();
    assert_eq!(json["ca"], cluster.ca.cert_pem());
}

#[tokio::test]
async fn garbage_bodies_give_json_errors() {
    let cluster = Cluster::start().await;
    let addr = cluster.addr();
    let ca = cluster.ca.cert_pem();
    let bad_bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"token\"".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x80],
        br#"{"token": 1, "node": [], "csr": {}}"#.to_vec(),
        br#"{"token": "x", "node": "edge-1"}"#.to_vec(),
    ];
    for body in &bad_bodies {
        raw_request(addr, ca, None, "POST", "/v1/join", body)
            .await
            .unwrap()
            .assert_error(400, "malformed_request");
    }
    // A body over the limit.
    let huge = vec![b'x'; 64 * 1024];
    raw_request(addr, ca, None, "POST", "/v1/join", &huge)
        .await
        .unwrap()
        .assert_error(413, "body_too_large");
    // Invalid node name.
    let (_key, csr) = key_and_csr("edge-1");
    raw_request(
        addr,
        ca,
        None,
        "POST",
        "/v1/join",
        &join_body("t", "Not A Node", &csr),
    )
    .await
    .unwrap()
    .assert_error(400, "invalid_node_name");
    // Unknown route and wrong method.
    raw_request(addr, ca, None, "GET", "/v1/nothing", b"")
        .await
        .unwrap()
        .assert_error(404, "not_found");
    raw_request(addr, ca, None, "GET", "/v1/join", b"")
        .await
        .unwrap()
        .assert_error(405, "method_not_allowed");
    // Renew without a client certificate.
    raw_request(addr, ca, None, "POST", "/v1/renew", b"{}")
        .await
        .unwrap()
        .assert_error(401, "client_certificate_required");
    // The CA is public.
    let answer = raw_request(addr, ca, None, "GET", "/v1/ca", b"")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, ca.as_bytes());
    // Non-HTTP bytes inside TLS, and non-TLS bytes: the server survives.
    {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    }
    let answer = raw_request(addr, ca, None, "GET", "/v1/ca", b"")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert!(cluster.server.stats().tls_failures >= 1);
}

// ---------------------------------------------------------------------------
// renewal
// ---------------------------------------------------------------------------

#[tokio::test]
async fn renewal_with_a_valid_certificate_rotates_key_and_certificate() {
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = edge::join(
        cluster.addr(),
        &cluster.token("edge-1"),
        "edge-1",
        dir.path(),
    )
    .await
    .unwrap();

    let now = SystemTime::now();
    assert!(!first.needs_renewal(now, Duration::from_secs(7 * 86400)));
    assert!(first.needs_renewal(now, Duration::from_secs(31 * 86400)));
    assert!(!edge::needs_renewal(&first.cert_pem, now, Duration::from_secs(86400)).unwrap());
    assert!(
        edge::needs_renewal(
            &first.cert_pem,
            now + Duration::from_secs(30 * 86400),
            Duration::ZERO
        )
        .unwrap()
    );
    assert!(edge::needs_renewal("garbage", now, Duration::ZERO).is_err());

    let renewed = edge::renew(cluster.addr(), dir.path()).await.unwrap();
    assert_eq!(renewed.node, "edge-1");
    assert_ne!(renewed.serial, first.serial);
    assert_ne!(
        renewed.key_pem, first.key_pem,
        "renewal must rotate the key"
    );
    chains_to(&cluster.ca, &renewed.cert_pem).unwrap();
    let loaded = NodeIdentity::load(dir.path()).unwrap();
    assert_eq!(loaded, renewed);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("pki"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".new") || n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let stats = cluster.server.stats();
    assert_eq!((stats.renew_requests, stats.renewals_ok), (1, 1));

    // The replaced certificate is revoked, durably.
    assert!(cluster.ca.is_revoked(&first.serial));
    assert!(!cluster.ca.is_revoked(&renewed.serial));
    let reloaded = ClusterCa::load_or_create(cluster.dir.path()).unwrap();
    assert!(reloaded.is_revoked(&first.serial));

    // Renewing again at once is refused: one renewal per interval.
    match edge::renew(cluster.addr(), dir.path()).await.unwrap_err() {
        keel_edge::Error::Refused { status, code, .. } => {
            assert_eq!((status, code.as_str()), (429, "rate_limited"));
        }
        other => panic!("expected 429, got {other}"),
    }
    assert_eq!(NodeIdentity::load(dir.path()).unwrap(), renewed);
    let body = serde_json::to_vec(&serde_json::json!({ "csr": key_and_csr("edge-1").1 })).unwrap();
    let answer = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        Some((&renewed.cert_pem, &renewed.key_pem)),
        "POST",
        "/v1/renew",
        &body,
    )
    .await
    .unwrap();
    answer.assert_error(429, "rate_limited");
    assert!(answer.json()["retryAfterSeconds"].as_u64().unwrap() > 0);
    assert!(
        answer.head.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        answer.head
    );
    assert_eq!(cluster.server.stats().renewals_ok, 1);

    // The replaced certificate cannot renew (refused at the handshake).
    let old = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(old.path().join("pki")).unwrap();
    for (name, pem) in [
        ("ca.pem", &first.ca_pem),
        ("node.pem", &first.cert_pem),
        ("node.key", &first.key_pem),
    ] {
        std::fs::write(old.path().join("pki").join(name), pem).unwrap();
    }
    match edge::renew(cluster.addr(), old.path()).await.unwrap_err() {
        keel_edge::Error::Tls { source, .. } => assert_eq!(
            source,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)
        ),
        other => panic!("expected a TLS refusal, got {other}"),
    }
}

#[tokio::test]
async fn renewals_without_an_interval_chain_and_each_revokes_the_last() {
    let cluster =
        Cluster::start_with(BootstrapOptions::default().with_renew_min_interval(Duration::ZERO))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let mut last = edge::join(
        cluster.addr(),
        &cluster.token("edge-1"),
        "edge-1",
        dir.path(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let next = edge::renew(cluster.addr(), dir.path()).await.unwrap();
        assert_ne!(next.serial, last.serial);
        assert!(cluster.ca.is_revoked(&last.serial));
        assert!(!cluster.ca.is_revoked(&next.serial));
        last = next;
    }
    assert_eq!(cluster.ca.issued_to("edge-1").last(), Some(&last.serial));
    assert_eq!(cluster.server.stats().renewals_ok, 3);
}

#[tokio::test]
async fn renewal_with_a_revoked_certificate_is_refused_at_the_handshake() {
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let id = edge::join(
        cluster.addr(),
        &cluster.token("edge-1"),
        "edge-1",
        dir.path(),
    )
    .await
    .unwrap();
    cluster.ca.revoke(&id.serial).unwrap();

    let err = edge::renew(cluster.addr(), dir.path()).await.unwrap_err();
    match &err {
        keel_edge::Error::Tls { source, .. } => {
            assert_eq!(
                *source,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)
            );
        }
        other => panic!("expected a TLS refusal, got {other}"),
    }
    assert!(err.to_string().contains("CertificateRevoked"), "{err}");
    // Nothing changed on disk, and nothing was issued.
    assert_eq!(NodeIdentity::load(dir.path()).unwrap(), id);
    assert_eq!(cluster.server.stats().renewals_ok, 0);
}

#[tokio::test]
async fn renewal_with_an_expired_or_foreign_certificate_is_refused() {
    let cluster = Cluster::start().await;
    let now = SystemTime::now();
    let (key, csr) = key_and_csr("edge-1");
    let expired = cluster
        .ca
        .sign_node_csr_between(&csr, "edge-1", now - 2 * 24 * HOUR, now - 24 * HOUR)
        .unwrap();
    let (_k, new_csr) = key_and_csr("edge-1");
    let body = serde_json::to_vec(&serde_json::json!({ "csr": new_csr })).unwrap();
    let err = raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        Some((&expired.cert_pem, &key.serialize_pem())),
        "POST",
        "/v1/renew",
        &body,
    )
    .await
    .unwrap_err();
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned();
    assert_eq!(
        tls,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateExpired
        )),
        "{err}"
    );

    // A valid client certificate asking for another node's certificate: 403.
    let (key, csr) = key_and_csr("edge-1");
    let good = cluster.ca.sign_node_csr(&csr, "edge-1", HOUR).unwrap();
    let (_k, other_csr) = key_and_csr("edge-2");
    let body = serde_json::to_vec(&serde_json::json!({ "csr": other_csr })).unwrap();
    raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        Some((&good.cert_pem, &key.serialize_pem())),
        "POST",
        "/v1/renew",
        &body,
    )
    .await
    .unwrap()
    .assert_error(403, "node_mismatch");
    // The admin certificate is not a node identity.
    let admin = cluster.ca.admin_cert().unwrap();
    raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        Some((&admin.cert_pem, &admin.key_pem)),
        "POST",
        "/v1/renew",
        &body,
    )
    .await
    .unwrap()
    .assert_error(403, "not_a_node_certificate");
    // Garbage body over mTLS.
    raw_request(
        cluster.addr(),
        cluster.ca.cert_pem(),
        Some((&good.cert_pem, &key.serialize_pem())),
        "POST",
        "/v1/renew",
        b"{{{",
    )
    .await
    .unwrap()
    .assert_error(400, "malformed_request");
    assert_eq!(cluster.server.stats().renewals_ok, 0);
}

#[tokio::test]
async fn interrupted_renewal_is_finished_on_load() {
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = edge::join(
        cluster.addr(),
        &cluster.token("edge-1"),
        "edge-1",
        dir.path(),
    )
    .await
    .unwrap();
    let second = edge::renew(cluster.addr(), dir.path()).await.unwrap();
    let pki_dir = dir.path().join("pki");
    // Simulate a crash after the key was renamed but before the certificate
    // was: node.key is new, node.pem is old, node.pem.new is pending.
    std::fs::write(pki_dir.join("node.pem.new"), &second.cert_pem).unwrap();
    std::fs::write(pki_dir.join("node.pem"), &first.cert_pem).unwrap();
    assert_eq!(NodeIdentity::load(dir.path()).unwrap(), second);
    // A crash before the certificate was written: the stray key is dropped.
    std::fs::write(pki_dir.join("node.key.new"), &first.key_pem).unwrap();
    assert_eq!(NodeIdentity::load(dir.path()).unwrap(), second);
    assert!(!pki_dir.join("node.key.new").exists());
    // A mismatched pair is an error, not a silent misuse.
    std::fs::write(pki_dir.join("node.key"), &first.key_pem).unwrap();
    let err = NodeIdentity::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    // No identity at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        NodeIdentity::load(empty.path()),
        Err(keel_edge::Error::NotJoined(_))
    ));
}

#[tokio::test]
async fn shutdown_stops_the_endpoint() {
    let cluster = Cluster::start().await;
    let addr = cluster.addr();
    let ca_pem = cluster.ca.cert_pem().to_owned();
    assert_eq!(
        raw_request(addr, &ca_pem, None, "GET", "/v1/ca", b"")
            .await
            .unwrap()
            .status,
        200
    );
    let Cluster {
        server, dir: _dir, ..
    } = cluster;
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn tokens_issued_by_another_process_are_seen_and_single_use_across_them() {
    // Two stores on one data directory stand for cloudcore and a separate
    // `cloudcore token` process.
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let running = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let admin = TokenStore::open(dir.path(), &ca.ca_hash()).unwrap();
    let t = admin.create("edge-x", HOUR, SystemTime::now()).unwrap();
    running
        .redeem(t.as_str(), "edge-x", SystemTime::now())
        .unwrap();
    // Used up for both.
    assert!(
        admin
            .redeem(t.as_str(), "edge-x", SystemTime::now())
            .is_err()
    );
    assert!(
        running
            .redeem(t.as_str(), "edge-x", SystemTime::now())
            .is_err()
    );
    // A later token from the admin does not undo the use.
    let t2 = admin.create("edge-y", HOUR, SystemTime::now()).unwrap();
    assert!(
        running
            .redeem(t.as_str(), "edge-x", SystemTime::now())
            .is_err()
    );
    running
        .redeem(t2.as_str(), "edge-y", SystemTime::now())
        .unwrap();
}

// ---------------------------------------------------------------------------
// reserved names
// ---------------------------------------------------------------------------

#[tokio::test]
async fn cloudcore_and_other_reserved_or_invalid_names_cannot_join() {
    let cluster = Cluster::start().await;
    let refused = [
        "cloudcore",
        "keel-admin",
        "keel-cloudcore",
        "keel-cluster-ca",
        "system:node:edge-1",
        "user:keel-admin",
        "Edge-1",
        "edge..1",
        "edge.-1",
        "-edge",
        "edge_1",
    ];
    for name in refused {
        // No token can be made for it...
        match cluster.tokens.create(name, HOUR, SystemTime::now()) {
            Err(Error::InvalidNodeName { .. }) => {}
            other => panic!("token for {name:?}: {other:?}"),
        }
        // ...nor can a join name it, whatever the token.
        let (_key, csr) = key_and_csr(name);
        let answer = raw_request(
            cluster.addr(),
            cluster.ca.cert_pem(),
            None,
            "POST",
            "/v1/join",
            &join_body(&cluster.token("edge-1"), name, &csr),
        )
        .await
        .unwrap();
        answer.assert_error(400, "invalid_node_name");
        let reason = answer.json()["reason"].as_str().unwrap().to_owned();
        assert!(
            reason.contains("reserved") || reason.contains("DNS-1123"),
            "{name}: {reason}"
        );
        // Nor does the CA sign for it.
        assert!(matches!(
            cluster.ca.sign_node_csr(&csr, name, HOUR),
            Err(Error::InvalidNodeName { .. })
        ));
    }
    assert_eq!(cluster.server.stats().joins_ok, 0);
    // A forged token naming cloudcore is refused by the edge before any request.
    let ca_hex = cluster
        .ca
        .ca_hash()
        .trim_start_matches("sha256:")
        .to_owned();
    let forged =
        format!("keel1.cloudcore.0123456789abcdef.0123456789abcdef0123456789abcdef.{ca_hex}");
    let dir = tempfile::tempdir().unwrap();
    let err = edge::join(cluster.addr(), &forged, "cloudcore", dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, keel_edge::Error::InvalidToken(_)), "{err}");
    // Dotted DNS-1123 names are fine.
    pki::validate_node_name("edge-1.site-a").unwrap();
    let dir = tempfile::tempdir().unwrap();
    edge::join(
        cluster.addr(),
        &cluster.token("edge-1.site-a"),
        "edge-1.site-a",
        dir.path(),
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------
// renewal while running
// ---------------------------------------------------------------------------

/// The serial of the client certificate `config` presents to a server with
/// the hub's TLS configuration.
async fn presented_serial(ca: &ClusterCa, config: rustls::ClientConfig) -> String {
    let server = ca.server_cert(&["127.0.0.1"]).unwrap();
    let server_config = pki::server_tls_config(ca, &server.cert_pem, &server.key_pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
            .accept(tcp)
            .await
            .unwrap();
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        pki::serial_of_cert(&der).unwrap()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    accept.await.unwrap()
}

#[tokio::test]
async fn a_running_edge_renews_before_expiry_and_connects_with_the_new_certificate() {
    // Certificates live 6 s here: the edge renews 4 s into that.
    let cluster = Cluster::start_with(
        BootstrapOptions::default()
            .with_node_cert_validity(Duration::from_secs(6))
            .with_renew_min_interval(Duration::ZERO),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let first = edge::join(
        cluster.addr(),
        &cluster.token("edge-1"),
        "edge-1",
        dir.path(),
    )
    .await
    .unwrap();
    let renew_at = first.renew_at();
    let lifetime = first.not_after.duration_since(renew_at).unwrap();
    assert!(
        lifetime <= Duration::from_secs(3),
        "renews at 2/3 of the lifetime, not {lifetime:?} before expiry"
    );
    let live = edge::LiveIdentity::new(first.clone()).unwrap();
    let config = live.client_tls_config().unwrap();
    assert_eq!(
        presented_serial(&cluster.ca, config.clone()).await,
        first.serial
    );
    let renewer = tokio::spawn(Arc::clone(&live).renew_loop(cluster.addr(), dir.path().to_owned()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while live.identity().serial == first.serial {
        assert!(std::time::Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = live.identity();
    assert!(cluster.ca.is_revoked(&first.serial));
    assert_eq!(NodeIdentity::load(dir.path()).unwrap().node, "edge-1");
    // The same TLS configuration, built before, presents the new certificate.
    let serial = presented_serial(&cluster.ca, config).await;
    assert_ne!(serial, first.serial);
    assert!(
        cluster.ca.issued_to("edge-1").contains(&serial),
        "{serial} is not an issued certificate"
    );
    assert!(
        renewed.not_after > first.not_after,
        "the renewed certificate lives longer"
    );
    renewer.abort();
}

// ---------------------------------------------------------------------------
// hostile clients
// ---------------------------------------------------------------------------

/// Opens a TLS connection from `src` and sends a join's headers announcing
/// `announced` body bytes, and only `sent` of them; returns the stream
/// (kept open by the caller).
async fn slow_body(
    src: IpAddr,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    announced: usize,
    sent: usize,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = connect_from(Some(src), addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    let head = format!(
        "POST /v1/join HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {announced}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(&vec![b' '; sent]).await?;
    tls.flush().await?;
    Ok(tls)
}

#[tokio::test]
async fn a_slow_body_is_cut_at_the_body_timeout() {
    let cluster = Cluster::start_with(
        BootstrapOptions::default().with_timeouts(Duration::from_secs(1), Duration::from_secs(30)),
    )
    .await;
    let config = Arc::new(client_config(cluster.ca.cert_pem()));
    let mut tls = slow_body(
        "127.0.0.1".parse().unwrap(),
        cluster.addr(),
        config,
        1000,
        10,
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut raw))
        .await
        .expect("the server holds a slow body forever")
        .ok();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert_eq!(cluster.server.stats().timeouts, 1);
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_closed_at_accept() {
    let cluster =
        Cluster::start_with(BootstrapOptions::default().with_connection_limits(1024, 8)).await;
    let src: IpAddr = "127.0.0.5".parse().unwrap();
    // Silent connections (no TLS handshake) hold their places.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(Some(src), cluster.addr()).await.unwrap());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for _ in 0..4 {
        let mut extra = connect_from(Some(src), cluster.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        // Closed by the server without a byte.
        let n = tokio::time::timeout(Duration::from_secs(30), extra.read(&mut buf))
            .await
            .expect("an extra connection was kept open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    while cluster.server.stats().connections_refused < 4 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another address is served meanwhile.
    let answer = raw_request_from(
        Some("127.0.0.6".parse().unwrap()),
        cluster.addr(),
        cluster.ca.cert_pem(),
        None,
        "GET",
        "/v1/ca",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    drop(held);
}

/// Slow-body connections from many addresses (more than the total cap)
/// and a flood of fake joins from one address; a real join from another
/// address still succeeds while they are open. `KEEL_FLOOD_CONNECTIONS`
/// sets the number of slow connections (default 5,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_and_fake_joins_do_not_stop_a_real_join() {
    let flood: usize = std::env::var("KEEL_FLOOD_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let total_cap = 1024;
    let cluster = Cluster::start_with(
        BootstrapOptions::default()
            // Long deadlines: the slow connections hold their places for
            // the whole test, so only the caps and eviction protect it.
            .with_timeouts(Duration::from_secs(600), Duration::from_secs(600))
            .with_connection_limits(total_cap, 32),
    )
    .await;
    let addr = cluster.addr();
    let config = Arc::new(client_config(cluster.ca.cert_pem()));

    // Slow bodies from 200 addresses, 64 handshakes at a time.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..flood {
        let src: IpAddr = format!("127.0.1.{}", i % 200 + 1).parse().unwrap();
        let (gate, config) = (Arc::clone(&gate), Arc::clone(&config));
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let conn = slow_body(src, addr, config, 4000, 100).await;
            drop(permit);
            // Hold it (an evicted one just fails later).
            conn.ok()
        });
    }
    let mut held = Vec::with_capacity(flood);
    while let Some(conn) = tasks.join_next().await {
        held.push(conn.unwrap());
    }
    let stats = cluster.server.stats();
    assert!(
        stats.connections_evicted > 0,
        "{flood} slow connections over a cap of {total_cap} evicted none: {stats:?}"
    );

    // Fake joins (well-formed, unknown tokens) from one address.
    let ca_hex = cluster
        .ca
        .ca_hash()
        .trim_start_matches("sha256:")
        .to_owned();
    let (_key, csr) = key_and_csr("edge-1");
    let fake = join_body(
        &format!("keel1.edge-1.0123456789abcdef.0123456789abcdef0123456789abcdef.{ca_hex}"),
        "edge-1",
        &csr,
    );
    let mut codes = BTreeMap::new();
    for _ in 0..100 {
        let a = raw_request_from(
            Some("127.0.0.3".parse().unwrap()),
            addr,
            cluster.ca.cert_pem(),
            None,
            "POST",
            "/v1/join",
            &fake,
        )
        .await
        .unwrap();
        *codes.entry(a.status).or_insert(0) += 1;
    }
    assert!(codes.get(&429).copied().unwrap_or(0) > 0, "{codes:?}");
    assert_eq!(codes.get(&200), None, "{codes:?}");

    // The real join, while all of that is open.
    let dir = tempfile::tempdir().unwrap();
    let id = tokio::time::timeout(
        Duration::from_secs(120),
        edge::join(addr, &cluster.token("edge-1"), "edge-1", dir.path()),
    )
    .await
    .expect("the real join did not finish")
    .unwrap();
    assert_eq!(id.node, "edge-1");
    assert_eq!(cluster.server.stats().joins_ok, 1);
    drop(held);
}
