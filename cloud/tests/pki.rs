//! Cluster CA, certificate issuance, revocation, and the hub's mutual-TLS
//! configurations exercised with real TLS (TCP and QUIC) handshakes on
//! 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keel_cloud::Error;
use keel_cloud::pki::{
    self, ADMIN_COMMON_NAME, ADMIN_ORGANIZATION, ALPN_SYNC, CA_COMMON_NAME, ClusterCa,
    NODE_ORGANIZATION,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x509_parser::prelude::{FromDer as _, X509Certificate};

fn new_ca() -> (tempfile::TempDir, ClusterCa) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    (dir, ca)
}

/// A fresh P-256 key and a CSR whose subject is `CN=cn`.
fn key_and_csr(cn: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

struct NodeCreds {
    cert_pem: String,
    key_pem: String,
    serial: String,
}

fn node_creds(ca: &ClusterCa, node: &str) -> NodeCreds {
    let (key, csr) = key_and_csr(node);
    let issued = ca
        .sign_node_csr(&csr, node, pki::DEFAULT_NODE_CERT_VALIDITY)
        .unwrap();
    NodeCreds {
        cert_pem: issued.cert_pem,
        key_pem: key.serialize_pem(),
        serial: issued.serial,
    }
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    pki::certs_from_pem(pem).unwrap().remove(0)
}

/// Verifies `cert_pem` as a client certificate against `ca` (chain, validity,
/// clientAuth EKU) with rustls' WebPKI verifier.
fn chains_to(ca: &ClusterCa, cert_pem: &str) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        pki::crypto_provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&der_of(cert_pem), &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
}

fn rustls_error_of(e: &std::io::Error) -> rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// What each side of a TLS handshake saw.
struct Outcome {
    /// The server: the verified client certificate, or the TLS error.
    server: Result<CertificateDer<'static>, rustls::Error>,
    /// The client: `Ok` if it got the server's reply, or the TLS error.
    client: Result<(), rustls::Error>,
}

/// Runs a TLS 1.3 handshake between `server_cfg` and `client_cfg` over TCP
/// on 127.0.0.1, then one round trip of application data.
async fn tls_handshake(
    server_cfg: rustls::ServerConfig,
    client_cfg: rustls::ClientConfig,
) -> Outcome {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let cert = tls.get_ref().1.peer_certificates().unwrap()[0]
                    .clone()
                    .into_owned();
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(b"pong").await.unwrap();
                tls.flush().await.unwrap();
                let _ = tls.shutdown().await;
                Ok(cert)
            }
            Err(e) => Err(rustls_error_of(&e)),
        }
    });
    let client = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| rustls_error_of(&e))?;
        // In TLS 1.3 the server judges the client certificate after the
        // client considers the handshake done: its verdict arrives on read.
        tls.write_all(b"ping")
            .await
            .map_err(|e| rustls_error_of(&e))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| rustls_error_of(&e))?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    Outcome { server, client }
}

fn hub_server_config(ca: &ClusterCa) -> rustls::ServerConfig {
    let server = ca.server_cert(&["127.0.0.1", "localhost"]).unwrap();
    pki::server_tls_config(ca, &server.cert_pem, &server.key_pem).unwrap()
}

#[test]
fn ca_is_created_once_then_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let first = ClusterCa::load_or_create(dir.path()).unwrap();
    let pki_dir = dir.path().join("pki");
    let key_mode = std::fs::metadata(pki_dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "CA key must be 0600");
    let dir_mode = std::fs::metadata(&pki_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let pem_on_disk = std::fs::read_to_string(pki_dir.join("ca.pem")).unwrap();
    assert_eq!(pem_on_disk, first.cert_pem());

    let second = ClusterCa::load_or_create(dir.path()).unwrap();
    assert_eq!(first.ca_hash(), second.ca_hash());
    assert_eq!(first.cert_pem(), second.cert_pem());

    // The reloaded CA signs certificates that chain to the original.
    let creds = node_creds(&second, "edge-1");
    chains_to(&first, &creds.cert_pem).unwrap();

    // The CA certificate itself: self-signed P-256 CA, CN keel-cluster-ca, ~10 years.
    let (_, cert) = X509Certificate::from_der(first.cert_der()).unwrap();
    assert!(cert.is_ca());
    assert_eq!(cert.subject(), cert.issuer());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, CA_COMMON_NAME);
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
}

