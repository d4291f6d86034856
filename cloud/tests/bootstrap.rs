//! Join tokens and the HTTPS bootstrap endpoint, driven by the real edge
//! client (`keel_edge::bootstrap`) and by a raw HTTPS client, all over TLS on
//! 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::net::SocketAddr;
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
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(ClusterCa::load_or_create(dir.path()).unwrap());
        let tokens = Arc::new(TokenStore::open(dir.path(), &ca.ca_hash()).unwrap());
        let server_creds = ca.server_cert(&["127.0.0.1", "localhost"]).unwrap();
        let server = BootstrapServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&ca),
            Arc::clone(&tokens),
            &server_creds,
            BootstrapOptions::default().with_max_body_bytes(16 * 1024),
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
    let tcp = tokio::net::TcpStream::connect(addr).await?;
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

    // And again with the renewed certificate.
    let third = edge::renew(cluster.addr(), dir.path()).await.unwrap();
    assert_ne!(third.serial, renewed.serial);
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