#[test]
fn ca_with_missing_key_is_refused_and_ca_with_foreign_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    ClusterCa::load_or_create(dir.path()).unwrap();
    let key_path = dir.path().join("pki/ca.key");
    let saved = std::fs::read(&key_path).unwrap();
    std::fs::remove_file(&key_path).unwrap();
    let err = ClusterCa::load_or_create(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("private key is missing"), "{err}");

    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&key_path, other.serialize_pem()).unwrap();
    let err = ClusterCa::load_or_create(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    std::fs::write(&key_path, saved).unwrap();
    ClusterCa::load_or_create(dir.path()).unwrap();
}

#[test]
fn ca_hash_is_sha256_of_the_der() {
    let (_dir, ca) = new_ca();
    let hash = ca.ca_hash();
    let hex = hash.strip_prefix("sha256:").unwrap();
    assert_eq!(hex.len(), 64);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, ca.cert_der());
    let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, expected);
    // The edge computes the same pin.
    assert_eq!(keel_edge::bootstrap::ca_hash_of_der(ca.cert_der()), hash);
    // Another CA has another hash.
    let (_dir2, other) = new_ca();
    assert_ne!(other.ca_hash(), hash);
}

#[test]
fn node_certificate_has_node_cn_client_auth_random_serial_and_ca_issuer() {
    let (_dir, ca) = new_ca();
    let (key, csr) = key_and_csr("edge-7");
    let before = SystemTime::now();
    let a = ca
        .sign_node_csr(&csr, "edge-7", pki::DEFAULT_NODE_CERT_VALIDITY)
        .unwrap();
    let b = ca
        .sign_node_csr(&csr, "edge-7", pki::DEFAULT_NODE_CERT_VALIDITY)
        .unwrap();
    assert_ne!(a.serial, b.serial, "serials must be random");
    assert_eq!(a.serial.len(), 32);

    let der = der_of(&a.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "edge-7");
    let org = cert
        .subject()
        .iter_organization()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(org, NODE_ORGANIZATION);
    assert_eq!(
        cert.issuer(),
        X509Certificate::from_der(ca.cert_der())
            .unwrap()
            .1
            .subject()
    );
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_eq!(pki::serial_of_cert(&der).unwrap(), a.serial);
    // ~30 days of validity.
    let lifetime = cert.validity().not_after.timestamp()
        - before
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(
        (29 * 86400..=30 * 86400 + 60).contains(&lifetime),
        "lifetime {lifetime}s"
    );
    chains_to(&ca, &a.cert_pem).unwrap();
    assert_eq!(pki::node_name_from_cert(&der).unwrap(), "edge-7");
}

#[test]
fn csr_requests_beyond_the_public_key_are_ignored() {
    // A CSR asking for CA rights and a server SAN still yields a plain
    // client certificate.
    let (_dir, ca) = new_ca();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "edge-1");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca
        .sign_node_csr(&csr, "edge-1", Duration::from_secs(3600))
        .unwrap();
    let der = der_of(&issued.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(!cert.is_ca());
    assert!(cert.subject_alternative_name().unwrap().is_none());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
}

#[test]
fn csr_for_another_node_is_refused() {
    let (_dir, ca) = new_ca();
    let (_key, csr) = key_and_csr("edge-b");
    let err = ca
        .sign_node_csr(&csr, "edge-a", Duration::from_secs(3600))
        .unwrap_err();
    match &err {
        Error::NodeMismatch { expected, actual } => {
            assert_eq!(expected, "edge-a");
            assert_eq!(actual, "edge-b");
        }
        other => panic!("expected NodeMismatch, got {other}"),
    }
    assert!(err.to_string().contains("does not match node"), "{err}");
}

#[test]
fn garbage_csrs_are_refused_without_panicking() {
    let (_dir, ca) = new_ca();
    let (_key, good) = key_and_csr("edge-1");
    // Flip a byte inside the base64 body: breaks the signature or the DER.
    let mut tampered = good.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cert_instead = ca.admin_cert().unwrap().cert_pem;
    let junk_pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    let no_cn = {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    for input in [
        "",
        "garbage",
        "\u{0}\u{1}\u{2}",
        junk_pem,
        &tampered,
        &cert_instead,
        &no_cn,
    ] {
        let err = ca
            .sign_node_csr(input, "edge-1", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidCsr(_)),
            "input {input:?}: {err}"
        );
    }
    // Bad node names are refused before the CSR is looked at.
    for name in ["", "Edge", "a_b", "-a", "a-", &"x".repeat(64), "keel-admin"] {
        let err = ca
            .sign_node_csr(&good, name, Duration::from_secs(60))
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidNodeName { .. }),
            "{name:?}: {err}"
        );
    }
}

#[test]
fn server_and_admin_certificates() {
    let (_dir, ca) = new_ca();
    let server = ca
        .server_cert(&["127.0.0.1", "localhost", "cloud.example.org", "::1"])
        .unwrap();
    let der = der_of(&server.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        [
            "IPAddress(7f:00:00:01)",
            "DNSName(localhost)",
            "DNSName(cloud.example.org)",
            "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)",
        ]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    // A server certificate is not a node identity.
    assert!(matches!(
        pki::node_name_from_cert(&der),
        Err(Error::NotANodeCertificate(_))
    ));
    assert!(ca.server_cert(&[]).is_err());
    assert!(ca.server_cert(&["not a dns name ☃"]).is_err());

    let admin = ca.admin_cert().unwrap();
    let der = der_of(&admin.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    let org = cert
        .subject()
        .iter_organization()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!((cn, org), (ADMIN_COMMON_NAME, ADMIN_ORGANIZATION));
    chains_to(&ca, &admin.cert_pem).unwrap();
    let err = pki::node_name_from_cert(&der).unwrap_err();
    assert!(matches!(err, Error::NotANodeCertificate(_)), "{err}");
    assert!(
        !format!("{admin:?}").contains("PRIVATE KEY"),
        "Debug must not print the key"
    );
}

#[test]
fn node_name_from_garbage_is_an_error() {
    for input in [&b""[..], b"garbage", &[0x30, 0x82, 0xff, 0xff]] {
        assert!(matches!(
            pki::node_name_from_cert(input),
            Err(Error::InvalidCertificate(_))
        ));
    }
}

#[test]
fn revocation_is_persisted_and_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let a = node_creds(&ca, "edge-1");
    let b = node_creds(&ca, "edge-2");
    assert!(!ca.is_revoked(&a.serial));
    ca.revoke(&a.serial).unwrap();
    ca.revoke(&a.serial).unwrap(); // idempotent
    assert!(ca.is_revoked(&a.serial));
    assert!(!ca.is_revoked(&b.serial));
    // Upper case and colon-separated forms name the same serial.
    let colon_upper: String = a
        .serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    assert!(ca.is_revoked(&colon_upper));
    assert!(ca.revoke("not hex").is_err());
    assert!(!ca.is_revoked("not hex"));

    let file = std::fs::read_to_string(dir.path().join("pki/revoked")).unwrap();
    assert_eq!(file, format!("{}\n", a.serial));
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("pki"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let reloaded = ClusterCa::load_or_create(dir.path()).unwrap();
    assert!(reloaded.is_revoked(&a.serial));
    assert!(!reloaded.is_revoked(&b.serial));
    reloaded.revoke(&b.serial).unwrap();
    assert_eq!(reloaded.revocations().list().len(), 2);

    std::fs::write(dir.path().join("pki/revoked"), "zz-not-a-serial\n").unwrap();
    let err = ClusterCa::load_or_create(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

#[tokio::test]
async fn hub_tls_accepts_a_valid_node_certificate() {
    let (_dir, ca) = new_ca();
    let node = node_creds(&ca, "edge-1");
    let client = pki::client_tls_config(ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap();
    assert_eq!(client.alpn_protocols, vec![ALPN_SYNC.to_vec()]);
    let outcome = tls_handshake(hub_server_config(&ca), client).await;
    outcome.client.unwrap();
    let peer = outcome.server.unwrap();
    assert_eq!(pki::node_name_from_cert(&peer).unwrap(), "edge-1");
}

#[tokio::test]
async fn hub_tls_refuses_a_certificate_from_another_ca() {
    let (_dir, ca) = new_ca();
    let (_dir2, other_ca) = new_ca();
    let foreign = node_creds(&other_ca, "edge-1");
    // The client trusts our CA for the server, but presents a foreign cert.
    let client =
        pki::client_tls_config(ca.cert_pem(), &foreign.cert_pem, &foreign.key_pem).unwrap();
    let outcome = tls_handshake(hub_server_config(&ca), client).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(
        server_err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    let client_err = outcome.client.unwrap_err();
    assert_eq!(
        client_err,
        rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        "{client_err}"
    );
}

#[tokio::test]
async fn hub_tls_refuses_an_expired_certificate() {
    let (_dir, ca) = new_ca();
    let (key, csr) = key_and_csr("edge-1");
    let now = SystemTime::now();
    let issued = ca
        .sign_node_csr_between(
            &csr,
            "edge-1",
            now - Duration::from_secs(2 * 86400),
            now - Duration::from_secs(86400),
        )
        .unwrap();
    let client =
        pki::client_tls_config(ca.cert_pem(), &issued.cert_pem, &key.serialize_pem()).unwrap();
    let outcome = tls_handshake(hub_server_config(&ca), client).await;
    let server_err = outcome.server.unwrap_err();
    assert!(
        matches!(
            server_err,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{server_err}"
    );
    assert!(
        server_err.to_string().to_lowercase().contains("expired"),
        "{server_err}"
    );
    let client_err = outcome.client.unwrap_err();
    assert_eq!(
        client_err,
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired)
    );
}

#[tokio::test]
async fn hub_tls_refuses_a_revoked_certificate_even_with_a_config_built_before() {
    let (_dir, ca) = new_ca();
    let node = node_creds(&ca, "edge-1");
    let server_cfg = hub_server_config(&ca); // built before the revocation
    ca.revoke(&node.serial).unwrap();
    let client = pki::client_tls_config(ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap();
    let outcome = tls_handshake(server_cfg, client).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(
        server_err,
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    );
    assert!(
        server_err.to_string().to_lowercase().contains("revoked"),
        "{server_err}"
    );
    let client_err = outcome.client.unwrap_err();
    assert_eq!(
        client_err,
        rustls::Error::AlertReceived(AlertDescription::CertificateRevoked)
    );

    // Another node of the same cluster is still accepted.
    let other = node_creds(&ca, "edge-2");
    let client = pki::client_tls_config(ca.cert_pem(), &other.cert_pem, &other.key_pem).unwrap();
    let outcome = tls_handshake(hub_server_config(&ca), client).await;
    assert_eq!(
        pki::node_name_from_cert(&outcome.server.unwrap()).unwrap(),
        "edge-2"
    );
}

#[tokio::test]
async fn hub_tls_requires_a_client_certificate() {
    let (_dir, ca) = new_ca();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(pki::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_SYNC.to_vec()];
    let outcome = tls_handshake(hub_server_config(&ca), client).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(server_err, rustls::Error::NoCertificatesPresented);
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn node_client_refuses_a_server_from_another_ca() {
    let (_dir, ca) = new_ca();
    let (_dir2, rogue) = new_ca();
    let node = node_creds(&ca, "edge-1");
    let client = pki::client_tls_config(ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap();
    let outcome = tls_handshake(hub_server_config(&rogue), client).await;
    assert_eq!(
        outcome.client.unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    assert!(outcome.server.is_err());
}

#[test]
fn configs_reject_bad_pem_without_panicking() {
    let (_dir, ca) = new_ca();
    let node = node_creds(&ca, "edge-1");
    assert!(pki::server_tls_config(&ca, "garbage", "garbage").is_err());
    assert!(pki::client_tls_config("garbage", &node.cert_pem, &node.key_pem).is_err());
    assert!(pki::client_tls_config(ca.cert_pem(), &node.cert_pem, "garbage").is_err());
    assert!(pki::client_tls_config(ca.cert_pem(), "", &node.key_pem).is_err());
}

/// The hub's configs convert to quinn's and authenticate a node over a real
/// QUIC connection; a revoked node is refused.
#[tokio::test]
async fn quic_handshake_with_the_hub_configs() {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

    let (_dir, ca) = new_ca();
    let server_cfg = QuicServerConfig::try_from(hub_server_config(&ca)).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server_cfg)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();

    let server = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            let mut names = Vec::new();
            while let Some(incoming) = endpoint.accept().await {
                match incoming.await {
                    Ok(conn) => {
                        let certs = conn
                            .peer_identity()
                            .unwrap()
                            .downcast::<Vec<CertificateDer<'static>>>()
                            .unwrap();
                        names.push(pki::node_name_from_cert(&certs[0]).unwrap());
                        let mut stream = conn.accept_uni().await.unwrap();
                        let data = stream.read_to_end(64).await.unwrap();
                        assert_eq!(data, b"hello");
                    }
                    Err(e) => names.push(format!("refused: {e}")),
                }
                if names.len() == 2 {
                    break;
                }
            }
            names
        }
    });

    let client_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

    // A good node: its identity reaches the server.
    let node = node_creds(&ca, "edge-9");
    let client_cfg = pki::client_tls_config(ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap();
    let quic_client =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_cfg).unwrap()));
    let conn = client_endpoint
        .connect_with(quic_client, addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    let mut stream = conn.open_uni().await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.finish().unwrap();
    stream.stopped().await.unwrap();

    // A revoked node: refused during the handshake.
    let bad = node_creds(&ca, "edge-10");
    ca.revoke(&bad.serial).unwrap();
    let client_cfg = pki::client_tls_config(ca.cert_pem(), &bad.cert_pem, &bad.key_pem).unwrap();
    let quic_client =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_cfg).unwrap()));
    let refused = async {
        let conn = client_endpoint
            .connect_with(quic_client, addr, "127.0.0.1")
            .unwrap()
            .await?;
        // If the client finished first, the refusal closes the connection.
        Err::<(), _>(conn.closed().await)
    }
    .await
    .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("revoked"),
        "client error should say why: {refused}"
    );

    let names = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names[0], "edge-9");
    assert!(names[1].starts_with("refused"), "{names:?}");
    assert!(names[1].to_lowercase().contains("revoked"), "{names:?}");
    endpoint.close(0u32.into(), b"done");
    client_endpoint.close(0u32.into(), b"done");
}

#[tokio::test]
async fn revoking_a_node_refuses_all_its_certificates_even_unrecorded_ones_until_it_joins_again() {
    let (dir, ca) = new_ca();
    let first = node_creds(&ca, "edge-1");
    let second = node_creds(&ca, "edge-1");
    let other = node_creds(&ca, "edge-2");
    // A certificate the ledger never saw (issued before it existed).
    let unrecorded = node_creds(&ca, "edge-1");
    let ledger_path = dir.path().join("pki").join("issued.log");
    let ledger = std::fs::read_to_string(&ledger_path).unwrap();
    assert_eq!(ledger.lines().count(), 4, "{ledger}");
    let pruned: String = ledger
        .lines()
        .filter(|l| !l.contains(&unrecorded.serial))
        .map(|l| format!("{l}\n"))
        .collect();
    // And a torn last line, as a crash in the middle of an append leaves.
    std::fs::write(&ledger_path, format!("{pruned}{{\"kind\":\"iss")).unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    assert_eq!(
        ca.issued_to("edge-1"),
        [first.serial.clone(), second.serial.clone()]
    );
    let server_cfg = hub_server_config(&ca); // built before the revocation

    let mut revoked = ca.revoke_node("edge-1").unwrap();
    revoked.sort();
    let mut want = vec![first.serial.clone(), second.serial.clone()];
    want.sort();
    assert_eq!(revoked, want);
    assert!(ca.is_node_shut_out("edge-1"));
    assert!(!ca.is_node_shut_out("edge-2"));
    assert!(matches!(
        ca.revoke_node("cloudcore"),
        Err(keel_cloud::Error::InvalidNodeName { .. })
    ));

    for creds in [&first, &second, &unrecorded] {
        assert!(ca.is_cert_revoked(&der_of(&creds.cert_pem)));
        let client =
            pki::client_tls_config(ca.cert_pem(), &creds.cert_pem, &creds.key_pem).unwrap();
        let outcome = tls_handshake(server_cfg.clone(), client).await;
        assert_eq!(
            outcome.server.unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::Revoked),
            "serial {}",
            creds.serial
        );
    }
    let client = pki::client_tls_config(ca.cert_pem(), &other.cert_pem, &other.key_pem).unwrap();
    assert!(
        tls_handshake(server_cfg.clone(), client)
            .await
            .server
            .is_ok()
    );

    // Persisted: a restarted CA refuses them too.
    drop(ca);
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    for creds in [&first, &second, &unrecorded] {
        assert!(ca.is_cert_revoked(&der_of(&creds.cert_pem)));
    }
    assert!(!ca.is_cert_revoked(&der_of(&other.cert_pem)));

    // A certificate issued after the revocation (a new join) is accepted.
    let rejoined = node_creds(&ca, "edge-1");
    assert!(!ca.is_node_shut_out("edge-1"));
    assert!(!ca.is_cert_revoked(&der_of(&rejoined.cert_pem)));
    let client =
        pki::client_tls_config(ca.cert_pem(), &rejoined.cert_pem, &rejoined.key_pem).unwrap();
    let outcome = tls_handshake(hub_server_config(&ca), client).await;
    assert_eq!(
        pki::node_name_from_cert(&outcome.server.unwrap()).unwrap(),
        "edge-1"
    );
}

#[tokio::test]
async fn a_revoked_certificate_cannot_resume_a_session_from_before_its_revocation() {
    let (_dir, ca) = new_ca();
    let node = node_creds(&ca, "edge-1");
    let server_cfg = hub_server_config(&ca);
    // One client configuration: it keeps whatever tickets the server gives.
    let client = pki::client_tls_config(ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap();
    assert!(
        tls_handshake(server_cfg.clone(), client.clone())
            .await
            .server
            .is_ok()
    );
    ca.revoke_node("edge-1").unwrap();
    let outcome = tls_handshake(server_cfg, client).await;
    assert_eq!(
        outcome.server.unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    );
}
